#!/usr/bin/env bash
# The orchestration-overhead check of the Fine-tuning API: runs a finished job's own trainer by
# hand on the job's own spec (its own output directories) and prints both throughputs.
# Usage: bench/by-hand-trainer.sh STATE_DIR JOB_ID OUT_DIR   [TRAINER_PYTHON=python3]
set -euo pipefail
STATE=$1 JOB=$2 OUT=$3 TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
elapsed() { python3 -c 'import sys, time; print(round(time.time() - float(sys.argv[1]), 1))' "$1"; }
mkdir -p "$OUT"
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
python3 - "$STATE/jobs/$JOB/job.json" "$STATE/jobs/$JOB/events.jsonl" "$OUT/by-hand-result.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
ev = [json.loads(l) for l in open(sys.argv[2])]
t = {e["message"].split(":")[0]: e["created_at"] for e in ev}
print("job:", job["status"], "trained_tokens", job["trained_tokens"],
      "tokens/s (trainer-reported)", round(job["pruneserve"]["train_tokens_per_second"], 1))
print("job wall (created -> finished):", job["finished_at"] - job["created_at"], "s;",
      "trainer process (started -> result):", t.get("The job has successfully completed", 0) - t.get("Trainer started", 0), "s")
print("by hand:", open(sys.argv[3]).read().strip())
PY
