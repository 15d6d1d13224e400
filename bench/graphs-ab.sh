#!/usr/bin/env bash
# Decode steps from captured CUDA graphs against eager launches (`--enforce-eager`), in one device
# call and one binary. 8B-shaped bf16 checkpoint.
#   1. engine (`pruneserve bench`): decode tok/s at batch 1, 16, 64 and 256 (256-token prompts,
#      128 generated; a 40 GiB pool, so all 256 run at once: the default pool ran about 170 of
#      them until session 18), eager then graphs;
#   2. serving (`pruneval bench`): 1, 16 and 64 concurrent streams of 512 in / 256 out (REPEATS
#      runs each), then 256 concurrent of 256 in / 1,024 out, eager (base) then graphs (base and
#      rev25).
# Usage: BIN=dir CKPT=dir OUT=dir [REPEATS=3] [PARTS="engine serve"] [MODES="eager graphs"]
#   bench/graphs-ab.sh
set -euo pipefail
BIN=${BIN:?} CKPT=${CKPT:?} OUT=${OUT:?} PORT=${PORT:-8052} REPEATS=${REPEATS:-3}
source "$(dirname "$0")/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
for part in ${PARTS:-engine serve}; do
  for mode in ${MODES:-eager graphs}; do
    flag=(); [ "$mode" = eager ] && flag=(--enforce-eager)
    case $part in
    engine)
      "$BIN/pruneserve" bench --device cuda --model "$CKPT" --batches 1,16,64,256 \
        --prompt-len 256 --gen 128 --step-tokens 8192 --kv-cache-gb 40 "${flag[@]}" \
        > "$OUT/engine-$mode.txt" 2>&1
      echo "== engine $mode"; grep -v "^\s*$" "$OUT/engine-$mode.txt" | tail -12 ;;
    serve)
      models=llama8b; [ "$mode" = graphs ] && models=llama8b,rev25
      start_server "$OUT/server-$mode.log" "$PORT" --model "$CKPT" --served-model-name llama8b \
        --variant rev25=reverse:0.25 --device cuda --kv-cache-gb 40 --max-step-tokens 8192 \
        --max-model-len 4096 "${flag[@]}"
      echo "== serving $mode"
      "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models "$models" \
        --concurrency 1,16,64 --repeats "$REPEATS" --prompt-len 512 --output-len 256 \
        --score-prompts 0 --json "$OUT/serve64-$mode.json"
      "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models "$models" \
        --concurrency 256 --prompt-len 256 --output-len 1024 --score-prompts 0 \
        --json "$OUT/serve256-$mode.json"
      grep -ci "graph capture failed" "$OUT/server-$mode.log" || true
      stop_server ;;
    esac
  done
done
