#!/usr/bin/env bash
# Times the LoRA slot-table kernels of src/engine/adapters/lora.cu against an earlier version of
# that file in CUDA graphs (bench/lora_kernels.cu; docs/benchmarks.md, session 14). Needs nvcc
# and an sm_90 GPU (the shrink's thread-block clusters).
# Usage: OLD_CU=an-earlier-lora.cu [ARCH=sm_90] bench/lora-kernels.sh
#   e.g. git show 9047393:src/engine/adapters/lora.cu > /tmp/old-lora.cu (session 13's kernels)
set -euo pipefail
OLD_CU=${OLD_CU:?an earlier lora.cu to compare with}
ARCH=${ARCH:-sm_90}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PATH=/usr/local/cuda/bin:$PATH
sed -e 's/lora_shrink_mma/old_shrink_mma/; s/lora_expand_mma/old_expand_mma/' \
    -e 's/lora_shrink_f32/old_shrink_f32/; s/lora_shrink_bf16/old_shrink_bf16/' \
    -e 's/"C" __global__ void lora_expand(/"C" __global__ void old_expand(/' "$OLD_CU" \
    > "$WORK/old_renamed.cu"
# The engine's tree as lora.cu includes it (../attention/common.cuh).
mkdir -p "$WORK/adapters" "$WORK/attention"
mv "$WORK/old_renamed.cu" "$WORK/adapters/"
cp "$ROOT/src/engine/adapters/lora.cu" "$ROOT/bench/lora_kernels.cu" "$WORK/adapters/"
cp "$ROOT/src/engine/attention/common.cuh" "$WORK/attention/"
nvcc -O3 -arch="$ARCH" -std=c++17 "$WORK/adapters/lora_kernels.cu" -o "$WORK/lora-kernels"
"$WORK/lora-kernels"
