// Skinny projections for pruneserve (see src/engine/ops/gemm.rs, which launches them and whose
// CPU path defines the product): y[t, n] = sum_k x[t, k] * w[n, k] (+ y[t, n] when accumulating)
// for T rows t, bf16 x and w, f32 products, sums and y. A batch-1 decode step is bound by reading
// the weights once. One warp per output column n: its lanes stream w's row in 16-byte vectors (8
// values), read the matching x vectors (small, cache-resident), keep one f32 sum per row t and
// reduce across the warp at the end. Needs k a multiple of 8 and 16-byte aligned rows. Only T = 1
// is instantiated: at T = 8 the x re-reads from L1 made it 1.8x slower than cuBLAS on the 8B
// shape (gemm.rs, SKINNY_ROWS).
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ void unpack(const uint4 &v, float (&f)[8]) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const float2 p = __bfloat1622float2(h[j]);
    f[2 * j] = p.x;
    f[2 * j + 1] = p.y;
  }
}

template <int T>
__device__ void skinny_gemm(const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y, int n,
                            int k, int accumulate) {
  const int col = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (col >= n) return;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)col * k);
  const uint4 *xr = reinterpret_cast<const uint4 *>(x);
  const int kv = k / 8;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; t++) acc[t] = 0.f;
#pragma unroll 4
  for (int i = lane; i < kv; i += 32) {
    float wf[8];
    unpack(__ldcs(wr + i), wf);
#pragma unroll
    for (int t = 0; t < T; t++) {
      float xf[8];
      unpack(__ldg(xr + (size_t)t * kv + i), xf);
#pragma unroll
      for (int j = 0; j < 8; j++) acc[t] = fmaf(xf[j], wf[j], acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < T; t++) {
    float v = acc[t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) {
      float *out = y + (size_t)t * n + col;
      *out = accumulate ? *out + v : v;
    }
  }
}

#define SKINNY(T)                                                                               \
  extern "C" __global__ void __launch_bounds__(256)                                             \
      skinny_gemm_##T(const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y, int n, int k,   \
                      int accumulate) {                                                         \
    skinny_gemm<T>(x, w, y, n, k, accumulate);                                                  \
  }

SKINNY(1)
