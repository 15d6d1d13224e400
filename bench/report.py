"""Turns one bench/gpu.sh run's JSON files into the markdown tables of docs/benchmarks.md: each
figure as min / median / max of its repeats (one number when it ran once), ratios of medians.
Files: copy.json, pruneserve.json, pruneserve-steady.json (optional), llamacpp.json (optional),
hf.json (optional)."""
import glob
import json
import os
import statistics
import sys

out_dir, ckpt, base, pruned, command = sys.argv[1:6]


def load(name):
    path = f"{out_dir}/{name}"
    return json.load(open(path)) if os.path.exists(path) else None


copy = load("copy.json")
ours = load("pruneserve.json")
steady = load("pruneserve-steady.json")
peer = load("llamacpp.json")
hf = (load("hf.json") or {}).get("hf", [])
cfg = json.load(open(f"{ckpt}/config.json"))
weight_bytes = sum(os.path.getsize(f) for f in glob.glob(f"{ckpt}/*.safetensors"))
bw = copy["copy_bytes_per_s"]
# Bytes a decode step must read: all weights for the base; the pruned plan skips 25% of layers.
n_layers = cfg["num_hidden_layers"]
h, i = cfg["hidden_size"], cfg["intermediate_size"]
kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
layer_bytes = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
kept = {base: n_layers, pruned: n_layers - round(0.25 * n_layers)}


def runs(report, model, c, key):
    """Every repeat's value of `key` at concurrency c (a peer serves one model, any name)."""
    if report is None:
        return []
    return [r[key] for r in report["generation"]
            if (model is None or r["model"] == model) and r["concurrency"] == c]


def spread(values, fmt="{:.0f}"):
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def med(values):
    return statistics.median(values) if values else None


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


read = lambda m: weight_bytes - (n_layers - kept[m]) * layer_bytes
b1 = {m: runs(ours, m, 1, "decode_tok_per_s_per_request") for m in (base, pruned)}
p1 = runs(peer, None, 1, "decode_tok_per_s_per_request")
n = max(len(b1[base]), 1)
lines = [f"Command: `{command}`", "",
         f"Device: {copy['device']}; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
         f"checkpoint {weight_bytes / 1e9:.2f} GB bf16 ({n_layers} layers); prompt {ours['prompt_len']} "
         f"tokens, output {ours['output_len']} tokens, greedy, `ignore_eos`; pruneserve figures are "
         f"min / median / max of {n} runs in this run, ratios of medians.", "",
         f"| figure | {base} | {pruned} | {pruned}/{base} | llama.cpp (base) | {base}/llama.cpp |",
         "|---|---|---|---|---|---|"]
lines.append(f"| batch-1 decode tok/s | {spread(b1[base], '{:.1f}')} | {spread(b1[pruned], '{:.1f}')} "
             f"| {ratio(med(b1[pruned]), med(b1[base]))} | {spread(p1, '{:.1f}')} "
             f"| {ratio(med(b1[base]), med(p1))} |")
floor = {m: 1e3 * read(m) / bw for m in (base, pruned)}
lines.append(f"| floor ms/token (bytes read / copy bandwidth) | {floor[base]:.2f} | {floor[pruned]:.2f} "
             f"| | {floor[base]:.2f} | |")
pct = lambda v, m: f"{100 * floor[m] * v / 1e3:.0f}%" if v else "-"
lines.append(f"| batch-1 % of floor (median) | {pct(med(b1[base]), base)} | {pct(med(b1[pruned]), pruned)} "
             f"| | {pct(med(p1), base)} | |")
for c in sorted({r["concurrency"] for r in ours["generation"]}):
    tok = {m: runs(ours, m, c, "output_tok_per_s") for m in (base, pruned)}
    pt = runs(peer, None, c, "output_tok_per_s")
    lines.append(f"| output tok/s at {c} concurrent | {spread(tok[base])} | {spread(tok[pruned])} "
                 f"| {ratio(med(tok[pruned]), med(tok[base]))} | {spread(pt)} "
                 f"| {ratio(med(tok[base]), med(pt))} |")
    t50 = {m: runs(ours, m, c, "ttft_p50_ms") for m in (base, pruned)}
    lines.append(f"| TTFT p50 ms at {c} | {spread(t50[base])} | {spread(t50[pruned])} | "
                 f"| {spread(runs(peer, None, c, 'ttft_p50_ms'))} | |")
    itl = {m: runs(ours, m, c, "itl_p99_ms") for m in (base, pruned)}
    lines.append(f"| ITL p99 ms at {c} | {spread(itl[base], '{:.1f}')} | {spread(itl[pruned], '{:.1f}')} | "
                 f"| {spread(runs(peer, None, c, 'itl_p99_ms'), '{:.1f}')} | |")
score = {r["model"]: r for r in ours["scoring"]}
if base in score and pruned in score:
    a, b = score[base]["prompt_tok_per_s"], score[pruned]["prompt_tok_per_s"]
    lines.append(f"| scoring prompt tok/s ({score[base]['prompts']} x {ours['prompt_len']}, "
                 f"echo+logprobs, one run) | {a:.0f} | {b:.0f} | {b / a:.2f}x | (no prompt logprobs) | |")
if steady:
    c = steady["generation"][0]["concurrency"]
    st = lambda k: runs(steady, base, c, k)
    lines += ["", f"Steady state ({base}, {c} streams of {steady['prompt_len']} + {steady['output_len']} "
              "tokens): output tok/s, ITL p50 and p99 ms", "",
              "| output tok/s | ITL p50 ms | ITL p99 ms |", "|---|---|---|",
              f"| {spread(st('output_tok_per_s'))} | {spread(st('itl_p50_ms'), '{:.1f}')} "
              f"| {spread(st('itl_p99_ms'), '{:.1f}')} |"]
if hf:
    lines += ["", "| HF transformers generate (same checkpoint, bf16, sdpa) | output tok/s "
              "| pruneserve base at same concurrency (median) | pruneserve / HF |", "|---|---|---|---|"]
    for r in hf:
        ours_c = med(runs(ours, base, r["batch"], "output_tok_per_s"))
        lines.append(f"| batch {r['batch']} | {r['output_tok_per_s']:.0f} | "
                     f"{'-' if ours_c is None else f'{ours_c:.0f}'} | {ratio(ours_c, r['output_tok_per_s'])} |")
print("\n".join(lines))
