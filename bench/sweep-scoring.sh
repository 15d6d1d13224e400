#!/usr/bin/env bash
# A single-layer ablation sweep scored with shared hidden states (#17 (c), docs/benchmarks.md):
# every plan `MODEL@drop=i` (i = 1 .. layers-1) scores the same N prompts (echo + logprobs), each
# prompt's requests for all plans sent at once so they meet in one engine step; served without and
# with --enable-prefix-caching (which shares the plans' common leading layers: `@drop=i` takes
# layers 0..i-1 from another plan's rows). Wall time of each, their ratio, the shared rows x
# layers, and the largest difference between the two servers' logprobs.
# Usage: bench/sweep-scoring.sh [BIN_DIR] [DATA_DIR]   (N=20 prompts of 2 GSM8K questions,
#   LAYERS=30, MODEL=smollm2-135m, SERVE_ARGS=... for another model and device; SEND=prompt sends
#   one prompt's requests for all plans at a time and waits for them, SEND=all sends every
#   request at once, prompt by prompt, over SEND_ALL=512 connections)
set -euo pipefail
BIN=${1:-target/release} DATA=${2:-../shared/data}
N=${N:-20} LAYERS=${LAYERS:-30} PORT=${PORT:-8134} MODEL=${MODEL:-smollm2-135m}
SEND=${SEND:-prompt} SEND_ALL=${SEND_ALL:-512}
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
for mode in off on; do
  start_cache_server "$mode"
  python3 - "$DATA/gsm8k/train.jsonl" "$PORT" "$N" "$LAYERS" "$MODEL" "$OUT/$mode.json" "$mode" "$SEND" "$SEND_ALL" <<'PY'
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
src, port, n, layers, base, out, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
send, send_all = sys.argv[8], int(sys.argv[9])
qs = [json.loads(l)["question"] for l in open(src)]
prompts = ["\n\n".join(qs[(2 * i + k) % len(qs)] for k in range(2)) for i in range(n)]
plans = [f"{base}@drop={i}" for i in range(1, layers)]
def score(model, prompt):
    body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                               {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(r))["choices"][0]["logprobs"]["token_logprobs"]
score(plans[0], "warm up")
t = time.time()
got = {}
if send == "all":  # every request at once, prompt by prompt, through `send_all` connections
    with ThreadPoolExecutor(send_all) as ex:
        futs = {f"{m}/{i}": ex.submit(score, m, p) for i, p in enumerate(prompts) for m in plans}
        got = {k: f.result() for k, f in futs.items()}
else:
    with ThreadPoolExecutor(len(plans)) as ex:
        for i, p in enumerate(prompts):  # one prompt at a time, all plans at once
            futs = {m: ex.submit(score, m, p) for m in plans}
            got.update({f"{m}/{i}": f.result() for m, f in futs.items()})
wall = time.time() - t
print(f"cache {mode}: {len(plans)} plans x {n} prompts ({send}) in {wall:.1f} s")
json.dump({"wall_s": wall, "logprobs": got}, open(out, "w"))
PY
  curl -s "localhost:$PORT/metrics" | grep -E "^pruneserve:shared_prefix_layer_rows_total" | sed "s/^/cache $mode: /" || true
  stop_server
done
python3 - "$OUT/off.json" "$OUT/on.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print(f"on / off = {b['wall_s'] / a['wall_s']:.2f}")
d = max(abs(x - y) for k in a["logprobs"] for x, y in zip(a["logprobs"][k][1:], b["logprobs"][k][1:]))
print(f"max |d logprob| between the servers over {len(a['logprobs'])} scored prompts: {d:.2e}")
PY
