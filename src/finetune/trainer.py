"""pruneserve's reference trainer: supervised LoRA fine-tuning of a (pruned) checkpoint on chat
conversations, on transformers' Trainer with peft (bitsandbytes 4-bit loading when it is installed
and a GPU is used).

Protocol (version 1). Invoked as `... trainer.py SPEC.json`. SPEC holds model_dir, training_file,
validation_file, output_dir, checkpoint_dir, seed, n_epochs, per_device_batch_size,
gradient_accumulation_steps, learning_rate, lr_scheduler_type, warmup_steps, max_steps,
weight_decay, adam_beta1, adam_beta2, max_grad_norm, max_seq_len, lora {r, alpha, dropout,
target_modules}, load_in_4bit (true, false, "auto"), device ("auto", "cpu", "cuda", "cuda:N"),
trainer ("auto": TRL's SFTTrainer when trl is installed, else transformers' Trainer; "trl";
"transformers").
Writes one JSON object per line on stdout:
  {"type": "message", "level": "info", "message": ...}
  {"type": "metrics", "step", "total_steps", "train_loss", "learning_rate", "tokens", "epoch"}
  {"type": "checkpoint", "step", "path", "metrics": {...}}
  {"type": "result", "adapter_dir", "trained_tokens", "tokens_per_second", "train_loss"}
and exits 0 on success. Anything else goes to stderr.

Loss is on assistant tokens only (turns with "weight": 0 excluded), rendered by the model's own
chat template: each assistant turn's tokens are those the template adds after the prompt that
precedes it (`add_generation_prompt=True`), the completion-only loss of TRL's SFTTrainer.
"""

import json
import math
import sys
import time


def emit(**msg):
    print(json.dumps(msg), flush=True)


def render_ids(tok, messages, add_generation_prompt=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode(tok, messages, max_len):
    """Token ids and labels (-100 outside trained assistant turns), cut to max_len."""
    ids = render_ids(tok, messages)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        start = len(render_ids(tok, messages[:i], add_generation_prompt=True))
        end = len(render_ids(tok, messages[: i + 1]))
        for j in range(start, min(end, len(ids))):
            labels[j] = ids[j]
    return ids[:max_len], labels[:max_len]


def load_examples(tok, path, max_len):
    examples, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            ids, labels = encode(tok, json.loads(line)["messages"], max_len)
            if any(x != -100 for x in labels):
                examples.append({"input_ids": ids, "labels": labels})
            else:
                skipped += 1
    return examples, skipped


def pick_backend(wanted):
    """`trl` or `transformers`: TRL's SFTTrainer where installed (or asked for)."""
    if wanted == "transformers":
        return wanted
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
        return "trl"
    except ImportError:
        if wanted == "trl":
            raise SystemExit("trainer `trl` asked for, but trl or datasets is not installed")
        return "transformers"


def main():
    spec = json.load(open(sys.argv[1]))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback,
                              TrainingArguments, set_seed)

    set_seed(spec["seed"])
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    train, skipped = load_examples(tok, spec["training_file"], spec["max_seq_len"])
    if not train:
        raise SystemExit("no conversation has an assistant token within max_seq_len")
    emit(type="message", level="info",
         message=f"{len(train)} conversations to train on ({skipped} without assistant tokens after truncation)")
    valid = None
    if spec.get("validation_file"):
        valid, _ = load_examples(tok, spec["validation_file"], spec["max_seq_len"])

    four_bit = spec["load_in_4bit"]
    if four_bit == "auto":
        try:
            import bitsandbytes  # noqa: F401
            four_bit = on_gpu
        except ImportError:
            four_bit = False
    kwargs = {"dtype": torch.bfloat16 if on_gpu else torch.float32}
    if four_bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    if four_bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model)
    lora = spec["lora"]
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM"))
    emit(type="message", level="info",
         message=f"LoRA r={lora['r']} alpha={lora['alpha']} on {device}{' (4-bit base)' if four_bit else ''}")

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]),
            "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"]))
                                            for b in batch]),
        }

    tokens = {"n": 0}
    per_step = spec["per_device_batch_size"] * spec["gradient_accumulation_steps"]
    steps_per_epoch = math.ceil(len(train) / per_step)
    total = spec["max_steps"] or steps_per_epoch * spec["n_epochs"]

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:
                emit(type="metrics", step=state.global_step, total_steps=total, valid_loss=logs["eval_loss"],
                     epoch=logs.get("epoch"))
            if logs and "loss" in logs:
                emit(type="metrics", step=state.global_step, total_steps=total, train_loss=logs["loss"],
                     learning_rate=logs.get("learning_rate"), tokens=tokens["n"], epoch=logs.get("epoch"))

        def on_save(self, args, state, control, **kw):
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            emit(type="checkpoint", step=state.global_step,
                 path=f"{args.output_dir}/checkpoint-{state.global_step}",
                 metrics={"step": state.global_step, "train_loss": loss})

    backend = pick_backend(spec.get("trainer", "auto"))
    if backend == "trl":
        import datasets
        from trl import SFTConfig as Config, SFTTrainer as Base
        # Already tokenized with labels: TRL keeps `labels` as given and pads them with -100.
        extra = {"max_length": spec["max_seq_len"], "packing": False}
        train_set = datasets.Dataset.from_list(train)
        valid_set = datasets.Dataset.from_list(valid) if valid else None
        data = {"processing_class": tok}
    else:
        Config, Base, extra = TrainingArguments, Trainer, {"remove_unused_columns": False}
        train_set, valid_set = train, valid
        data = {"data_collator": collate}

    class CountingTrainer(Base):
        def training_step(self, model, inputs, *a, **kw):
            tokens["n"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *a, **kw)

    args = Config(
        output_dir=spec["checkpoint_dir"], per_device_train_batch_size=spec["per_device_batch_size"],
        gradient_accumulation_steps=spec["gradient_accumulation_steps"], num_train_epochs=spec["n_epochs"],
        max_steps=spec["max_steps"] or -1, learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_scheduler_type"], warmup_steps=spec["warmup_steps"],
        weight_decay=spec["weight_decay"], adam_beta1=spec["adam_beta1"], adam_beta2=spec["adam_beta2"],
        max_grad_norm=spec["max_grad_norm"], logging_steps=1, save_strategy="epoch", seed=spec["seed"],
        report_to=[], use_cpu=not on_gpu, bf16=on_gpu and not four_bit,
        eval_strategy="epoch" if valid else "no", per_device_eval_batch_size=spec["per_device_batch_size"],
        disable_tqdm=True, **extra)
    emit(type="message", level="info", message=f"trainer: {Base.__module__}.{Base.__name__}")
    trainer = CountingTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=valid_set,
                              callbacks=[Progress()], **data)
    start = time.time()
    out = trainer.train()
    seconds = time.time() - start
    model.save_pretrained(spec["output_dir"])
    emit(type="result", adapter_dir=spec["output_dir"], trained_tokens=tokens["n"],
         tokens_per_second=tokens["n"] / max(seconds, 1e-9), train_loss=out.training_loss)


if __name__ == "__main__":
    main()
