#!/usr/bin/env bash
# llama.cpp's server as a side-by-side peer for the GPU benchmark, offline (see
# /work/shared/peers/README.md). The source is .dev/c/llamacpp.tar.xz: PyPI llama-cpp-python 0.3.36's
# vendor/llama.cpp, stripped to the CPU and CUDA backends (top-level dir `llama.cpp/`).
#   bench/llamacpp.sh build TARBALL DIR        unpack into DIR, build llama-server for CUDA sm_90
#                                             (cmake + ninja + nvcc; JOBS=16; skipped if built)
#   bench/llamacpp.sh convert DIR CKPT OUT.gguf   HF safetensors checkpoint -> bf16 GGUF (skipped if
#                                             OUT.gguf exists); needs torch, transformers, numpy,
#                                             pyyaml, tqdm; a CKPT without tokenizer_config.json
#                                             takes TOKENIZER_CONFIG=path (symlinked in a shadow dir)
#   bench/llamacpp.sh serve DIR GGUF PORT      start llama-server in the background (log: $LOG,
#                                             default llamacpp-server.log), wait for /health, print
#                                             its PID as stdout's last line (progress goes to stderr)
# Serve settings: NP slots (256) x per-slot context = CTX (262144) total, so 1024 tokens a slot;
# EXTRA_ARGS are appended. Example:
#   bench/llamacpp.sh build .dev/c/llamacpp.tar.xz /tmp/llama.cpp
#   TOKENIZER_CONFIG=llama3-tokenizer_config.json bench/llamacpp.sh convert /tmp/llama.cpp CKPT /tmp/x.gguf
#   PID=$(bench/llamacpp.sh serve /tmp/llama.cpp /tmp/x.gguf 8012); ...; kill $PID
set -euo pipefail
export PATH=/usr/local/cuda/bin:$PATH
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

usage() { sed -n '2,/^set /p' "$0" | grep '^#' >&2; exit 2; }
mode=${1:-}
[ $# -ge 1 ] && shift

case "$mode" in
build)
  [ $# -eq 2 ] || usage
  TARBALL=$1 DIR=$2
  if [ -x "$DIR/build/bin/llama-server" ]; then
    echo "llama-server already built: $DIR/build/bin/llama-server" >&2
    exit 0
  fi
  if [ ! -f "$DIR/CMakeLists.txt" ]; then
    mkdir -p "$DIR"
    tar xJf "$TARBALL" -C "$DIR" --strip-components=1
  fi
  command -v nvcc > /dev/null || { echo "nvcc not found (PATH=$PATH)" >&2; exit 1; }
  t0=$(date +%s)
  # The server's web UI download fails offline; that is harmless.
  cmake -S "$DIR" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$DIR/build" --target llama-server -j "${JOBS:-16}" >&2
  [ -x "$DIR/build/bin/llama-server" ] || { echo "build finished without build/bin/llama-server" >&2; exit 1; }
  echo "llama-server build: $(( $(date +%s) - t0 )) s" >&2
  ;;
convert)
  [ $# -eq 3 ] || usage
  DIR=$1 CKPT=$2 OUT=$3
  if [ -f "$OUT" ]; then
    echo "GGUF already there: $OUT" >&2
    exit 0
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  missing=$(python3 -c '
import importlib.util as u
print(" ".join(m for m in ["torch", "transformers", "numpy", "yaml", "tqdm"] if u.find_spec(m) is None))')
  [ -z "$missing" ] || { echo "python modules missing for convert_hf_to_gguf.py: $missing" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pypath="$DIR/gguf-py"
  # conversion/base.py _create_vocab_sentencepiece imports sentencepiece before it looks for
  # tokenizer.model, and the Llama-3 fallback to the BPE vocab only catches FileNotFoundError:
  # without the package, a stub whose import succeeds lets the fallback happen.
  if ! python3 -c 'import sentencepiece' 2> /dev/null; then
    mkdir -p "$tmp/stub/sentencepiece"
    cat > "$tmp/stub/sentencepiece/__init__.py" <<'EOF'
class SentencePieceProcessor:
    def __init__(self, *a, **k):
        raise ImportError("sentencepiece stub (bench/llamacpp.sh): the real package is not installed")
EOF
    pypath="$pypath:$tmp/stub"
  fi
  src=$CKPT
  if [ ! -f "$CKPT/tokenizer_config.json" ]; then
    [ -n "${TOKENIZER_CONFIG:-}" ] || { echo "$CKPT has no tokenizer_config.json: set TOKENIZER_CONFIG" >&2; exit 1; }
    src="$tmp/ckpt"
    mkdir -p "$src"
    for f in "$CKPT"/*; do ln -s "$(realpath "$f")" "$src/"; done
    ln -s "$(realpath "$TOKENIZER_CONFIG")" "$src/tokenizer_config.json"
  fi
  partial="${OUT%.gguf}.partial.gguf"
  t0=$(date +%s)
  PYTHONPATH="$pypath${PYTHONPATH:+:$PYTHONPATH}" python3 "$DIR/convert_hf_to_gguf.py" "$src" \
    --outtype bf16 --outfile "$partial" >&2
  mv "$partial" "$OUT"
  echo "convert to GGUF: $(( $(date +%s) - t0 )) s, $(du -h "$OUT" | cut -f1)" >&2
  ;;
serve)
  [ $# -eq 3 ] || usage
  DIR=$1 GGUF=$2 PORT=$3
  LOG=${LOG:-llamacpp-server.log}
  # setsid: the server outlives this script (and the device call) until it is killed by PID.
  # shellcheck disable=SC2086
  setsid "$DIR/build/bin/llama-server" -m "$GGUF" -ngl 99 -fa on -np "${NP:-256}" -c "${CTX:-262144}" \
    --port "$PORT" ${EXTRA_ARGS:-} < /dev/null > "$LOG" 2>&1 &
  SERVER=$!
  t0=$(date +%s)
  ok=0
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then ok=1; break; fi
    kill -0 "$SERVER" 2> /dev/null || { echo "llama-server exited:" >&2; tail -30 "$LOG" >&2; exit 1; }
    sleep 1
  done
  if [ $ok -eq 0 ]; then
    echo "llama-server not healthy after 600 s:" >&2
    tail -30 "$LOG" >&2
    kill "$SERVER" 2> /dev/null || true
    exit 1
  fi
  echo "llama-server up on port $PORT after $(( $(date +%s) - t0 )) s (log $LOG)" >&2
  echo "$SERVER"
  ;;
*)
  usage
  ;;
esac
