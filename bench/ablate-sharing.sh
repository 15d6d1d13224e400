#!/usr/bin/env bash
# `pruneval ablate`'s single-layer sweep with every candidate at once (--parallel-candidates
# equal to the number of candidates), served without and with --enable-prefix-caching (#17 (c),
# docs/benchmarks.md): multiple-choice items go out with all candidates' requests together, so
# the plans' common leading layers can run once. Wall time of each sweep, their ratio, the rows x
# layers shared, and whether both sweeps chose and scored alike.
# Usage: bench/ablate-sharing.sh [BIN_DIR] [DATA_DIR]   (TASK=arithmetic LIMIT=20 CONCURRENCY=4,
#   MODEL / SERVE_ARGS for another model and device)
set -euo pipefail
BIN=${1:-target/release} DATA=${2:-../shared/data}
TASK=${TASK:-arithmetic} LIMIT=${LIMIT:-20} CONCURRENCY=${CONCURRENCY:-4} PORT=${PORT:-8135}
MODEL=${MODEL:-smollm2-135m}
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
for mode in off on; do
  start_cache_server "$mode"
  layers=$(curl -s "localhost:$PORT/v1/models" | python3 -c "import json,sys; print(next(m['base_num_layers'] for m in json.load(sys.stdin)['data'] if m['id']=='$MODEL'))")
  t0=$(date +%s.%N)
  "$BIN/pruneval" ablate --base-url "http://127.0.0.1:$PORT" --model "$MODEL" --tasks "$TASK" \
    --limit "$LIMIT" --data-dir "$DATA" --concurrency "$CONCURRENCY" \
    --parallel-candidates $((layers - 1)) --out-dir "$OUT/$mode" --cache-dir "$OUT/$mode/cache" \
    | grep -E "^iteration" | sed "s/^/cache $mode: /"
  echo "cache $mode: sweep in $(elapsed "$t0") s"
  curl -s "localhost:$PORT/metrics" | grep -E "^pruneserve:(shared_prefix_layer_rows_total|prefix_cache_(hits|queries)_total)" | sed "s/^/cache $mode: /" || true
  stop_server
done
python3 - "$OUT/off/ablate/$MODEL/ablation.json" "$OUT/on/ablate/$MODEL/ablation.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
sa = [c["score"] for c in a["iterations"][0]["candidates"]]
sb = [c["score"] for c in b["iterations"][0]["candidates"]]
print(f"same choice: {a['iterations'][0]['chosen'] == b['iterations'][0]['chosen']}; "
      f"candidate scores equal: {sum(x == y for x, y in zip(sa, sb))} of {len(sa)}")
PY
