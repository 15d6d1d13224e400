"""Independent reference for served fine-tuned adapters: transformers + peft forward (f32, CPU) of
a checkpoint with a PEFT LoRA adapter; prints the log-probability of each token given the ones
before it (the first token has none). Input on stdin: {"model_dir", "adapter_dir", "tokens"}."""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    req = json.load(sys.stdin)
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, req["adapter_dir"]).eval()
    ids = torch.tensor([req["tokens"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    out = [None] + [lp[i - 1, t].item() for i, t in enumerate(req["tokens"]) if i > 0]
    json.dump({"logprobs": out}, sys.stdout)


if __name__ == "__main__":
    main()
