#!/usr/bin/env bash
# SGR at scale (#13) in one device call: 1,000 prompts of about 256 tokens (three GSM8K train
# questions each, Alpaca shape) answered by an 8B-shaped random bf16 checkpoint through
# `pruneval sgr` at the paper's sampling (temperature 0.9, top_p 0.95, max_tokens 8192), the
# server with --kv-cache-gb 40. A random model rarely ends a turn, so every 400th token id is a
# stop id (321 ids): answers are then geometric with a mean of about 400 tokens; the summary's
# histogram gives the real distribution. MODE=before admits by whole max_tokens
# (--reserve-max-tokens, the engine before KV on demand), MODE=after by current need.
# Offline generation: no cap on prompt tokens beside decoding rows (--max-prefill-while-decoding 0),
# as the figures before that flag existed. Sequences in flight are read from /metrics every second; the client's CPU share from
# /usr/bin/time-like accounting of its process.
# Usage: BIN=dir CKPT=dir DATA=dir OUT=dir MODE=before|after [LIMIT=1000]
#   [SERVE_FLAGS="--sampler host"] bench/sgr-gpu.sh
set -euo pipefail
BIN=${BIN:?} CKPT=${CKPT:?} DATA=${DATA:?} OUT=${OUT:?} MODE=${MODE:?} PORT=${PORT:-8041}
source "$(dirname "$0")/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
python3 - "$DATA/gsm8k/train.jsonl" "$OUT/prompts.jsonl" <<'PY'
import json, sys
qs = [json.loads(l)["question"] for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as out:
    for i in range(1000):
        text = "Answer each of these three questions, showing your work.\n\n" + "\n\n".join(
            qs[(3 * i + k) % len(qs)] for k in range(3))
        out.write(json.dumps({"instruction": text}) + "\n")
PY
STOPS=$(python3 -c 'print(",".join(str(i) for i in range(0, 128256, 400)))')
FLAG=(); [ "$MODE" = before ] && FLAG=(--reserve-max-tokens)
start_server "$OUT/server.log" "$PORT" --model "$CKPT" --served-model-name llama8b \
  --device "${DEVICE:-cuda}" --kv-cache-gb 40 --max-step-tokens 8192 --max-prefill-while-decoding 0 --max-model-len 16384 \
  "${FLAG[@]}" ${SERVE_FLAGS:-}
URL=http://127.0.0.1:$PORT
( while curl -s "$URL/metrics" | grep -E '^pruneserve:num_requests_(running|waiting)' \
      | tr '\n' ' '; do echo; sleep 1; done ) > "$OUT/in-flight.log" 2>/dev/null &
POLL=$!
t0=$(date +%s.%N)
python3 - "$OUT/client-cpu.json" "$BIN/pruneval" sgr --base-url "$URL" --model llama8b \
  --data "$OUT/prompts.jsonl" --out "$OUT/sgr.jsonl" --stop-token-ids "$STOPS" \
  --concurrency 1000 --limit "${LIMIT:-1000}" <<'PY' || echo "pruneval sgr failed"
import json, resource, subprocess, sys, time
t = time.time()
rc = subprocess.call(sys.argv[2:])
wall = time.time() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = ru.ru_utime + ru.ru_stime
json.dump({"wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / wall, "rc": rc}, open(sys.argv[1], "w"))
print(f"client: wall {wall:.1f} s, cpu {cpu:.2f} s ({100 * cpu / wall:.2f}% of one core)")
sys.exit(rc)
PY
echo "$MODE: sgr wall $(elapsed "$t0") s"
kill $POLL 2>/dev/null || true
python3 - "$OUT/in-flight.log" <<'PY'
import re, statistics, sys
run = [int(m.group(1)) for l in open(sys.argv[1])
       for m in [re.search(r'num_requests_running\{[^}]*\} (\d+)', l)] if m]
busy = [r for r in run if r > 0]
if busy:
    print(f"sequences running: max {max(busy)}, median {statistics.median(busy)}, samples {len(busy)}")
PY
grep -E 'preemptions_total' <(curl -s "$URL/metrics") || true
stop_server
