"""Turns one bench/gpu.sh run's JSON files into the markdown table of docs/benchmarks.md."""
import glob
import json
import os
import sys

out_dir, ckpt, base, pruned, command = sys.argv[1:6]
copy = json.load(open(f"{out_dir}/copy.json"))
ours = json.load(open(f"{out_dir}/pruneserve.json"))
hf = json.load(open(f"{out_dir}/hf.json"))["hf"]
cfg = json.load(open(f"{ckpt}/config.json"))
files = glob.glob(f"{ckpt}/*.safetensors")
weight_bytes = sum(os.path.getsize(f) for f in files)
bw = copy["copy_bytes_per_s"]
# Bytes a decode step must read: all weights for the base; the pruned plan skips 25% of layers.
n_layers = cfg["num_hidden_layers"]
h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
layer_bytes = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
kept = {base: n_layers, pruned: n_layers - round(0.25 * n_layers)}

def level(model, c):
    return next(r for r in ours["generation"] if r["model"] == model and r["concurrency"] == c)

lines = [f"Command: `{command}`", "",
         f"Device: {copy['device']}; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
         f"checkpoint {weight_bytes / 1e9:.2f} GB bf16 ({n_layers} layers); prompt {ours['prompt_len']} "
         f"tokens, output {ours['output_len']} tokens, greedy, `ignore_eos`.", "",
         "| figure | " + " | ".join([base, pruned, f"{pruned}/{base}"]) + " |", "|---|---|---|---|"]
def row(name, fn, fmt="{:.0f}"):
    a, b = fn(base), fn(pruned)
    lines.append(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
read = lambda m: weight_bytes - (n_layers - kept[m]) * layer_bytes
row("batch-1 decode tok/s", lambda m: level(m, 1)["decode_tok_per_s_per_request"], "{:.1f}")
row("batch-1 ms/token", lambda m: 1e3 / level(m, 1)["decode_tok_per_s_per_request"], "{:.2f}")
row("floor ms/token (bytes read / copy bandwidth)", lambda m: 1e3 * read(m) / bw, "{:.2f}")
row("batch-1 % of floor", lambda m: 100 * (read(m) / bw) * level(m, 1)["decode_tok_per_s_per_request"], "{:.0f}%")
for c in sorted({r["concurrency"] for r in ours["generation"]}):
    row(f"output tok/s at {c} concurrent", lambda m: level(m, c)["output_tok_per_s"])
    row(f"TTFT p50 / p99 ms at {c}", lambda m: level(m, c)["ttft_p50_ms"], "{:.0f}")
    lines[-1] = lines[-1].rsplit("|", 2)[0] + "| |"
    lines[-1] = (f"| TTFT p50 / p99 ms at {c} | {level(base, c)['ttft_p50_ms']:.0f} / {level(base, c)['ttft_p99_ms']:.0f} "
                 f"| {level(pruned, c)['ttft_p50_ms']:.0f} / {level(pruned, c)['ttft_p99_ms']:.0f} | |")
score = {r["model"]: r for r in ours["scoring"]}
if base in score and pruned in score:
    row(f"scoring prompt tok/s ({score[base]['prompts']} x {ours['prompt_len']}, echo+logprobs)",
        lambda m: score[m]["prompt_tok_per_s"])
lines += ["", "| HF transformers generate (same checkpoint, bf16, sdpa) | output tok/s | pruneserve base at same concurrency | pruneserve / HF |",
          "|---|---|---|---|"]
for r in hf:
    c = r["batch"]
    try:
        ours_c = level(base, c)["output_tok_per_s"]
        lines.append(f"| batch {c} | {r['output_tok_per_s']:.0f} | {ours_c:.0f} | {ours_c / r['output_tok_per_s']:.2f}x |")
    except StopIteration:
        lines.append(f"| batch {c} | {r['output_tok_per_s']:.0f} | - | - |")
print("\n".join(lines))
