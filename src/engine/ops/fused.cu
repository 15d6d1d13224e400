// Fused decoder kernels for pruneserve (see src/engine/fused.rs and gemm.rs for the CPU
// definitions they must match). Inputs are f32 (residual stream, f32-output projections);
// outputs are f32 or bf16 (`_f32` / `_bf16` suffix), rounded once. Compiled to PTX by build.rs
// with nvcc.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ void store(float *p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

// RMSNorm of f32 rows: out = x / sqrt(mean(x^2) + eps) * alpha. One block per row; rows whose
// width is a multiple of 4 are read four floats at a time when x and alpha are 16-byte aligned.
template <typename T>
__device__ void rms_norm_to(const float *x, const float *alpha, T *out, int cols, float eps) {
  const float *row = x + (size_t)blockIdx.x * cols;
  T *dst = out + (size_t)blockIdx.x * cols;
  const bool vec = cols % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)alpha % 16 == 0;
  float sum = 0.f;
  if (vec) {
    for (int i = 4 * threadIdx.x; i < cols; i += 4 * blockDim.x) {
      const float4 v = *reinterpret_cast<const float4 *>(row + i);
      sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += row[i] * row[i];
  }
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
  if (vec) {
    for (int i = 4 * threadIdx.x; i < cols; i += 4 * blockDim.x) {
      const float4 v = *reinterpret_cast<const float4 *>(row + i);
      const float4 a = *reinterpret_cast<const float4 *>(alpha + i);
      store(dst + i, v.x * inv * a.x);
      store(dst + i + 1, v.y * inv * a.y);
      store(dst + i + 2, v.z * inv * a.z);
      store(dst + i + 3, v.w * inv * a.w);
    }
  } else {
    for (int i = threadIdx.x; i < cols; i += blockDim.x) store(dst + i, row[i] * inv * alpha[i]);
  }
}

// Rotary embedding ("rotate half") of `heads` heads taken from f32 rows of `src_cols` columns
// starting at column `col0`; `rotate == 0` copies (the values). cos/sin are [rows, hd/2].
// Grid: (rows); the block's threads stride over the row's heads * hd/2 pairs.
template <typename T>
__device__ void rope_heads(const float *src, const float *cos, const float *sin, T *out,
                           int src_cols, int col0, int heads, int hd, int rotate) {
  const int r = blockIdx.x, half = hd / 2;
  const float *row = src + (size_t)r * src_cols + col0;
  T *dst = out + (size_t)r * heads * hd;
  for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
    const int h = p / half, i = p % half;
    const float x1 = row[h * hd + i], x2 = row[h * hd + i + half];
    T *y = dst + h * hd;
    if (rotate) {
      const float c = cos[(size_t)r * half + i], s = sin[(size_t)r * half + i];
      store(y + i, x1 * c - x2 * s);
      store(y + i + half, x2 * c + x1 * s);
    } else {
      store(y + i, x1);
      store(y + i + half, x2);
    }
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// act(gate) * up for f32 rows laid out [gate (n) | up (n)]; out is [rows, n].
// Grid: (rows, column blocks of ACT_COLS); each thread takes ACT_COLS / blockDim.x columns, four
// adjacent ones at a time when n is a multiple of 4 and gu 16-byte aligned (16-byte loads).
#define ACT_COLS 1024
__device__ __forceinline__ float act_of(float g, int act) {
  return act == 0 ? silu(g) : gelu_tanh(g);
}
template <typename T>
__device__ void act_mul(const float *gu, T *out, int rows, int n, int act) {
  const int r = blockIdx.x;
  const float *g = gu + (size_t)r * 2 * n, *u = g + n;
  T *dst = out + (size_t)r * n;
  const int end = min(n, (int)(blockIdx.y + 1) * ACT_COLS);
  if (n % 4 == 0 && (uintptr_t)gu % 16 == 0) {
    for (int c = blockIdx.y * ACT_COLS + 4 * threadIdx.x; c < end; c += 4 * blockDim.x) {
      const float4 gv = *reinterpret_cast<const float4 *>(g + c);
      const float4 uv = *reinterpret_cast<const float4 *>(u + c);
      store(dst + c, act_of(gv.x, act) * uv.x);
      store(dst + c + 1, act_of(gv.y, act) * uv.y);
      store(dst + c + 2, act_of(gv.z, act) * uv.z);
      store(dst + c + 3, act_of(gv.w, act) * uv.w);
    }
    return;
  }
  for (int c = blockIdx.y * ACT_COLS + threadIdx.x; c < end; c += blockDim.x) {
    store(dst + c, act_of(g[c], act) * u[c]);
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

// Row ops launched by src/engine/ops/rows.rs (which defines them on the CPU).
// Rows `ids` of a [n, cols] table (f32 or bf16; `_f32` / `_bf16` name the table here) as f32
// rows [rows, cols]; an id at or above n gives a zero row. Grid: (rows).
template <typename T>
__device__ void gather_rows(const T *table, const uint32_t *ids, float *out, int cols, int n) {
  const uint32_t id = ids[blockIdx.x];
  float *dst = out + (size_t)blockIdx.x * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    dst[c] = id < (uint32_t)n ? (float)table[(size_t)id * cols + c] : 0.f;
  }
}

extern "C" __global__ void gather_rows_f32(const float *table, const uint32_t *ids, float *out,
                                           int cols, int n) {
  gather_rows<float>(table, ids, out, cols, n);
}
extern "C" __global__ void gather_rows_bf16(const __nv_bfloat16 *table, const uint32_t *ids,
                                            float *out, int cols, int n) {
  gather_rows<__nv_bfloat16>(table, ids, out, cols, n);
}

// y[r, c] += b[c] for f32 rows of n columns, in place (a projection's bias).
extern "C" __global__ void add_row_bias(float *y, const float *b, int n, size_t total) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    y[i] += b[i % n];
  }
}

// Splits f32 values into two bf16 terms, x ~ hi + lo (16 significant bits): hi = bf16(x),
// lo = bf16(x - hi). `out` holds the n hi values, then (when `with_lo`) the n lo values.
extern "C" __global__ void split_bf16(const float *x, __nv_bfloat16 *out, size_t n, int with_lo) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    __nv_bfloat16 hi = __float2bfloat16_rn(x[i]);
    out[i] = hi;
    if (with_lo) out[n + i] = __float2bfloat16_rn(x[i] - __bfloat162float(hi));
  }
}
