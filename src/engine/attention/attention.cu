// Attention kernels for pruneserve besides decode (decode.cu): rope_cache, and the prefill
// kernels (see src/engine/attention/cuda.rs for how they are called and
// src/engine/attention/mod.rs for the semantics they share with the candle-ops path).
#include "common.cuh"

#define THREADS 128

// rope_cache: the rotary embedding of a decode step's packed f32 q|k|v projection rows
// [T, (heads + 2 kv_heads) * hd], with the keys and values written straight into the paged
// caches at each row's slot (skipped for slot < 0) and the queries returned [T, heads, hd]; every
// value is rounded once (queries to T, keys and values to the caches' C), as rope_heads
// (fused.cu) followed by reshape_and_cache store them.
// Grid (T, tiles), THREADS threads: block (r, y) rotates pairs y * THREADS .. of row r's
// (heads + 2 kv_heads) * hd / 2 pairs, one pair a thread (one block striding over a row's pairs
// took 9.6 us a layer at batch 1, each thread's 24 dependent loads in a row).
template <typename T, typename C>
__device__ void rope_cache(const float *qkv, const float *cos, const float *sin,
                           const int64_t *slots, C *kc, C *vc, T *q_out, int heads, int kv_heads,
                           int hd) {
  const int r = blockIdx.x, half = hd / 2, x = 16 / sizeof(C);
  const float *row = qkv + (size_t)r * (heads + 2 * kv_heads) * hd;
  const int64_t slot = slots[r];
  const int64_t block = slot / BS, off = slot % BS;
  for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < (heads + 2 * kv_heads) * half;
       p += blockDim.x * gridDim.y) {
    const int h = p / half, i = p % half;
    const float x1 = row[h * hd + i], x2 = row[h * hd + i + half];
    float y1 = x1, y2 = x2;
    if (h < heads + kv_heads) {
      const float c = cos[(size_t)r * half + i], s = sin[(size_t)r * half + i];
      y1 = x1 * c - x2 * s;
      y2 = x2 * c + x1 * s;
    }
    if (h < heads) {
      T *q = q_out + ((size_t)r * heads + h) * hd;
      put(q + i, y1);
      put(q + i + half, y2);
    } else if (slot >= 0 && h < heads + kv_heads) {
      const int kh = h - heads;
      C *k = kc + (block * kv_heads + kh) * (int64_t)(hd / x) * BS * x + off * x;
      put(k + (i / x) * BS * x + i % x, y1);
      put(k + ((i + half) / x) * BS * x + (i + half) % x, y2);
    } else if (slot >= 0) {
      const int vh = h - heads - kv_heads;
      C *v = vc + (block * kv_heads + vh) * (int64_t)hd * BS + off;
      put(v + (size_t)i * BS, y1);
      put(v + (size_t)(i + half) * BS, y2);
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rope_cache_f32(const float *qkv, const float *cos, const float *sin, const int64_t *slots,
                   float *kc, float *vc, float *q, int heads, int kv_heads, int hd) {
  rope_cache<float, float>(qkv, cos, sin, slots, kc, vc, q, heads, kv_heads, hd);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rope_cache_bf16(const float *qkv, const float *cos, const float *sin, const int64_t *slots,
                    __nv_bfloat16 *kc, __nv_bfloat16 *vc, __nv_bfloat16 *q, int heads,
                    int kv_heads, int hd) {
  rope_cache<__nv_bfloat16, __nv_bfloat16>(qkv, cos, sin, slots, kc, vc, q, heads, kv_heads, hd);
}
// fp8 caches: bf16 queries, keys and values rounded once from f32 to E4M3.
extern "C" __global__ void __launch_bounds__(THREADS)
    rope_cache_bf16_fp8(const float *qkv, const float *cos, const float *sin,
                        const int64_t *slots, __nv_fp8_e4m3 *kc, __nv_fp8_e4m3 *vc,
                        __nv_bfloat16 *q, int heads, int kv_heads, int hd) {
  rope_cache<__nv_bfloat16, __nv_fp8_e4m3>(qkv, cos, sin, slots, kc, vc, q, heads, kv_heads, hd);
}

// round_fp8: every value rounded to E4M3 (scale 1, saturating, nearest-even) and widened back,
// the values an fp8 KV pool stores (src/engine/kv/fp8.rs holds the CPU reference). Grid-stride
// over n elements.
template <typename T>
__device__ void round_fp8(const T *in, T *out, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x)
    put(out + i, to_f(__nv_fp8_e4m3(to_f(in[i]))));
}
extern "C" __global__ void __launch_bounds__(THREADS)
    round_fp8_f32(const float *in, float *out, size_t n) {
  round_fp8(in, out, n);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    round_fp8_bf16(const __nv_bfloat16 *in, __nv_bfloat16 *out, size_t n) {
  round_fp8(in, out, n);
}

// prefill_attention: fresh prompt chunks (no history: each attends causally to its own rows)
// of one step in one launch, f32 throughout (flash-attention style online softmax over key
// tiles, so no [len, len] score matrix is written). q [T, heads, hd], k/v [T, kv_heads, hd]
// are the step's packed rows; chunk c has q/k/v rows [row0, row0 + len) and writes output rows
// [out0, out0 + len) of out [*, heads * hd]. chunks: [n, 6] u32 as prefill_mma's below, of
// which it reads q_row0 (= k_row0), len and out0 (start is 0).
// Grid (tiles of R rows, heads, chunks), PREFILL_THREADS threads; R = 32 rows for hd <= 128,
// else 16 (hd <= 256, a multiple of 16).
#define PREFILL_THREADS 256

template <int R>
__device__ void prefill_attention(const float *q, const float *k, const float *v, float *out,
                                  const uint32_t *chunks, int heads, int kv_heads, int hd,
                                  int window, float scale, float softcap, float *q_s,
                                  float *kv_s, float *s_s) {
  const int tile = blockIdx.x, h = blockIdx.y, c = blockIdx.z;
  const int row0 = chunks[6 * c], len = chunks[6 * c + 1], out0 = chunks[6 * c + 4];
  const int q0 = tile * R;
  if (q0 >= len) return;
  const int kvh = h / (heads / kv_heads);
  const int ld = hd + 1;  // padded row stride in shared memory (no bank conflicts)
  const int tid = threadIdx.x;
  const int qn = min(R, len - q0);
  for (int i = tid; i < R * hd; i += PREFILL_THREADS) {
    int r = i / hd, d = i % hd;
    q_s[r * ld + d] = r < qn ? q[((size_t)(row0 + q0 + r) * heads + h) * hd + d] : 0.f;
  }
  // Score tile: thread owns rows si.. and cols sj.. (T x T with T = R / 16).
  constexpr int T = R / 16;
  const int si = (tid / 16) * T, sj = (tid % 16) * T;
  // Output: thread owns row `orow` and dims od + tpr * n.
  constexpr int tpr = PREFILL_THREADS / R;
  const int orow = tid / tpr, od = tid % tpr;
  const int per = hd / tpr;
  float o[16];
#pragma unroll
  for (int n = 0; n < 16; n++) o[n] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int q_last = q0 + qn - 1;
  for (int k0 = 0; k0 <= q_last; k0 += R) {
    if (window > 0 && k0 + R - 1 < q0 - window + 1) continue;  // the whole tile is too far back
    const int kn = min(R, len - k0);
    __syncthreads();
    for (int i = tid; i < R * hd; i += PREFILL_THREADS) {
      int r = i / hd, d = i % hd;
      kv_s[r * ld + d] = r < kn ? k[((size_t)(row0 + k0 + r) * kv_heads + kvh) * hd + d] : 0.f;
    }
    __syncthreads();
    float acc[T][T];
#pragma unroll
    for (int a = 0; a < T; a++)
#pragma unroll
      for (int b = 0; b < T; b++) acc[a][b] = 0.f;
    for (int d = 0; d < hd; d++) {
      float qa[T], kb[T];
#pragma unroll
      for (int a = 0; a < T; a++) qa[a] = q_s[(si + a) * ld + d];
#pragma unroll
      for (int b = 0; b < T; b++) kb[b] = kv_s[(sj + b) * ld + d];
#pragma unroll
      for (int a = 0; a < T; a++)
#pragma unroll
        for (int b = 0; b < T; b++) acc[a][b] += qa[a] * kb[b];
    }
#pragma unroll
    for (int a = 0; a < T; a++) {
#pragma unroll
      for (int b = 0; b < T; b++) {
        const int qp = q0 + si + a, kp = k0 + sj + b;
        float s = acc[a][b] * scale;
        if (softcap > 0.f) s = softcap * tanhf(s / softcap);
        const bool seen = kp <= qp && kp < len && (window <= 0 || qp - kp < window);
        s_s[(si + a) * 33 + sj + b] = seen ? s : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax of row `orow` by its tpr threads (consecutive lanes).
    float mx = -INFINITY;
    for (int j = od; j < R; j += tpr) mx = fmaxf(mx, s_s[orow * 33 + j]);
    for (int off = tpr / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off));
    const float m_new = fmaxf(m, mx);
    const float alpha = m_new == -INFINITY ? 1.f : __expf(m - m_new);
    float sum = 0.f;
    // Each thread exponentiates its own columns; the row's threads then read all of them.
    for (int j = od; j < R; j += tpr) {
      float p = m_new == -INFINITY ? 0.f : __expf(s_s[orow * 33 + j] - m_new);
      s_s[orow * 33 + j] = p;
      sum += p;
    }
    for (int off = tpr / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
    l = l * alpha + sum;
    m = m_new;
#pragma unroll
    for (int n = 0; n < 16; n++) o[n] *= alpha;
    __syncthreads();
    for (int i = tid; i < R * hd; i += PREFILL_THREADS) {
      int r = i / hd, d = i % hd;
      kv_s[r * ld + d] = r < kn ? v[((size_t)(row0 + k0 + r) * kv_heads + kvh) * hd + d] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < R; j++) {
      const float p = s_s[orow * 33 + j];
#pragma unroll
      for (int n = 0; n < 16; n++)
        if (n < per) o[n] += p * kv_s[j * ld + od + tpr * n];
    }
  }
  if (orow < qn) {
    float *dst = out + ((size_t)(out0 + q0 + orow) * heads + h) * hd;
#pragma unroll
    for (int n = 0; n < 16; n++)
      if (n < per) dst[od + tpr * n] = l > 0.f ? o[n] / l : 0.f;
  }
}

extern "C" __global__ void __launch_bounds__(PREFILL_THREADS)
    prefill_attention_f32(const float *q, const float *k, const float *v, float *out,
                          const uint32_t *chunks, int heads, int kv_heads, int hd, int window,
                          float scale, float softcap) {
  // Row tiles padded by one float: 32 * (128 + 1) also holds 16 * (256 + 1).
  __shared__ float q_s[32 * (128 + 1)];
  __shared__ float kv_s[32 * (128 + 1)];
  __shared__ float s_s[32 * 33];
  if (hd <= 128) {
    prefill_attention<32>(q, k, v, out, chunks, heads, kv_heads, hd, window, scale, softcap, q_s,
                          kv_s, s_s);
  } else {
    prefill_attention<16>(q, k, v, out, chunks, heads, kv_heads, hd, window, scale, softcap, q_s,
                          kv_s, s_s);
  }
}

// prefill_mma: the tensor-core prefill attention (mma.sync m16n8k16, bf16 inputs, f32
// accumulation, online softmax; flash-attention 2's structure). A block of 4 warps serves 64
// query rows of one head of one chunk, each warp 16 rows. Chunk c's query i (row q_row0 + i of
// q, absolute position start + i) attends causally to keys 0 ..= start + i, which are rows
// k_row0 + j of k/v (a fresh chunk: its own rows, start 0; a continued chunk: its gathered
// history and itself).
// Exact chunks take every product as three bf16 terms (hi·hi + hi·lo + lo·hi, x = hi + lo: 16
// significant bits, the compensated GEMMs' precision); the others one (inputs rounded to bf16).
// chunks: [n, 6] u32 (q_row0, len, k_row0, start, out0, exact). q [*, heads, hd] and out
// [*, heads * hd] are f32; k and v are [*, kv_heads, hd] as bf16 terms (split_bf16 in fused.cu:
// the hi values, then at + kv_len the lo values, which only exact chunks read); hd <= D, a
// multiple of 16.
// Key and value tiles of BC rows are copied to shared memory row-major with cp.async (two
// tiles in flight for one-term chunks: the next is copied while this one is multiplied) and
// read as fragments with ldmatrix (values transposed by ldmatrix.trans). The queries' fragments
// of one-term chunks stay in registers for D <= 128, where their staging tile is then reused by
// the key tiles (exact chunks, with twice the fragments, read theirs from shared memory).
// Grid (tiles of 64 query rows, heads, chunks), 128 threads, dynamic shared memory
// MmaTiles<D, BC, EXACT>::BYTES (the host's mma_smem_bytes in cuda.rs computes the same).
#define MMA_WARPS 4
#define MMA_ROWS (16 * MMA_WARPS)

// The rounding rests of two floats as bf16x2 (pack_bf16, common.cuh, packs the rounded values).
__device__ __forceinline__ uint32_t pack_rest(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return pack_bf16(a - __low2float(v), b - __high2float(v));
}

// Four 8x8 bf16 matrices from shared memory: thread t gives the address of row t % 8 of matrix
// t / 8; r[m] gets matrix m's row lane / 4, columns 2 (lane % 4), +1 (TRANS: that column's rows).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16 *p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// Shared-memory layout (bf16 elements) of one instantiation: the query tile's terms, then
// STAGES key|value tiles of TERMS terms each; rows padded by 8 elements, so ldmatrix's eight
// 16-byte rows fall in distinct banks.
template <int D, int BC, bool EXACT> struct MmaTiles {
  static constexpr int LD = D + 8, TERMS = EXACT ? 2 : 1, STAGES = EXACT ? 1 : 2;
  static constexpr bool Q_IN_REGS = D <= 128 && !EXACT;
  static constexpr int Q_TERM = MMA_ROWS * LD, KV_TERM = BC * LD;
  static constexpr int STAGE = 2 * TERMS * KV_TERM;
  static constexpr int Q_ELEMS = TERMS * Q_TERM, TILES_ELEMS = STAGES * STAGE;
  // With the queries in registers their tile is read before the first key tile is written.
  static constexpr int TILES_AT = Q_IN_REGS ? 0 : Q_ELEMS;
  static constexpr int ELEMS =
      Q_IN_REGS ? (Q_ELEMS > TILES_ELEMS ? Q_ELEMS : TILES_ELEMS) : Q_ELEMS + TILES_ELEMS;
  static constexpr int BYTES = 2 * ELEMS;
};

// c += a·b: one bf16 product, or for exact ones three (a·b + a·b_lo + a_lo·b).
template <bool EXACT>
__device__ __forceinline__ void mma_terms(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&a_lo)[4], uint32_t b0, uint32_t b1,
                                          uint32_t b0_lo, uint32_t b1_lo) {
  mma_16x8x16(c, a[0], a[1], a[2], a[3], b0, b1);
  if (EXACT) {
    mma_16x8x16(c, a[0], a[1], a[2], a[3], b0_lo, b1_lo);
    mma_16x8x16(c, a_lo[0], a_lo[1], a_lo[2], a_lo[3], b0, b1);
  }
}

// Copies keys and values k0 .. k0 + BC - 1 (zeros past `last` and past hd) into tile `tile`.
template <int D, int BC, bool EXACT>
__device__ __forceinline__ void prefill_load_tile(__nv_bfloat16 *tile,
                                                  const __nv_bfloat16 *k,
                                                  const __nv_bfloat16 *v, size_t kv_len,
                                                  int k_row0, int k0, int last, int kv_heads,
                                                  int kvh, int hd) {
  typedef MmaTiles<D, BC, EXACT> T;
  for (int i = threadIdx.x; i < BC * D / 8; i += 32 * MMA_WARPS) {
    const int r = i / (D / 8), d = i % (D / 8) * 8;
    const bool in = k0 + r <= last && d < hd;
    const size_t at = in ? ((size_t)(k_row0 + k0 + r) * kv_heads + kvh) * hd + d : 0;
#pragma unroll
    for (int t = 0; t < T::TERMS; t++) {
      cp_async16(tile + t * T::KV_TERM + r * T::LD + d, k + t * kv_len + at, in);
      cp_async16(tile + (T::TERMS + t) * T::KV_TERM + r * T::LD + d, v + t * kv_len + at, in);
    }
  }
}

// The A fragments of query rows warp * 16 .. + 15, dims kk * 16 .. + 15 (hi, and lo if EXACT).
template <int D, int BC, bool EXACT>
__device__ __forceinline__ void prefill_q_frag(uint32_t (&a)[4], uint32_t (&al)[4],
                                               const __nv_bfloat16 *q_s, int kk) {
  typedef MmaTiles<D, BC, EXACT> T;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const __nv_bfloat16 *p =
      q_s + (warp * 16 + lane % 8 + (lane / 8 % 2) * 8) * T::LD + kk * 16 + (lane / 16) * 8;
  ldmatrix_x4<false>(a, p);
  if (EXACT) ldmatrix_x4<false>(al, p + T::Q_TERM);
}

template <int D, int BC, bool EXACT>
__device__ void prefill_mma(const float *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                            size_t kv_len, float *out, const uint32_t *ch, int heads,
                            int kv_heads, int hd, int window, float scale, float softcap,
                            __nv_bfloat16 *smem) {
  typedef MmaTiles<D, BC, EXACT> T;
  constexpr int LD = T::LD;
  __nv_bfloat16 *q_s = smem, *tiles = smem + T::TILES_AT;
  const int q_row0 = ch[0], len = ch[1], k_row0 = ch[2], start = ch[3], out0 = ch[4];
  const int h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int q0 = blockIdx.x * MMA_ROWS;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  // The query tile's terms, four values a thread and load.
  for (int i = tid; i < MMA_ROWS * D / 4; i += 32 * MMA_WARPS) {
    const int r = i / (D / 4), d = i % (D / 4) * 4;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (q0 + r < len && d < hd)
      x = *reinterpret_cast<const float4 *>(q + ((size_t)(q_row0 + q0 + r) * heads + h) * hd + d);
    uint2 hi = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    *reinterpret_cast<uint2 *>(q_s + r * LD + d) = hi;
    if (EXACT)
      *reinterpret_cast<uint2 *>(q_s + T::Q_TERM + r * LD + d) =
          make_uint2(pack_rest(x.x, x.y), pack_rest(x.z, x.w));
  }
  __syncthreads();
  uint32_t qf[T::Q_IN_REGS ? D / 16 : 1][4], qfl[T::Q_IN_REGS && EXACT ? D / 16 : 1][4];
  if (T::Q_IN_REGS) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
      prefill_q_frag<D, BC, EXACT>(qf[T::Q_IN_REGS ? kk : 0], qfl[T::Q_IN_REGS && EXACT ? kk : 0],
                                   q_s, kk);
    __syncthreads();  // the key tiles reuse the query tile's memory
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  // This thread's two query rows (absolute positions) and the block's first and last ones.
  const int wq = q0 + warp * 16 + g;
  const int pos[2] = {start + wq, start + wq + 8};
  const int last = start + min(q0 + MMA_ROWS, len) - 1;
  const int first = window > 0 ? max(0, start + q0 - window + 1) / BC * BC : 0;
  prefill_load_tile<D, BC, EXACT>(tiles, k, v, kv_len, k_row0, first, last, kv_heads, kvh, hd);
  cp_async_commit();
  for (int k0 = first, it = 0; k0 <= last; k0 += BC, it++) {
    const bool more = k0 + BC <= last;
    if (T::STAGES == 2) {
      if (more)
        prefill_load_tile<D, BC, EXACT>(tiles + ((it + 1) % 2) * T::STAGE, k, v, kv_len, k_row0,
                                        k0 + BC, last, kv_heads, kvh, hd);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16 *k_s = tiles + (T::STAGES == 2 ? it % 2 : 0) * T::STAGE;
    const __nv_bfloat16 *v_s = k_s + T::TERMS * T::KV_TERM;
    // S = Q Kᵀ for this warp's 16 rows and the tile's BC keys; ldmatrix gives key n-tiles j,
    // j + 1 (b0, b1 each) in one load.
    float s[BC / 8][4];
#pragma unroll
    for (int j = 0; j < BC / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      uint32_t a[4], al[4] = {0, 0, 0, 0};
      if (T::Q_IN_REGS) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          a[e] = qf[T::Q_IN_REGS ? kk : 0][e];
          if (EXACT) al[e] = qfl[T::Q_IN_REGS && EXACT ? kk : 0][e];
        }
      } else {
        prefill_q_frag<D, BC, EXACT>(a, al, q_s, kk);
      }
#pragma unroll
      for (int j = 0; j < BC / 8; j += 2) {
        const __nv_bfloat16 *kp =
            k_s + ((j + lane / 16) * 8 + lane % 8) * LD + kk * 16 + (lane / 8 % 2) * 8;
        uint32_t b[4], bl[4] = {0, 0, 0, 0};
        ldmatrix_x4<false>(b, kp);
        if (EXACT) ldmatrix_x4<false>(bl, kp + T::KV_TERM);
        mma_terms<EXACT>(s[j], a, al, b[0], b[1], bl[0], bl[1]);
        mma_terms<EXACT>(s[j + 1], a, al, b[2], b[3], bl[2], bl[3]);
      }
    }
    // Scale, cap and mask; the online softmax of rows g and g + 8 (a row's 4 lanes share it).
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BC / 8; j++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int kp = k0 + j * 8 + tig * 2 + (e & 1), qp = pos[e / 2];
        float x = s[j][e] * scale;
        if (softcap > 0.f) x = softcap * tanhf(x / softcap);
        const bool seen = kp <= qp && (window <= 0 || qp - kp < window);
        s[j][e] = seen ? x : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = EXACT ? expf(m[r] - m_use) : __expf(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BC / 8; j++) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; e++) {
          s[j][e] = EXACT ? expf(s[j][e] - m_use) : __expf(s[j][e] - m_use);
          sum += s[j][e];
        }
      }
      l[r] = l[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    }
    // O += P V: P's accumulators of two key n-tiles are the A fragment of 16 keys; ldmatrix.trans
    // gives value dim tiles n, n + 1 (b0, b1 each) of those keys in one load.
#pragma unroll
    for (int kc = 0; kc < BC / 16; kc++) {
      const float *p0 = s[2 * kc], *p1 = s[2 * kc + 1];
      uint32_t a[4] = {pack_bf16(p0[0], p0[1]), pack_bf16(p0[2], p0[3]), pack_bf16(p1[0], p1[1]),
                       pack_bf16(p1[2], p1[3])};
      uint32_t al[4] = {0, 0, 0, 0};
      if (EXACT) {
        al[0] = pack_rest(p0[0], p0[1]), al[1] = pack_rest(p0[2], p0[3]),
        al[2] = pack_rest(p1[0], p1[1]), al[3] = pack_rest(p1[2], p1[3]);
      }
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        const __nv_bfloat16 *vp =
            v_s + (kc * 16 + (lane / 8 % 2) * 8 + lane % 8) * LD + (n + lane / 16) * 8;
        uint32_t b[4], bl[4] = {0, 0, 0, 0};
        ldmatrix_x4<true>(b, vp);
        if (EXACT) ldmatrix_x4<true>(bl, vp + T::KV_TERM);
        mma_terms<EXACT>(o[n], a, al, b[0], b[1], bl[0], bl[1]);
        mma_terms<EXACT>(o[n + 1], a, al, b[2], b[3], bl[2], bl[3]);
      }
    }
    __syncthreads();  // this tile's memory is the one the next copy but one writes
    if (T::STAGES == 1 && more) {
      prefill_load_tile<D, BC, EXACT>(tiles, k, v, kv_len, k_row0, k0 + BC, last, kv_heads, kvh,
                                      hd);
      cp_async_commit();
    }
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = wq + 8 * r;
    if (row >= len) continue;
    float *dst = out + ((size_t)(out0 + row) * heads + h) * hd;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      const int d = n * 8 + tig * 2;
      if (d < hd) *reinterpret_cast<float2 *>(dst + d) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
  }
}

// One kernel per kind of chunk, so that neither takes the other's registers: prefill_mma_d{D}
// serves one-term chunks and prefill_mma_exact_d{D} exact ones; each skips the other kind's
// chunks of the table.
#define PREFILL_MMA(NAME, EXACT, D, BC)                                                        \
  extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS)                                 \
      NAME##_d##D(const float *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,              \
                  size_t kv_len, float *out, const uint32_t *chunks, int heads, int kv_heads,  \
                  int hd, int window, float scale, float softcap) {                            \
    extern __shared__ __align__(16) unsigned char smem_raw[];                                  \
    __nv_bfloat16 *smem = reinterpret_cast<__nv_bfloat16 *>(smem_raw);                         \
    const uint32_t *ch = chunks + 6 * blockIdx.z;                                              \
    if ((int)(blockIdx.x * MMA_ROWS) >= (int)ch[1] || (ch[5] != 0) != EXACT) return;           \
    prefill_mma<D, BC, EXACT>(q, k, v, kv_len, out, ch, heads, kv_heads, hd, window, scale,    \
                              softcap, smem);                                                  \
  }
#define PREFILL_MMA_SHAPES(NAME, EXACT)                                                        \
  PREFILL_MMA(NAME, EXACT, 64, 64)                                                             \
  PREFILL_MMA(NAME, EXACT, 128, 64)                                                            \
  PREFILL_MMA(NAME, EXACT, 256, 32)
PREFILL_MMA_SHAPES(prefill_mma, false)
PREFILL_MMA_SHAPES(prefill_mma_exact, true)
