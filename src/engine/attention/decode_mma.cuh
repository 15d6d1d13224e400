// paged_decode_mma, the default decode attention of bf16 and fp8 caches: included by decode.cu
// after the helpers it shares with paged_decode_split (empty_partial, merge_warps, to_f) and
// instantiated there with the other split-walk kernels.
#pragma once

// paged_decode_mma (bf16 caches) and paged_decode_mma_fp8 (fp8 E4M3; head sizes 64, 128 and
// 256, groups up to 8): the split kernel's partitions and per-warp online softmax with both
// products on tensor cores (mma.sync m16n8k16, f32 accumulation): the group's queries (rows
// 0..G-1 of a 16-row tile, the rest zero) times a block's 16 keys, then the block's weights
// times its values. The split kernel spends about 13 instructions per cached value (widening, a
// shared load, four FMAs): that, not the bytes, bound it on fp8 caches (half the bytes gained
// little). bf16 caches multiply in bf16, fp8 ones in f16, where E4M3 values and bf16 queries are
// exact within f16's range: the scores are the split kernel's up to summation order. The
// attention weights are not exact in either type, so each is split into its rounded value and
// the rounded remainder (hi + lo, about 2^-17 relative in bf16): the tile's rows 0..7 carry the
// hi terms and rows 8..15, which the queries leave zero, the lo terms; their two output rows
// are summed, so the split costs no product. (Rounded to bf16 alone, the weights had taken the
// selftest's kernel error from 3.9e-3 to 5.0e-3, its limit.)
// Within a block, tokens are taken in a permuted order and so are dims within each 16, so that
// every fragment pair is one load of four values: logical (2t, 2t + 1, 2t + 8, 2t + 9) are
// physical 4t .. 4t + 3 (t < 4); logical token j of n-tile j / 8 is physical
// ((j % 8) / 2) * 4 + (j / 8) * 2 + j % 2. The products are common.cuh's mma_16x8x16.
// Each warp copies its blocks (keys and values whole) into its own shared-memory stages with
// cp.async, two blocks ahead on fp8 caches at head size 128 and one on bf16 ones, and reads its
// fragments from there; the copy of a later block runs while this one is multiplied. Loaded
// straight to registers (STAGED false, `_direct`: the kernel of session 18, kept for A/B runs),
// ptxas put the value loads after the first key products, so each block waited for two memory
// round trips: 2.60 against 3.16 TB/s on fp8 caches, 3.60 against 3.83 on bf16 (selftest
// timing, H200, docs/benchmarks.md session 19).

// Two E4M3 bytes (the lower first) widened to f16x2.
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffff), __NV_E4M3);
  return (uint32_t)h.x | ((uint32_t)h.y << 16);
}

// What the kernel needs of a cache type: four cached values in one load (`Word`), their two
// fragment halves, the packing of two floats into the product's input type and the rounding to
// it.
template <typename C> struct MmaCache;
template <> struct MmaCache<__nv_fp8_e4m3> {
  typedef uint32_t Word;
  static constexpr bool F16 = true;
  static __device__ __forceinline__ uint32_t lo(Word w) { return fp8x2_to_f16x2(w); }
  static __device__ __forceinline__ uint32_t hi(Word w) { return fp8x2_to_f16x2(w >> 16); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
  }
  static __device__ __forceinline__ float rounded(float a) { return __half2float(__float2half_rn(a)); }
};
template <> struct MmaCache<__nv_bfloat16> {
  typedef uint2 Word;
  static constexpr bool F16 = false;
  static __device__ __forceinline__ uint32_t lo(Word w) { return w.x; }
  static __device__ __forceinline__ uint32_t hi(Word w) { return w.y; }
  static __device__ __forceinline__ uint32_t pack(float a, float b) { return pack_bf16(a, b); }
  static __device__ __forceinline__ float rounded(float a) {
    return __bfloat162float(__float2bfloat16_rn(a));
  }
};

// Shared memory a warp stages its blocks in (paged_decode_mma with STAGED): one block's keys and
// values take 2 * HD * BS * sizeof(C) bytes (4 KB for fp8 at head size 128, 8 KB for bf16), two
// such stages where they fit in 8 KB a warp, one otherwise; none where one does not fit (bf16
// at head size 256, which loads straight to registers). The warps' softmax states reuse the
// region once their walks are done.
template <typename C, int HD> struct MmaStages {
  static constexpr int TENSOR = HD * BS * sizeof(C), WARP_BYTES = 8192;
  static constexpr int COUNT = 2 * TENSOR > WARP_BYTES ? 0 : 4 * TENSOR > WARP_BYTES ? 1 : 2;
  static constexpr int CHUNKS = TENSOR / 16 / 32;  // 16-byte copies a lane per tensor
};

template <typename C, int MAX_G, int HD, bool STAGED>
__device__ void paged_decode_mma(const __nv_bfloat16 *q, const C *kc, const C *vc,
                                 const uint32_t *tables, const uint32_t *ctx_lens,
                                 __nv_bfloat16 *out, float *part_out, float *part_max,
                                 float *part_sum, int heads, int kv_heads, int max_blocks,
                                 int window, float scale, float softcap, int part) {
  typedef MmaCache<C> M;
  typedef typename M::Word Word;
  typedef MmaStages<C, HD> S;
  constexpr int NW = THREADS / 32, KK = HD / 16, NT = HD / 8, X = 16 / sizeof(C);
  constexpr int STAGES = STAGED ? S::COUNT : 0;
  // A warp's region: its stages, or room for its sums alone when it loads straight to registers.
  constexpr int REGION = STAGES > 0 ? S::WARP_BYTES : MAX_G * HD * sizeof(float);
  static_assert(MAX_G * HD * sizeof(float) <= REGION, "a warp's sums fit its region");
  const int kvh = blockIdx.x, seq = blockIdx.y, parts = gridDim.z;
  const int G = heads / kv_heads;
  const int ctx = ctx_lens[seq];
  const int first = window > 0 ? max(0, ctx - window) : 0;
  const int p_start = blockIdx.z * part, p_end = min(ctx, p_start + part);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
  // Each warp's region: its stages while it walks, its unnormalized sums (o) after.
  __shared__ __align__(16) unsigned char warp_s[NW][REGION];
  __shared__ float m_s[NW][MAX_G], l_s[NW][MAX_G];
  const size_t head0 = (size_t)seq * heads + (size_t)kvh * G;
  if (p_start >= p_end || p_end <= first) {
    empty_partial<HD>(part_out, part_max, part_sum, head0, G, parts);
    return;
  }
  // Row g's query fragments a0 (logical dims 2 tig, +1 of each 16) and a2 (2 tig + 8, +9).
  uint32_t qa[KK][2];
#pragma unroll
  for (int kk = 0; kk < KK; kk++) {
    const __nv_bfloat16 *qr = q + (head0 + min(g, G - 1)) * HD + kk * 16 + tig * 4;
    const bool real = g < G;
    qa[kk][0] = real ? M::pack(to_f(qr[0]), to_f(qr[1])) : 0u;
    qa[kk][1] = real ? M::pack(to_f(qr[2]), to_f(qr[3])) : 0u;
  }
  // Row g's running max, this lane's share of its sum, and its output dims n * 8 + 2 tig, +1.
  float m = -INFINITY, l = 0.f, o[NT][2];
#pragma unroll
  for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = 0.f;
  const size_t block_stride = (size_t)kv_heads * HD * BS;
  // As in paged_decode_split, every block visited holds a token in [first, p_end): this warp's
  // are blk0, blk0 + NW, ...
  const int blk0 = max(p_start, first) / BS + warp;
  auto keys_of = [&](int blk) {
    return kc + tables[(size_t)seq * max_blocks + blk] * block_stride + (size_t)kvh * HD * BS;
  };
  // Staged: stage s holds keys then values of one block, copied by the warp's lanes with
  // cp.async (one commit group per block, empty past the walk's end).
  auto stage = [&](int s) { return reinterpret_cast<C *>(&warp_s[warp][0]) + s * 2 * HD * BS; };
  auto issue = [&](int s, int blk) {
    if (blk * BS < p_end) {
      const C *kb = keys_of(blk), *vb = vc + (kb - kc);
#pragma unroll
      for (int c = 0; c < S::CHUNKS; c++) {
        const int at = (lane + 32 * c) * X;
        cp_async16(stage(s) + at, kb + at);
        cp_async16(stage(s) + HD * BS + at, vb + at);
      }
    }
    cp_async_commit();
  };
  if constexpr (STAGES > 0) {
#pragma unroll
    for (int s = 0; s < STAGES; s++) issue(s, blk0 + s * NW);
  }
  for (int blk = blk0, i = 0; blk * BS < p_end; blk += NW, i++) {
    const C *kb, *vb;
    if constexpr (STAGES > 0) {
      cp_async_wait<STAGES - 1>();
      __syncwarp();
      kb = stage(i % STAGES);
      vb = kb + HD * BS;
    } else {
      kb = keys_of(blk);
      vb = vc + (kb - kc);
    }
    // Keys [HD / X][BS][X]: n-tile t's column g is physical token (g / 2) * 4 + 2 t + g % 2,
    // its physical dims kk * 16 + 4 tig .. + 3. Values [HD][BS]: dim n * 8 + g, physical tokens
    // 4 tig .. 4 tig + 3.
    Word kw[2][KK], vw[NT];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
      for (int kk = 0; kk < KK; kk++) {
        const int d = kk * 16 + tig * 4, tok = (g / 2) * 4 + t * 2 + g % 2;
        kw[t][kk] = *reinterpret_cast<const Word *>(kb + ((d / X) * BS + tok) * X + d % X);
      }
#pragma unroll
    for (int n = 0; n < NT; n++)
      vw[n] = *reinterpret_cast<const Word *>(vb + (size_t)(n * 8 + g) * BS + tig * 4);
    if constexpr (STAGES > 0) {
      // Every lane has its fragments of this stage before the stage takes a later block.
      __syncwarp();
      issue(i % STAGES, blk + STAGES * NW);
    }

    float sc[2][4];
#pragma unroll
    for (int t = 0; t < 2; t++) {
      sc[t][0] = sc[t][1] = sc[t][2] = sc[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KK; kk++)
        mma_16x8x16<M::F16>(sc[t], qa[kk][0], 0u, qa[kk][1], 0u, M::lo(kw[t][kk]),
                            M::hi(kw[t][kk]));
    }
    // sc[t][e]: logical token 8 t + 2 tig + e, physical 4 tig + 2 t + e.
    float mx = -INFINITY;
    bool valid[2][2];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int tok = blk * BS + tig * 4 + t * 2 + e;
        float x = sc[t][e] * scale;
        if (softcap > 0.f) x = softcap * tanhf(x / softcap);
        valid[t][e] = tok < p_end && tok >= first;
        sc[t][e] = x;
        if (valid[t][e]) mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float corr = __expf(m - m_new);
    float p[2][2];
    l *= corr;
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        p[t][e] = valid[t][e] ? __expf(sc[t][e] - m_new) : 0.f;
        l += p[t][e];
      }
    m = m_new;
    // Row g's weights rounded (hi) and row g + 8's their remainders (lo).
    float ph[2][2];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
      for (int e = 0; e < 2; e++) ph[t][e] = M::rounded(p[t][e]);
    const uint32_t pa0 = M::pack(ph[0][0], ph[0][1]), pa2 = M::pack(ph[1][0], ph[1][1]);
    const uint32_t pa1 = M::pack(p[0][0] - ph[0][0], p[0][1] - ph[0][1]),
                   pa3 = M::pack(p[1][0] - ph[1][0], p[1][1] - ph[1][1]);
#pragma unroll
    for (int n = 0; n < NT; n++) {
      float c[4] = {o[n][0] * corr, o[n][1] * corr, 0.f, 0.f};
      mma_16x8x16<M::F16>(c, pa0, pa1, pa2, pa3, M::lo(vw[n]), M::hi(vw[n]));
      o[n][0] = c[0] + c[2];
      o[n][1] = c[1] + c[3];
    }
  }
  l += __shfl_xor_sync(0xffffffff, l, 1);
  l += __shfl_xor_sync(0xffffffff, l, 2);
  // The warp's stages are done with (its last groups are empty).
  float *o_s = reinterpret_cast<float *>(&warp_s[warp][0]);
  if (g < G) {
#pragma unroll
    for (int n = 0; n < NT; n++) {
      o_s[g * HD + n * 8 + tig * 2] = o[n][0];
      o_s[g * HD + n * 8 + tig * 2 + 1] = o[n][1];
    }
    if (tig == 0) {
      m_s[warp][g] = m;
      l_s[warp][g] = l;
    }
  }
  __syncthreads();
  merge_warps<MAX_G, HD>(reinterpret_cast<const float *>(&warp_s[0][0]), REGION / 4, m_s,
                         l_s, head0, G, out, part_out, part_max, part_sum);
}
