#!/usr/bin/env bash
# Data parallelism (#15) in one device call: the steady-state benchmark (256 concurrent streams
# per GPU, 256-token prompts, 1,024 output tokens, `ignore_eos`) on an 8B-shaped bf16 checkpoint,
# first one server on one GPU (256 streams), then one server over N GPUs with --data-parallel N
# (N x 256 streams); three repeats each; the per-engine metrics after each run.
# Usage: BIN=dir CKPT=dir OUT=dir [N=2] bench/scale.sh
set -euo pipefail
BIN=${BIN:?} CKPT=${CKPT:?} OUT=${OUT:?} N=${N:-2} PORT=${PORT:-8021} KV_GB=${KV_GB:-60}
source "$(dirname "$0")/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
run() { # DEVICES ENGINES STREAMS TAG
  local t0; t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$1 start_server "$OUT/server-$4.log" "$PORT" --model "$CKPT" \
    --served-model-name llama8b --device "${DEVICE:-cuda}" --data-parallel "$2" --kv-cache-gb "$KV_GB" \
    --max-step-tokens 8192 --max-model-len 4096
  echo "$4: server up in $(elapsed "$t0") s"
  "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models llama8b --concurrency "$3" \
    --prompt-len 256 --output-len 1024 --score-prompts 0 --repeats 3 --json "$OUT/scale-$4.json"
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^pruneserve:(engine_|num_preemptions)' \
    > "$OUT/metrics-$4.txt" || true
  cat "$OUT/metrics-$4.txt"
  stop_server
}
all=$(seq -s, 0 $((N - 1)))
run 0 1 256 1gpu
run "$all" "$N" $((N * 256)) "${N}gpu"
