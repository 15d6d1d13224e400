#!/usr/bin/env bash
# Prompt-step work before and after scored-only compensation and the tensor-core prefill
# attention, in one device call and one binary (the old rules are kept behind two switches:
# PRUNESERVE_EXACT_ROWS=all compensates every prompt row, PRUNESERVE_PREFILL_KERNEL=simt runs
# the f32 prefill kernel and candle ops for continued chunks). 8B-shaped bf16 checkpoint.
#   1. engine phases (`pruneserve bench`, PRUNESERVE_PHASE_TIMES=1): 64 prompts of 512 tokens
#      in 8192-token steps, before and after;
#   2. serving (`pruneval bench`): 16 then 64 concurrent streams of 512 in / 256 out (REPEATS
#      runs each; 64 after 16 was the slow case of #16), 256
#      concurrent of 256 in / 1,024 out, and 1,000 x 512-token echo+logprobs scoring
#      prompts, before (base only) and after (base and rev25).
# Usage: BIN=dir CKPT=dir OUT=dir [REPEATS=3] [PARTS="phases serve"] [WHEN="before after"]
#   bench/prefill-ab.sh
set -euo pipefail
BIN=${BIN:?} CKPT=${CKPT:?} OUT=${OUT:?} PORT=${PORT:-8051} REPEATS=${REPEATS:-3}
source "$(dirname "$0")/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
BEFORE=(env PRUNESERVE_EXACT_ROWS=all PRUNESERVE_PREFILL_KERNEL=simt)
AFTER=(env)
for part in ${PARTS:-phases serve}; do
  case $part in
  phases)
    for when in ${WHEN:-before after}; do
      [ $when = before ] && run=("${BEFORE[@]}") || run=("${AFTER[@]}")
      "${run[@]}" PRUNESERVE_PHASE_TIMES=1 "$BIN/pruneserve" bench --device cuda --model "$CKPT" \
        --batches 1,64 --prompt-len 512 --gen 16 --step-tokens 8192 > "$OUT/phases-$when.txt" 2>&1
      echo "== phases $when"; grep -v "^\s*$" "$OUT/phases-$when.txt" | tail -45
    done ;;
  serve)
    for when in ${WHEN:-before after}; do
      [ $when = before ] && { run=("${BEFORE[@]}"); models=llama8b; } \
        || { run=("${AFTER[@]}"); models=llama8b,rev25; }
      BIN_REAL=$BIN; BIN=$OUT/bin-$when; mkdir -p "$BIN"
      printf '#!/bin/sh\nexec %s "%s/pruneserve" "$@"\n' "${run[*]}" "$BIN_REAL" > "$BIN/pruneserve"
      chmod +x "$BIN/pruneserve"
      start_server "$OUT/server-$when.log" "$PORT" --model "$CKPT" --served-model-name llama8b \
        --variant rev25=reverse:0.25 --device cuda --kv-cache-gb 40 --max-step-tokens 8192 \
        --max-model-len 4096
      BIN=$BIN_REAL
      echo "== serving $when"
      "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models "$models" \
        --concurrency 16,64 --repeats "$REPEATS" --prompt-len 512 --output-len 256 --score-prompts 1000 \
        --json "$OUT/serve64-$when.json"
      "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models "$models" \
        --concurrency 256 --prompt-len 256 --output-len 1024 --score-prompts 0 \
        --json "$OUT/serve256-$when.json"
      grep -E "step_stats|prefill" "$OUT/server-$when.log" | tail -5 || true
      stop_server
    done ;;
  esac
done
