#!/usr/bin/env bash
# Prefix caching for scoring on the CPU engine, in one run (docs/benchmarks.md, "Prefix caching
# of prompt logprobs"): pruneval's MMLU (lm-eval's 5-shot prompt: every item of a subject starts
# with the same subject line and five solved dev questions; one echo request per item with the
# next token's top 20) on SmolLM2, served without and with --enable-prefix-caching; items/s, the
# server's prefix-cache counters and memory, and whether every item record is identical.
# Usage: bench/prefix-scoring.sh [BIN_DIR] [DATA_DIR]   (LIMIT=200 items, CONCURRENCY=8; another
#   model and device through MODEL=served-name SERVE_ARGS="--model DIR --served-model-name NAME
#   --device cuda ..."; the GPU command is in docs/benchmarks.md, session 9)
set -euo pipefail
BIN=${1:-target/release} DATA=${2:-../shared/data}
LIMIT=${LIMIT:-200} CONCURRENCY=${CONCURRENCY:-8} PORT=${PORT:-8132} MODEL=${MODEL:-smollm2-135m}
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
for mode in off on; do
  start_cache_server "$mode"
  "$BIN/pruneval" eval --base-url "http://127.0.0.1:$PORT" --model "$MODEL" --tasks mmlu \
    --limit "$LIMIT" --concurrency "$CONCURRENCY" --data-dir "$DATA" \
    --out-dir "$OUT/$mode/results" --cache-dir "$OUT/$mode/cache" | grep -E "items/s" | sed "s/^/cache $mode: /"
  curl -s "localhost:$PORT/metrics" | grep -E "^pruneserve:(prefix_cache|prompt_tokens)" | sed "s/^/cache $mode: /" || true
  stop_server
done
python3 - "$OUT/off/results/$MODEL/mmlu.json" "$OUT/on/results/$MODEL/mmlu.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print("acc off / on:", a["acc"], b["acc"])
same = sum(x == y for x, y in zip(a["items"], b["items"]))
print(f"{same} of {len(a['items'])} item records identical with and without the cache")
lls = [abs(p - q) for x, y in zip(a["items"], b["items"]) for p, q in zip(x.get("loglikelihoods", []), y.get("loglikelihoods", []))]
if lls:
    print(f"max |d loglikelihood| over choices: {max(lls):.2e}")
PY
