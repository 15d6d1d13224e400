// Fused decoder kernels for pruneserve (see src/engine/fused.rs for the CPU definitions they
// must match). Inputs are f32 (residual stream, f32-output projections); outputs are f32 or
// bf16 (`_f32` / `_bf16` suffix), rounded once. Compiled to PTX by build.rs with nvcc.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ void store(float *p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

// RMSNorm of f32 rows: out = x / sqrt(mean(x^2) + eps) * alpha. One block per row.
template <typename T>
__device__ void rms_norm_to(const float *x, const float *alpha, T *out, int cols, float eps) {
  const float *row = x + (size_t)blockIdx.x * cols;
  T *dst = out + (size_t)blockIdx.x * cols;
  float sum = 0.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += row[i] * row[i];
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    int warps = (blockDim.x + 31) / 32;
    sum = lane < warps ? warp_sums[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (lane == 0) warp_sums[0] = sum;
  }
  __syncthreads();
  float inv = rsqrtf(warp_sums[0] / cols + eps);
  for (int i = threadIdx.x; i < cols; i += blockDim.x) store(dst + i, row[i] * inv * alpha[i]);
}

// Rotary embedding ("rotate half") of `heads` heads taken from f32 rows of `src_cols` columns
// starting at column `col0`; `rotate == 0` copies (the values). cos/sin are [rows, hd/2].
// Grid: (rows, heads); block: hd/2 threads.
template <typename T>
__device__ void rope_heads(const float *src, const float *cos, const float *sin, T *out,
                           int src_cols, int col0, int heads, int hd, int rotate) {
  int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = hd / 2;
  if (i >= half) return;
  const float *x = src + (size_t)r * src_cols + col0 + (size_t)h * hd;
  T *y = out + ((size_t)r * heads + h) * hd;
  float x1 = x[i], x2 = x[i + half];
  if (rotate) {
    float c = cos[(size_t)r * half + i], s = sin[(size_t)r * half + i];
    store(y + i, x1 * c - x2 * s);
    store(y + i + half, x2 * c + x1 * s);
  } else {
    store(y + i, x1);
    store(y + i + half, x2);
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// act(gate) * up for f32 rows laid out [gate (n) | up (n)]; out is [rows, n].
template <typename T>
__device__ void act_mul(const float *gu, T *out, int rows, int n, int act) {
  size_t total = (size_t)rows * n;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (size_t)gridDim.x * blockDim.x) {
    size_t r = idx / n, c = idx % n;
    float g = gu[r * 2 * n + c], u = gu[r * 2 * n + n + c];
    store(out + idx, (act == 0 ? silu(g) : gelu_tanh(g)) * u);
  }
}

#define INSTANTIATE(SUFFIX, T)                                                                  \
  extern "C" __global__ void rms_norm_to_##SUFFIX(const float *x, const float *alpha, T *out,   \
                                                   int cols, float eps) {                       \
    rms_norm_to<T>(x, alpha, out, cols, eps);                                                   \
  }                                                                                             \
  extern "C" __global__ void rope_heads_##SUFFIX(const float *src, const float *cos,            \
                                                  const float *sin, T *out, int src_cols,       \
                                                  int col0, int heads, int hd, int rotate) {    \
    rope_heads<T>(src, cos, sin, out, src_cols, col0, heads, hd, rotate);                       \
  }                                                                                             \
  extern "C" __global__ void act_mul_##SUFFIX(const float *gu, T *out, int rows, int n,         \
                                               int act) {                                       \
    act_mul<T>(gu, out, rows, n, act);                                                          \
  }

INSTANTIATE(f32, float)
INSTANTIATE(bf16, __nv_bfloat16)
