#!/usr/bin/env bash
# Fine-tuning through the API against the same trainer by hand (#12's orchestration overhead), on
# one GPU: SmolLM2 served with `rev25`; a training file (e.g. the recovery loop's SGR output) is
# uploaded and `rev25` fine-tuned on it with `pruneval finetune create --wait`; the job's own
# trainer is then run by hand on the job's own spec (bench/by-hand-trainer.sh); then a second job
# through the API, so a warm API run sits beside the warm by-hand run (the first one pays for
# cold caches: Python imports, CUDA start).
# Usage: bench/finetune-overhead.sh BIN_DIR MODEL_DIR TRAINING_JSONL OUT_DIR
#   [DEVICE=cuda] [TRAINER_PYTHON=python3] [PORT=8124]
set -euo pipefail
BIN=$1 MODEL=$2 TRAIN=$3 OUT=$4
DEVICE=${DEVICE:-cuda} TRAINER_PYTHON=${TRAINER_PYTHON:-python3} PORT=${PORT:-8124}
source "$(dirname "$0")/lib.sh"
mkdir -p "$OUT"
STATE=$OUT/state
start_server "$OUT/server.log" "$PORT" --device "$DEVICE" --model "$MODEL" \
  --served-model-name smollm2-135m --variant rev25=reverse:0.25 --state-dir "$STATE" \
  --trainer-device "$DEVICE" --trainer-cmd "$TRAINER_PYTHON {trainer}"
job() {
  local t0
  t0=$(date +%s.%N)
  "$BIN/pruneval" finetune create --base-url "http://127.0.0.1:$PORT" --model rev25 \
    --training-file "$TRAIN" --suffix "$1" --wait > "$OUT/job-$1.log"
  echo "job $1 through the API (upload -> served): $(elapsed "$t0") s"
}
report() {
  python3 - "$STATE/jobs/$1/job.json" "$STATE/jobs/$1/events.jsonl" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
ev = [json.loads(l) for l in open(sys.argv[2])]
t = {e["message"].split(":")[0]: e["created_at"] for e in ev}
print(job["id"], job["suffix"], job["status"], "trained_tokens", job["trained_tokens"], "tokens/s (trainer-reported)",
      round(job["pruneserve"]["train_tokens_per_second"], 1), "| created -> finished",
      job["finished_at"] - job["created_at"], "s, trainer started -> done",
      t.get("The job has successfully completed", 0) - t.get("Trainer started", 0), "s")
PY
}
job first
FIRST=$(ls "$STATE/jobs")
TRAINER_PYTHON=$TRAINER_PYTHON bash "$(dirname "$0")/by-hand-trainer.sh" "$STATE" "$FIRST" "$OUT"
job second
for j in $(ls -tr "$STATE/jobs"); do report "$j"; done
stop_server
