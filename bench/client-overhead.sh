#!/usr/bin/env bash
# Client overhead of `pruneval eval`: arc_easy against a server whose scoring is nearly free (a
# 2-layer, 64-wide random model with a byte tokenizer), one worker, fresh cache. Prints items/s
# and the share of wall time spent in the client (wall minus time waiting on HTTP round trips).
# Usage: bench/client-overhead.sh [ITEMS]   (release binaries are built unless BIN names a directory
# holding pruneserve and pruneval)
set -euo pipefail
ITEMS=${1:-500}
if [ -n "${BIN:-}" ]; then
  T=$BIN
else
  T=${CARGO_TARGET_DIR:-target}/release
  cargo build --release -q -p pruneserve -p pruneval
fi
W=$(mktemp -d); trap 'kill ${SERVER:-} 2>/dev/null; rm -rf "$W"' EXIT
"$T/pruneserve" init-random --like bench/tiny-llama-config.json "$W/tiny" > /dev/null
"$T/pruneserve" serve --model "$W/tiny" --served-model-name tiny --port 8124 > "$W/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:8124/health > /dev/null && break; sleep 0.2; done
"$T/pruneval" eval --base-url http://127.0.0.1:8124 --model tiny --tasks arc_easy --limit "$ITEMS" \
  --concurrency 1 --data-dir ../shared/data --out-dir "$W/results" --cache-dir "$W/cache" | tee "$W/out.txt"
python3 - "$W/out.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
m = re.search(r"([0-9.]+) items/s, wall ([0-9.]+) s, waiting on the server ([0-9.]+) s", t)
items, wall, wait = map(float, m.groups())
print(f"client overhead: {items:.1f} items/s; client share of wall time {100 * (wall - wait) / wall:.1f}% "
      f"({wall - wait:.2f} s of {wall:.2f} s)")
PY
