#!/usr/bin/env bash
# The recovery loop on one GPU, end to end through the API (docs/benchmarks.md, "The recovery loop
# on the H200"): SmolLM2-135M-Instruct served on CUDA with `rev25`; SGR from the base on GSM8K
# train questions (`pruneval sgr`, the paper's sampling); `rev25` fine-tuned on that file through
# the Fine-tuning API with the reference trainer on the GPU (the paper's recipe); base / pruned /
# recovered evaluated on arithmetic and arc_easy; `pruneval compare`. Then the same trainer is run
# by hand on the job's own spec, for the orchestration overhead.
#
# Usage: bench/recover.sh BIN_DIR MODEL_DIR DATA_DIR OUT_DIR
#   BIN_DIR holds pruneserve (CUDA build) and pruneval; DATA_DIR the layout of ../shared/data.
#   N (2000) prompts, SGR_MAX_TOKENS (512), EVAL_LIMIT (500), DEVICE (cuda; cpu serves and trains
#   on the CPU), TRAINER_PYTHON (python3).
set -euo pipefail
BIN=$1 MODEL=$2 DATA=$3 OUT=$4
N=${N:-2000} SGR_MAX_TOKENS=${SGR_MAX_TOKENS:-512} EVAL_LIMIT=${EVAL_LIMIT:-500}
DEVICE=${DEVICE:-cuda} TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
PORT=${PORT:-8123}; URL=http://127.0.0.1:$PORT
elapsed() { python3 -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 1))' "$1"; }
mkdir -p "$OUT"
STATE=$OUT/state
python3 - "$DATA/gsm8k/train.jsonl" "$OUT/prompts.jsonl" "$N" <<'PY'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src) as f, open(dst, "w") as out:
    for line in list(f)[:n]:
        out.write(json.dumps({"instruction": json.loads(line)["question"]}) + "\n")
PY
"$BIN/pruneserve" serve --device "$DEVICE" --model "$MODEL" --served-model-name smollm2-135m \
  --variant rev25=reverse:0.25 --port $PORT --state-dir "$STATE" --trainer-device "$DEVICE" \
  --trainer-cmd "$TRAINER_PYTHON {trainer}" ${SERVE_FLAGS:-} \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf $URL/health >/dev/null && break; sleep 1; done

cat > "$OUT/recover.toml" <<TOML
base_url = "$URL"
base = "smollm2-135m"
pruned = "rev25"
tasks = ["arithmetic", "arc_easy"]
out_dir = "$OUT/recover"

[sgr]
data = "$OUT/prompts.jsonl"
max_tokens = $SGR_MAX_TOKENS
concurrency = 256

[finetune]
suffix = "sgr"

[eval]
limit = $EVAL_LIMIT
data_dir = "$DATA"
concurrency = 64
TOML
start=$(date +%s.%N)
"$BIN/pruneval" recover "$OUT/recover.toml" | tee "$OUT/recover.log"
echo "recover wall: $(elapsed "$start") s"

# The job's trainer by hand on the same spec (its own output directories).
JOB=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['job_id'])" "$OUT/recover/recover.json")
TRAINER_PYTHON=$TRAINER_PYTHON bash "$(dirname "$0")/by-hand-trainer.sh" "$STATE" "$JOB" "$OUT"
