#!/usr/bin/env bash
# Layer importance on the GPU (#14) in one device call, on an 8B-shaped bf16 checkpoint with the
# Llama-3 tokenizer: Block Influence over the built-in GSM8K chain-of-thought calibration set
# (`pruneserve influence --device cuda`), then `pruneval ablate`'s full single-layer sweep
# (every layer but the first dropped alone, plus the unablated model) on 100 GSM8K test items
# (generation) against a CUDA server. Wall time of each.
# Usage: BIN=dir CKPT=dir DATA=dir OUT=dir [PARALLEL=8 candidates at once] bench/importance-gpu.sh
set -euo pipefail
BIN=${BIN:?} CKPT=${CKPT:?} DATA=${DATA:?} OUT=${OUT:?} PORT=${PORT:-8031}
source "$(dirname "$0")/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
t0=$(date +%s.%N)
"$BIN/pruneserve" influence --device "${DEVICE:-cuda}" --model "$CKPT" --drop 8 --json "$OUT/bi.json" \
  > "$OUT/bi.txt" 2> "$OUT/bi.log"
echo "influence (BI, K=8) wall: $(elapsed "$t0") s" | tee "$OUT/times.txt"
head -50 "$OUT/bi.txt"
start_server "$OUT/ablate-server.log" "$PORT" --model "$CKPT" --served-model-name llama8b \
  --device "${DEVICE:-cuda}" --kv-cache-gb 60 --max-step-tokens 8192 --max-model-len 4096 ${SERVE_FLAGS:-}
t0=$(date +%s.%N)
"$BIN/pruneval" ablate --base-url "http://127.0.0.1:$PORT" --model llama8b --tasks gsm8k \
  --limit 100 --data-dir "$DATA" --out-dir "$OUT/ablate" --cache-dir "$OUT/ablate/.cache" \
  --concurrency 100 --parallel-candidates "${PARALLEL:-8}" > "$OUT/ablate.txt" 2>&1
echo "single-layer sweep wall: $(elapsed "$t0") s" | tee -a "$OUT/times.txt"
tail -45 "$OUT/ablate.txt"
stop_server
