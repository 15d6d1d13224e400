"""Turns one bench/lora.sh run's JSON files into the markdown table of docs/benchmarks.md."""
import json
import statistics
import sys

out_dir, command = sys.argv[1:3]
levels = []
for name in ("lora-1-256", "lora-64", "lora-mix"):
    levels += json.load(open(f"{out_dir}/{name}.json"))["generation"]
adapters = json.load(open(f"{out_dir}/lora-adapters.json"))["data"]
mib = adapters[0]["adapter"]["bytes"] / 2**20


def runs(model, c):
    return [r["output_tok_per_s"] for r in levels if r["model"] == model and r["concurrency"] == c]


def fmt(xs):
    if len(xs) == 1:
        return f"{xs[0]:.0f}"
    return f"{min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f}"


mix = "+".join(f"lora{k}" for k in range(8))
lines = [
    f"Command: `{command}`",
    "",
    f"8B shape, bf16, rank-64 adapters on all seven projections ({mib:.0f} MiB each on the device), "
    "on the rev25 plan; 512-token prompts, 256 greedy tokens, `ignore_eos`. Output tok/s; three "
    "runs are min / median / max.",
    "",
    "| concurrent streams | rev25 | rev25 + adapter | overhead | 8 adapters mixed | overhead |",
    "|---|---|---|---|---|---|",
]
for c in (1, 64, 256):
    base, one, mixed = runs("rev25", c), runs("lora0", c), runs(mix, c)
    b = statistics.median(base)
    over = lambda xs: f"{100 * (b / statistics.median(xs) - 1):+.1f}%" if xs else "-"
    lines.append(
        f"| {c} | {fmt(base)} | {fmt(one)} | {over(one)} | {fmt(mixed) if mixed else '-'} | {over(mixed)} |"
    )
lines += [
    "",
    "Where the overhead is (medians of the runs): decode steps (ITL p50) and prompt steps (TTFT p50).",
    "",
    "| concurrent streams | ITL p50 rev25 / + adapter | TTFT p50 rev25 / + adapter |",
    "|---|---|---|",
]


def median_of(model, c, key):
    xs = [r[key] for r in levels if r["model"] == model and r["concurrency"] == c]
    return statistics.median(xs) if xs else float("nan")


for c in (1, 64, 256):
    itl = [median_of(m, c, "itl_p50_ms") for m in ("rev25", "lora0")]
    ttft = [median_of(m, c, "ttft_p50_ms") for m in ("rev25", "lora0")]
    lines.append(
        f"| {c} | {itl[0]:.2f} / {itl[1]:.2f} ms ({100 * (itl[1] / itl[0] - 1):+.0f}%) "
        f"| {ttft[0]:.0f} / {ttft[1]:.0f} ms ({100 * (ttft[1] / ttft[0] - 1):+.0f}%) |"
    )
print("\n".join(lines))
