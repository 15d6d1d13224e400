#!/usr/bin/env bash
# Prefix caching on the CPU engine, in one run (docs/benchmarks.md, "Prefix caching on the CPU"):
# pruneval's gsm8k (lm-eval's 8-shot chain of thought: every item's prompt starts with the same
# ~800 tokens of examples) on SmolLM2, then on rev25 (which reuses the base's cached KV), served
# without and with --enable-prefix-caching; items/s and the server's prefix-cache counters.
# Usage: bench/prefix-cache.sh [BIN_DIR] [DATA_DIR]   (LIMIT=32 items, MAX_TOKENS=64)
set -euo pipefail
BIN=${1:-target/release} DATA=${2:-../shared/data}
LIMIT=${LIMIT:-32} MAX_TOKENS=${MAX_TOKENS:-64} PORT=8131
OUT=$(mktemp -d)
for mode in off on; do
  flag=""
  [ "$mode" = on ] && flag=--enable-prefix-caching
  "$BIN/pruneserve" serve --port $PORT --variant rev25=reverse:0.25 $flag > "$OUT/server-$mode.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do curl -sf localhost:$PORT/health >/dev/null && break; sleep 0.5; done
  for model in smollm2-135m rev25; do
    "$BIN/pruneval" eval --base-url http://127.0.0.1:$PORT --model $model --tasks gsm8k \
      --limit "$LIMIT" --max-tokens "$MAX_TOKENS" --concurrency 8 --data-dir "$DATA" \
      --out-dir "$OUT/$mode/results" --cache-dir "$OUT/$mode/cache" | grep -E "items/s" | sed "s/^/cache $mode, $model: /"
  done
  curl -s localhost:$PORT/metrics | grep -E "^pruneserve:prefix_cache" | sed "s/^/cache $mode: /" || true
  kill $pid; wait $pid 2>/dev/null || true
done
for mode in off on; do
  for model in smollm2-135m rev25; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('cache $mode, $model:', {k: r[k] for k in ('acc', 'acc_norm')})" "$OUT/$mode/results/$model/gsm8k.json"
  done
done
for model in smollm2-135m rev25; do
  python3 - "$OUT/off/results/$model/gsm8k.json" "$OUT/on/results/$model/gsm8k.json" "$model" <<'PY'
import json, sys
a, b = (json.load(open(p))["items"] for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
print(f"{sys.argv[3]}: {same} of {len(a)} item records identical with and without the cache")
PY
done
