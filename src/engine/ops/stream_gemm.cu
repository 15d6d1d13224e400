// Weight-streaming projections for pruneserve (see src/engine/ops/stream_gemm.rs, which launches
// them; the CPU path of gemm.rs defines the product): y[t, n] = sum_k x[t, k] * w[n, k] (+ y[t, n]
// when accumulating) for up to 64 rows t, bf16 x and w, f32 products, sums and y.
//
// A decode step of up to 64 rows is bound by reading the weights once, and cuBLAS reaches 1.7 to
// 3.4 TB/s on the 8B shape's projections there (o: 32 column tiles for 132 multiprocessors). Here
// the work is cut stream-K fashion: the items (128-column tile, 64-wide k slice) are numbered tile
// by tile and each of the G blocks (as many as fit on the GPU at once) takes an equal run of
// them, so every multiprocessor streams weights from start to end whatever the shape. A block's
// items flow through one cp.async pipeline of STAGES slices (a 64-column x 128-k weight tile,
// 256 contiguous bytes of each weight row, and the x rows' 128-wide slice), read with ldmatrix
// into mma.sync m16n8k16 (weights as the 16-row A operand, x rows as the 8-column B operand).
// Eight warps: four 16-column slices times two halves of the slice's k, the halves summed in
// shared memory when a tile ends.
//
// A tile whose items one block covers entirely is written directly. A tile shared by several
// blocks (those whose runs overlap it) is summed deterministically: each writes its partial sums
// to its own workspace slot, counts itself in the tile's counter, and the last to arrive adds
// every partial in block order (then y when accumulating) and writes y. Which blocks share a
// tile and in what order depends only on the shape and G, never on timing, so results are
// reproducible; they differ from cuBLAS's in summation order only.
//
// Needs k a multiple of 8 and 16-byte aligned x and w; n and k need not be multiples of the tile
// (missing columns and k are loaded as zeros and not written).
#include "../attention/common.cuh"

#define TILE_N 64
#define TILE_K 128
#define WARPS 8
#define THREADS (WARPS * 32)
// 16-byte chunks in a 128-wide bf16 row.
#define CHUNKS 16

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(a));
}

// Byte offset of 16-byte chunk `ch` of row `r` in a tile of 128-wide rows: the low three bits of
// the chunk are swizzled (ch ^ r % 8) so that ldmatrix's eight rows of one chunk column fall in
// eight bank groups.
__device__ __forceinline__ int chunk_at(int r, int ch) {
  return r * (CHUNKS * 16) + ((ch ^ (r & 7)) << 4);
}

// The first item of block b's run among g blocks over `total` items (b * total < 2^31, which the
// launcher checks).
__device__ __forceinline__ int run_start(int b, int g, int total) { return b * total / g; }

template <int NB, int STAGES> struct Tiles {
  static constexpr int ROWS = 8 * NB;
  static constexpr int W_BYTES = TILE_N * TILE_K * 2;
  static constexpr int X_BYTES = ROWS * TILE_K * 2;
  static constexpr int STAGE_BYTES = W_BYTES + X_BYTES;
  // The second k half's sums, handed to the first half's warps: 4 slices x NB x 32 lanes float4.
  static constexpr int HALF_BYTES = 4 * NB * 32 * 16;
  static constexpr int SMEM = STAGES * STAGE_BYTES + HALF_BYTES;
};

// Issues the copies of item `item` (tile item / kt, k slice item % kt) into stage `s`.
template <int NB, int STAGES>
__device__ __forceinline__ void load_item(unsigned char *smem, int s, int item, int kt,
                                          const __nv_bfloat16 *x, const __nv_bfloat16 *w, int t,
                                          int n, int k) {
  using T = Tiles<NB, STAGES>;
  const int tile = item / kt, k0 = item % kt * TILE_K;
  unsigned char *ws = smem + s * T::STAGE_BYTES;
  unsigned char *xs = ws + T::W_BYTES;
#pragma unroll
  for (int c = threadIdx.x; c < TILE_N * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const int col = tile * TILE_N + r, kk = k0 + ch * 8;
    const bool valid = col < n && kk < k;
    cp_async16(ws + chunk_at(r, ch), valid ? w + (size_t)col * k + kk : w, valid);
  }
#pragma unroll
  for (int c = threadIdx.x; c < T::ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const int kk = k0 + ch * 8;
    const bool valid = r < t && kk < k;
    cp_async16(xs + chunk_at(r, ch), valid ? x + (size_t)r * k + kk : x, valid);
  }
}

// acc += this warp's 16 columns x all rows over its half of stage `s`'s 128-wide k slice.
template <int NB, int STAGES>
__device__ __forceinline__ void mma_stage(float (&acc)[NB][4], const unsigned char *smem, int s) {
  using T = Tiles<NB, STAGES>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slice = warp % 4, half = warp / 4;
  const unsigned char *ws = smem + s * T::STAGE_BYTES;
  const unsigned char *xs = ws + T::W_BYTES;
  const int j = lane >> 3;
#pragma unroll
  for (int step = 0; step < TILE_K / 32; step++) {
    const int ks = half * (TILE_K / 32) + step;
    // Matrices a0..a3: rows 0-7 / 8-15 of the 16 columns, k 0-7 / 8-15 of the step.
    uint32_t a[4];
    ldmatrix_x4(a, ws + chunk_at(slice * 16 + (lane & 7) + (j & 1) * 8, ks * 2 + (j >> 1)));
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      if (nb + 1 < NB) {
        // b0, b1 of n8 tiles nb and nb + 1: rows of x, k 0-7 / 8-15.
        uint32_t b[4];
        ldmatrix_x4(b, xs + chunk_at((nb + (j >> 1)) * 8 + (lane & 7), ks * 2 + (j & 1)));
        mma_16x8x16(acc[nb], a[0], a[1], a[2], a[3], b[0], b[1]);
        mma_16x8x16(acc[nb + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
      } else {
        uint32_t b[2];
        ldmatrix_x2(b, xs + chunk_at(nb * 8 + (lane & 7), ks * 2 + (j & 1)));
        mma_16x8x16(acc[nb], a[0], a[1], a[2], a[3], b[0], b[1]);
      }
    }
  }
}

// The block whose run holds item i: the largest c with run_start(c) <= i.
__device__ __forceinline__ int block_of(int i, int g, int total) {
  int c = (int)(((long long)(i + 1) * g - 1) / total);
  while (c > 0 && run_start(c, g, total) > i) c--;
  while (c + 1 < g && run_start(c + 1, g, total) <= i) c++;
  return c;
}

// Block c's workspace slot for its part of the tile starting at item a: 0 when its run starts
// in the tile (the tile is its first), 1 when the run started before (the tile is its last).
__device__ __forceinline__ int slot_of(int c, int a, int g, int total) {
  return 2 * c + (run_start(c, g, total) < a ? 1 : 0);
}

// A slot's float4 of n8 tile nb for thread `th` of the first k half (coalesced across threads).
template <int NB> __device__ __forceinline__ float4 *slot_at(float *partial, int slot, int nb, int th) {
  return reinterpret_cast<float4 *>(partial) + ((size_t)slot * NB + nb) * 128 + th;
}

__device__ __forceinline__ void add4(float (&a)[4], const float4 &v) {
  a[0] += v.x;
  a[1] += v.y;
  a[2] += v.z;
  a[3] += v.w;
}

// The tile's sums: the second k half's warps hand theirs to the first half's; then complete in
// `acc` (one block covered the tile) or in the partials of the blocks whose runs hold its items,
// added in block order by the last of them. The first half's warps write y.
template <int NB, int STAGES>
__device__ void finish_tile(float (&acc)[NB][4], unsigned char *smem, int tile, int kt, int g,
                            int total, float *partial, unsigned *counters, float *y, int t, int n,
                            int accumulate, int *last_flag) {
  using T = Tiles<NB, STAGES>;
  const int b = blockIdx.x, a = tile * kt, th = threadIdx.x % 128;
  const bool first_half = threadIdx.x < 128;
  float4 *halves = reinterpret_cast<float4 *>(smem + STAGES * T::STAGE_BYTES);
  if (!first_half)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
      halves[nb * 128 + th] = make_float4(acc[nb][0], acc[nb][1], acc[nb][2], acc[nb][3]);
  __syncthreads();
  if (first_half)
#pragma unroll
    for (int nb = 0; nb < NB; nb++) add4(acc[nb], halves[nb * 128 + th]);
  const int first = block_of(a, g, total), last = block_of(a + kt - 1, g, total);
  if (first != last) {
    if (first_half) {
      const int slot = slot_of(b, a, g, total);
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
        *slot_at<NB>(partial, slot, nb, th) =
            make_float4(acc[nb][0], acc[nb][1], acc[nb][2], acc[nb][3]);
      __threadfence();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned arrived = atomicAdd(counters + tile, 1u);
      *last_flag = arrived == (unsigned)(last - first);
      if (*last_flag) counters[tile] = 0;
    }
    __syncthreads();
    if (!*last_flag || !first_half) return;
    __threadfence();
    float sum[NB][4];
    for (int c = first; c <= last; c++) {
      // Blocks after the first hold the tile in slot 0 (it is the first tile of their runs).
      const int slot = c == first ? slot_of(first, a, g, total) : 2 * c;
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const float4 v = c == b ? make_float4(acc[nb][0], acc[nb][1], acc[nb][2], acc[nb][3])
                                : __ldcg(slot_at<NB>(partial, slot, nb, th));
        if (c == first) {
          sum[nb][0] = v.x;
          sum[nb][1] = v.y;
          sum[nb][2] = v.z;
          sum[nb][3] = v.w;
        } else {
          add4(sum[nb], v);
        }
      }
    }
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[nb][i] = sum[nb][i];
  }
  if (!first_half) return;
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int g8 = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int nb = 0; nb < NB; nb++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      // c0 (column g, row 2 tig), c1 (row 2 tig + 1), c2 and c3 the same 8 columns on.
      const int row = nb * 8 + 2 * tig + (i & 1);
      const int col = tile * TILE_N + slice * 16 + g8 + (i >> 1) * 8;
      if (row < t && col < n) {
        float *out = y + (size_t)row * n + col;
        *out = accumulate ? *out + acc[nb][i] : acc[nb][i];
      }
    }
}

template <int NB, int STAGES>
__device__ void stream_gemm(const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y,
                            float *partial, unsigned *counters, int t, int n, int k,
                            int accumulate) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int last_flag;
  const int kt = (k + TILE_K - 1) / TILE_K, tiles = (n + TILE_N - 1) / TILE_N;
  const int total = tiles * kt, g = gridDim.x;
  const int begin = run_start(blockIdx.x, g, total), end = run_start(blockIdx.x + 1, g, total);
  float acc[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; nb++)
#pragma unroll
    for (int i = 0; i < 4; i++) acc[nb][i] = 0.f;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (begin + s < end) load_item<NB, STAGES>(smem, s, begin + s, kt, x, w, t, n, k);
    cp_async_commit();
  }
  for (int item = begin; item < end; item++) {
    const int s = (item - begin) % STAGES;
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The stage refilled here was read in the previous iteration, which every warp has left.
    const int next = item + STAGES - 1;
    if (next < end) load_item<NB, STAGES>(smem, (next - begin) % STAGES, next, kt, x, w, t, n, k);
    cp_async_commit();
    mma_stage<NB, STAGES>(acc, smem, s);
    if ((item + 1) % kt == 0 || item + 1 == end) {
      finish_tile<NB, STAGES>(acc, smem, item / kt, kt, g, total, partial, counters, y, t, n,
                              accumulate, &last_flag);
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nb][i] = 0.f;
    }
  }
  cp_async_wait<0>();
}

#define STREAM_GEMM(NB, STAGES)                                                                 \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) stream_gemm_##NB(                    \
      const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y, float *partial,                 \
      unsigned *counters, int t, int n, int k, int accumulate) {                                \
    stream_gemm<NB, STAGES>(x, w, y, partial, counters, t, n, k, accumulate);                   \
  }

// Row tiles of 8, 16, 32 and 64 rows; stages sized to about 100 KB (two blocks a multiprocessor).
STREAM_GEMM(1, 5)
STREAM_GEMM(2, 5)
STREAM_GEMM(4, 4)
STREAM_GEMM(8, 3)
