#!/usr/bin/env bash
# Times an adapter's decode kernels with and without programmatic dependent launch, beside the
# cuBLAS projections of a layer of the 8B shape (bench/lora_pdl.cu). Needs nvcc, cuBLAS and an
# sm_90 GPU. Usage: [ARCH=sm_90] bench/lora-pdl.sh
set -euo pipefail
ARCH=${ARCH:-sm_90}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PATH=/usr/local/cuda/bin:$PATH
# The engine's tree as lora.cu includes it (../attention/common.cuh).
mkdir -p "$WORK/adapters" "$WORK/attention"
cp "$ROOT/src/engine/adapters/lora.cu" "$ROOT/bench/lora_pdl.cu" "$WORK/adapters/"
cp "$ROOT/src/engine/attention/common.cuh" "$WORK/attention/"
nvcc -O3 -arch="$ARCH" -std=c++17 "$WORK/adapters/lora_pdl.cu" -lcublas -o "$WORK/lora-pdl"
"$WORK/lora-pdl"
