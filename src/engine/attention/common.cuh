// Helpers shared by the attention kernels (decode.cu, attention.cu): element conversion and
// rounding, warp reductions, and the paged cache's tokens per block.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

// Tokens per KV-cache block (the engine's block size).
#define BS 16

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void put(float *p, float v) { *p = v; }
__device__ __forceinline__ void put(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
// fp8 KV caches (OCP E4M3, scale 1): round-to-nearest-even, saturating at +-448, as candle's
// cast and vLLM's reshape_and_cache store them (src/engine/kv/fp8.rs).
__device__ __forceinline__ float to_f(__nv_fp8_e4m3 v) { return float(v); }
__device__ __forceinline__ void put(__nv_fp8_e4m3 *p, float v) { *p = __nv_fp8_e4m3(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}
