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
python3 - "$STATE/jobs/$JOB/spec.json" "$OUT/by-hand-spec.json" "$OUT/by-hand" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["output_dir"], spec["checkpoint_dir"] = sys.argv[3] + "/adapter", sys.argv[3] + "/checkpoints"
json.dump(spec, open(sys.argv[2], "w"))
PY
start=$(date +%s.%N)
"$TRAINER_PYTHON" "$STATE/trainer/pruneserve_sft.py" "$OUT/by-hand-spec.json" 2>"$OUT/by-hand.stderr" \
  | grep '"type": "result"' | tee "$OUT/by-hand-result.json"
echo "by-hand trainer wall: $(elapsed "$start") s"
python3 - "$STATE/jobs/$JOB/job.json" "$STATE/jobs/$JOB/events.jsonl" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
ev = [json.loads(l) for l in open(sys.argv[2])]
t = {e["message"].split(":")[0]: e["created_at"] for e in ev}
print("job:", job["status"], "trained_tokens", job["trained_tokens"],
      "tokens/s (trainer-reported)", round(job["pruneserve"]["train_tokens_per_second"], 1))
print("job wall (created -> finished):", job["finished_at"] - job["created_at"], "s;",
      "trainer process (started -> result):", t.get("The job has successfully completed", 0) - t.get("Trainer started", 0), "s")
PY
