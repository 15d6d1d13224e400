// The decode attention kernels (see src/engine/attention/cuda.rs for how they are called and
// src/engine/attention/mod.rs for the semantics they share with the candle-ops path): one query
// token per sequence against its paged KV history, grouped-query aware (a thread block serves
// one (kv head, sequence, partition) and every query head of that kv head's group, so each key
// and value is read from memory once per group). Scores, softmax and sums are f32. The caches
// have vLLM's layout:
//   keys   [blocks, kv_heads, head_dim / X, block_size, X]   (X = 16 bytes of elements)
//   values [blocks, kv_heads, head_dim, block_size]
// A sequence longer than one partition is split over blocks whose partial results
// (unnormalized sums, max, sum of exponentials) are merged by paged_decode_combine.
// An fp8 cache (E4M3, scale 1; X = 16 elements a vector) is read by the same kernels with bf16
// queries and outputs (the `_bf16_fp8` and `_fp8` instantiations).
// - paged_decode_mma (in decode_mma.cuh, instantiated here; bf16 and fp8 caches, head sizes 64
//   and 128, and 256 for groups up to 4; the default): paged_decode_split's walk with both
//   products on tensor cores, each warp's blocks staged in shared memory by cp.async
//   (`_direct`, PRUNESERVE_DECODE_KERNEL=mma-direct: loaded straight to registers).
// - paged_decode_split (the same shapes; PRUNESERVE_DECODE_KERNEL=scalar): each warp keeps its
//   own online softmax over its KV blocks of the partition, loading a block's keys and values
//   together before it uses either; the warps merge at the end. Partitions of `part` tokens (a
//   multiple of BS).
// - paged_decode (f32, and the other bf16 shapes up to head size 256): partitions of PART
//   tokens; the block's warps write all scores to shared memory, then one softmax, then the
//   values.
#include "common.cuh"

#define PART 128
#define THREADS 128

// q [seqs, heads, hd]; out [seqs, heads, hd] (single partition) or the partial buffers
// part_out [seqs, heads, parts, hd], part_max / part_sum [seqs, heads, parts].
// Grid (kv_heads, seqs, parts), THREADS threads. `window` 0: none; `softcap` 0: none.
// MAX_G: query heads per kv head (4 or 8), MAX_HD: head_dim bound (64, 128 or 256); the
// instantiations are sized for them so that small groups and heads keep occupancy high.
template <typename T, typename C, int MAX_G, int MAX_HD>
__device__ void paged_decode(const T *q, const C *kc, const C *vc, const uint32_t *tables,
                             const uint32_t *ctx_lens, T *out, float *part_out,
                             float *part_max, float *part_sum, int heads, int kv_heads, int hd,
                             int max_blocks, int window, float scale, float softcap) {
  constexpr int X = 16 / sizeof(C);
  const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const int G = heads / kv_heads;
  const int ctx = ctx_lens[seq];
  const int first = window > 0 ? max(0, ctx - window) : 0;
  const int p_start = part * PART;
  const int p_end = min(ctx, p_start + PART);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = THREADS / 32;
  __shared__ float q_s[MAX_G * MAX_HD];
  __shared__ float s_s[MAX_G * PART];
  __shared__ float m_s[MAX_G], l_s[MAX_G];
  const size_t head0 = (size_t)seq * heads + (size_t)kvh * G;
  if (p_start >= p_end || p_end <= first) {
    // Nothing of this sequence in this partition: an empty partial result (a single partition
    // always holds the query's own token, so this is never the final output).
    if (parts == 1) return;
    for (int i = threadIdx.x; i < G * hd; i += THREADS) {
      int g = i / hd, d = i % hd;
      part_out[((head0 + g) * parts + part) * hd + d] = 0.f;
    }
    if (threadIdx.x < G) {
      part_max[(head0 + threadIdx.x) * parts + part] = -INFINITY;
      part_sum[(head0 + threadIdx.x) * parts + part] = 0.f;
    }
    return;
  }
  for (int i = threadIdx.x; i < G * hd; i += THREADS) q_s[i] = to_f(q[head0 * hd + i]);
  __syncthreads();

  // Scores: a warp takes a whole KV block; lane reads 16-byte vectors i = lane + 32k, which
  // hold X dims (slab i / BS) of token i % BS = lane % BS.
  const int vecs = (hd / X) * BS;
  const size_t block_stride = (size_t)kv_heads * hd * BS;
  for (int blk = p_start / BS + warp; blk * BS < p_end; blk += nwarps) {
    const size_t phys = tables[(size_t)seq * max_blocks + blk];
    const C *kb = kc + phys * block_stride + (size_t)kvh * hd * BS;
    float acc[MAX_G];
#pragma unroll
    for (int g = 0; g < MAX_G; g++) acc[g] = 0.f;
    for (int i = lane; i < vecs; i += 32) {
      const int slab = i / BS;
      C k[X];
      *reinterpret_cast<int4 *>(k) = *reinterpret_cast<const int4 *>(kb + (size_t)i * X);
#pragma unroll
      for (int e = 0; e < X; e++) {
        const float kv = to_f(k[e]);
#pragma unroll
        for (int g = 0; g < MAX_G; g++)
          if (g < G) acc[g] += q_s[g * hd + slab * X + e] * kv;
      }
    }
    for (int o = BS; o < 32; o <<= 1) {
#pragma unroll
      for (int g = 0; g < MAX_G; g++) acc[g] += __shfl_xor_sync(0xffffffff, acc[g], o);
    }
    if (lane < BS) {
      const int t = blk * BS + lane;
      if (t < p_end) {
        for (int g = 0; g < G; g++) {
          float s = acc[g] * scale;
          if (softcap > 0.f) s = softcap * tanhf(s / softcap);
          s_s[g * PART + (t - p_start)] = t >= first ? s : -INFINITY;
        }
      }
    }
  }
  __syncthreads();

  // Softmax pieces per query head: max, then exp in place, then the sum.
  const int n = p_end - p_start;
  for (int g = warp; g < G; g += nwarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, s_s[g * PART + t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < n; t += 32) {
      float p = m == -INFINITY ? 0.f : __expf(s_s[g * PART + t] - m);
      s_s[g * PART + t] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      m_s[g] = m;
      l_s[g] = l;
    }
  }
  __syncthreads();

  // Values: warp w takes the partition's KV blocks w, w + nwarps, ...; lane owns dims
  // d = lane + 32k, whose BS values in a block are contiguous. Warps' sums meet in o_s.
  __shared__ float o_s[THREADS / 32][MAX_G * MAX_HD];
  {
    float acc[MAX_G][MAX_HD / 32];
#pragma unroll
    for (int g = 0; g < MAX_G; g++)
#pragma unroll
      for (int k = 0; k < MAX_HD / 32; k++) acc[g][k] = 0.f;
    for (int blk = p_start / BS + warp; blk * BS < p_end; blk += nwarps) {
      const size_t phys = tables[(size_t)seq * max_blocks + blk];
      const C *vbase = vc + phys * block_stride + (size_t)kvh * hd * BS;
      const int t0 = blk * BS;
#pragma unroll
      for (int k = 0; k < MAX_HD / 32; k++) {
        const int d = lane + 32 * k;
        if (d >= hd) break;
        const int4 *vb = reinterpret_cast<const int4 *>(vbase + (size_t)d * BS);
        C vals[BS];
#pragma unroll
        for (int c = 0; c < BS * (int)sizeof(C) / 16; c++)
          reinterpret_cast<int4 *>(vals)[c] = vb[c];
#pragma unroll
        for (int b = 0; b < BS; b++) {
          const int t = t0 + b;
          if (t >= p_end) break;
          const float v = to_f(vals[b]);
#pragma unroll
          for (int g = 0; g < MAX_G; g++)
            if (g < G) acc[g][k] += s_s[g * PART + (t - p_start)] * v;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; g++)
#pragma unroll
      for (int k = 0; k < MAX_HD / 32; k++) {
        const int d = lane + 32 * k;
        if (g < G && d < hd) o_s[warp][g * hd + d] = acc[g][k];
      }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * hd; i += THREADS) {
    const int g = i / hd, d = i % hd;
    float acc = 0.f;
    for (int w = 0; w < nwarps; w++) acc += o_s[w][i];
    if (parts == 1) {
      put(out + (head0 + g) * hd + d, l_s[g] > 0.f ? acc / l_s[g] : 0.f);
    } else {
      part_out[((head0 + g) * parts + part) * hd + d] = acc;
    }
  }
  if (parts > 1 && threadIdx.x < G) {
    part_max[(head0 + threadIdx.x) * parts + part] = m_s[threadIdx.x];
    part_sum[(head0 + threadIdx.x) * parts + part] = l_s[threadIdx.x];
  }
}

// Merges the partitions of paged_decode. Grid (heads, seqs), THREADS threads.
template <typename T>
__device__ void paged_decode_combine(const float *part_out, const float *part_max,
                                     const float *part_sum, T *out, int heads, int hd,
                                     int parts) {
  const size_t head = (size_t)blockIdx.y * heads + blockIdx.x;
  float m = -INFINITY;
  for (int p = 0; p < parts; p++) m = fmaxf(m, part_max[head * parts + p]);
  float l = 0.f;
  for (int p = 0; p < parts; p++) {
    float mp = part_max[head * parts + p];
    if (mp != -INFINITY) l += part_sum[head * parts + p] * __expf(mp - m);
  }
  for (int d = threadIdx.x; d < hd; d += THREADS) {
    float acc = 0.f;
    for (int p = 0; p < parts; p++) {
      float mp = part_max[head * parts + p];
      if (mp != -INFINITY) acc += part_out[(head * parts + p) * hd + d] * __expf(mp - m);
    }
    put(out + head * hd + d, l > 0.f ? acc / l : 0.f);
  }
}

#define DECODE(SUFFIX, T, C, G, HD)                                                             \
  extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_##SUFFIX##_g##G##_d##HD(  \
      const T *q, const C *kc, const C *vc, const uint32_t *tables, const uint32_t *ctx_lens,  \
      T *out, float *part_out, float *part_max, float *part_sum, int heads, int kv_heads,      \
      int hd, int max_blocks, int window, float scale, float softcap) {                        \
    paged_decode<T, C, G, HD>(q, kc, vc, tables, ctx_lens, out, part_out, part_max, part_sum, \
                              heads, kv_heads, hd, max_blocks, window, scale, softcap);        \
  }

#define INSTANTIATE(SUFFIX, T, C)                                                               \
  DECODE(SUFFIX, T, C, 4, 64)                                                                   \
  DECODE(SUFFIX, T, C, 4, 128)                                                                  \
  DECODE(SUFFIX, T, C, 4, 256)                                                                  \
  DECODE(SUFFIX, T, C, 8, 64)                                                                   \
  DECODE(SUFFIX, T, C, 8, 128)                                                                  \
  DECODE(SUFFIX, T, C, 8, 256)

#define COMBINE(SUFFIX, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_combine_##SUFFIX(        \
      const float *part_out, const float *part_max, const float *part_sum, T *out, int heads, \
      int hd, int parts) {                                                                      \
    paged_decode_combine<T>(part_out, part_max, part_sum, out, heads, hd, parts);              \
  }

INSTANTIATE(f32, float, float)
INSTANTIATE(bf16, __nv_bfloat16, __nv_bfloat16)
INSTANTIATE(bf16_fp8, __nv_bfloat16, __nv_fp8_e4m3)
COMBINE(f32, float)
COMBINE(bf16, __nv_bfloat16)

// Split-style kernels' shared pieces. A partition holding no token of its sequence (or of its
// window) writes an empty partial result (a single partition always holds the query's own
// token, so this is never the final output).
template <int HD>
__device__ void empty_partial(float *part_out, float *part_max, float *part_sum, size_t head0,
                              int G, int parts) {
  if (parts == 1) return;
  for (int i = threadIdx.x; i < G * HD; i += THREADS)
    part_out[((head0 + i / HD) * parts + blockIdx.z) * HD + i % HD] = 0.f;
  if (threadIdx.x < G) {
    part_max[(head0 + threadIdx.x) * parts + blockIdx.z] = -INFINITY;
    part_sum[(head0 + threadIdx.x) * parts + blockIdx.z] = 0.f;
  }
}

// The warps' softmax states (unnormalized sums o_s, warp w's at w * o_stride, maxima m_s, sums
// l_s; a warp that saw no block has max -inf) merged, as paged_decode_combine merges partitions:
// the output, or this partition's partial result.
template <int MAX_G, int HD>
__device__ void merge_warps(const float *o_s, int o_stride, const float (*m_s)[MAX_G],
                            const float (*l_s)[MAX_G], size_t head0, int G, __nv_bfloat16 *out,
                            float *part_out, float *part_max, float *part_sum) {
  constexpr int NW = THREADS / 32;
  const int parts = gridDim.z;
  for (int i = threadIdx.x; i < G * HD; i += THREADS) {
    const int g = i / HD, d = i % HD;
    float mm = -INFINITY;
    for (int w = 0; w < NW; w++) mm = fmaxf(mm, m_s[w][g]);
    float ll = 0.f, o = 0.f;
    for (int w = 0; w < NW; w++) {
      if (m_s[w][g] == -INFINITY) continue;
      const float f = __expf(m_s[w][g] - mm);
      ll += l_s[w][g] * f;
      o += o_s[w * o_stride + i] * f;
    }
    if (parts == 1) {
      put(out + (head0 + g) * HD + d, ll > 0.f ? o / ll : 0.f);
    } else {
      part_out[((head0 + g) * parts + blockIdx.z) * HD + d] = o;
      if (d == 0) {
        part_max[(head0 + g) * parts + blockIdx.z] = mm;
        part_sum[(head0 + g) * parts + blockIdx.z] = ll;
      }
    }
  }
}

// paged_decode_split. Grid (kv_heads, seqs, parts), THREADS threads; arguments as paged_decode's
// plus `part`, the partition's tokens.
template <typename C, int MAX_G, int HD>
__device__ void paged_decode_split(const __nv_bfloat16 *q, const C *kc, const C *vc,
                                   const uint32_t *tables,
                                   const uint32_t *ctx_lens, __nv_bfloat16 *out, float *part_out,
                                   float *part_max, float *part_sum, int heads, int kv_heads,
                                   int max_blocks, int window, float scale, float softcap,
                                   int part) {
  constexpr int X = 16 / sizeof(C), NW = THREADS / 32;
  constexpr int KVEC = (HD / X) * BS / 32;  // key vectors per lane and block
  constexpr int DPL = HD / 32;              // value dims per lane
  constexpr int VPD = BS * sizeof(C) / 16;  // vectors per value dim and block
  const int kvh = blockIdx.x, seq = blockIdx.y, parts = gridDim.z;
  const int G = heads / kv_heads;
  const int ctx = ctx_lens[seq];
  const int first = window > 0 ? max(0, ctx - window) : 0;
  const int p_start = blockIdx.z * part, p_end = min(ctx, p_start + part);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // The queries dim-major and the weights token-major, heads innermost (zero-padded to MAX_G),
  // so one 16-byte shared load serves four heads: scalar loads, one per FMA, bound the kernel.
  __shared__ __align__(16) float q_t[HD][MAX_G];
  __shared__ __align__(16) float p_s[NW][BS][MAX_G];
  __shared__ float o_s[NW][MAX_G * HD];
  __shared__ float m_s[NW][MAX_G], l_s[NW][MAX_G];
  const size_t head0 = (size_t)seq * heads + (size_t)kvh * G;
  if (p_start >= p_end || p_end <= first) {  // the empty partial result, as paged_decode
    empty_partial<HD>(part_out, part_max, part_sum, head0, G, parts);
    return;
  }
  for (int i = threadIdx.x; i < MAX_G * HD; i += THREADS) {
    const int d = i / MAX_G, g = i % MAX_G;
    q_t[d][g] = g < G ? to_f(q[(head0 + g) * HD + d]) : 0.f;
  }
  for (int i = threadIdx.x; i < NW * BS * MAX_G; i += THREADS) (&p_s[0][0][0])[i] = 0.f;
  __syncthreads();

  float m[MAX_G], l[MAX_G], acc[MAX_G][DPL];
#pragma unroll
  for (int g = 0; g < MAX_G; g++) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int k = 0; k < DPL; k++) acc[g][k] = 0.f;
  }
  const size_t block_stride = (size_t)kv_heads * HD * BS;
  // Blocks before the window's first token hold nothing; every block visited holds at least one
  // token in [first, p_end), so each running max is finite after its first block.
  for (int blk = max(p_start, first) / BS + warp; blk * BS < p_end; blk += NW) {
    const size_t at = tables[(size_t)seq * max_blocks + blk] * block_stride + (size_t)kvh * HD * BS;
    int4 k4[KVEC], v4[DPL][VPD];
#pragma unroll
    for (int j = 0; j < KVEC; j++)
      k4[j] = *reinterpret_cast<const int4 *>(kc + at + (size_t)(lane + 32 * j) * X);
#pragma unroll
    for (int k = 0; k < DPL; k++)
#pragma unroll
      for (int c = 0; c < VPD; c++)
        v4[k][c] = reinterpret_cast<const int4 *>(vc + at + (size_t)(lane + 32 * k) * BS)[c];

    // Lane holds vectors lane + 32 j: token lane % 16, dims slab (lane / 16 + 2 j) * X + e; the
    // lanes l and l ^ 16 together hold a token's whole dot product.
    float s[MAX_G];
#pragma unroll
    for (int g = 0; g < MAX_G; g++) s[g] = 0.f;
#pragma unroll
    for (int j = 0; j < KVEC; j++) {
      const C *kv = reinterpret_cast<const C *>(&k4[j]);
      const int slab = lane / 16 + 2 * j;
#pragma unroll
      for (int e = 0; e < X; e++) {
        const float x = to_f(kv[e]);
        const float4 *qv = reinterpret_cast<const float4 *>(q_t[slab * X + e]);
#pragma unroll
        for (int c = 0; c < MAX_G / 4; c++) {
          const float4 qq = qv[c];
          s[4 * c] += qq.x * x;
          s[4 * c + 1] += qq.y * x;
          s[4 * c + 2] += qq.z * x;
          s[4 * c + 3] += qq.w * x;
        }
      }
    }
    const int t = blk * BS + lane % 16;
    const bool valid = t < p_end && t >= first;
#pragma unroll
    for (int g = 0; g < MAX_G; g++) {
      if (g >= G) break;
      float sc = (s[g] + __shfl_xor_sync(0xffffffff, s[g], 16)) * scale;
      if (softcap > 0.f) sc = softcap * tanhf(sc / softcap);
      sc = valid ? sc : -INFINITY;
      float mx = sc;
      for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
      const float m_new = fmaxf(m[g], mx);
      const float corr = __expf(m[g] - m_new);
      const float p = valid ? __expf(sc - m_new) : 0.f;
      float ps = p;
      for (int o = 8; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffff, ps, o);
      l[g] = l[g] * corr + ps;
      m[g] = m_new;
#pragma unroll
      for (int k = 0; k < DPL; k++) acc[g][k] *= corr;
      if (lane < BS) p_s[warp][lane][g] = p;
    }
    __syncwarp();
    // Values: lane owns dims lane + 32 k, whose BS values in the block are contiguous.
#pragma unroll
    for (int b = 0; b < BS; b++) {
      float pb[MAX_G];
#pragma unroll
      for (int c = 0; c < MAX_G / 4; c++)
        *reinterpret_cast<float4 *>(&pb[4 * c]) =
            reinterpret_cast<const float4 *>(p_s[warp][b])[c];
#pragma unroll
      for (int k = 0; k < DPL; k++) {
        const float v = to_f(reinterpret_cast<const C *>(v4[k])[b]);
#pragma unroll
        for (int g = 0; g < MAX_G; g++)
          if (g < G) acc[g][k] += pb[g] * v;
      }
    }
    __syncwarp();
  }

  // The warps' softmax states merged, as paged_decode_combine merges partitions.
#pragma unroll
  for (int g = 0; g < MAX_G; g++) {
    if (g >= G) break;
#pragma unroll
    for (int k = 0; k < DPL; k++) o_s[warp][g * HD + lane + 32 * k] = acc[g][k];
    if (lane == 0) {
      m_s[warp][g] = m[g];
      l_s[warp][g] = l[g];
    }
  }
  __syncthreads();
  merge_warps<MAX_G, HD>(&o_s[0][0], MAX_G * HD, m_s, l_s, head0, G, out, part_out, part_max,
                         part_sum);
}

#include "decode_mma.cuh"

// The split-walk kernels (paged_decode_split, paged_decode_mma) per cache type and shape; `FN`
// names a macro giving the instantiation for (C, G, HD) (paged_decode_mma's staged in shared
// memory or loading straight to registers).
#define SPLIT(C, G, HD) paged_decode_split<C, G, HD>
#define MMA(C, G, HD) paged_decode_mma<C, G, HD, true>
#define MMA_DIRECT(C, G, HD) paged_decode_mma<C, G, HD, false>
#define WALK(NAME, FN, C, G, HD)                                                                \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME##_g##G##_d##HD(                    \
      const __nv_bfloat16 *q, const C *kc, const C *vc, const uint32_t *tables,                \
      const uint32_t *ctx_lens, __nv_bfloat16 *out, float *part_out, float *part_max,          \
      float *part_sum, int heads, int kv_heads, int max_blocks, int window, float scale,       \
      float softcap, int part) {                                                                \
    FN(C, G, HD)(q, kc, vc, tables, ctx_lens, out, part_out, part_max, part_sum, heads,        \
                 kv_heads, max_blocks, window, scale, softcap, part);                           \
  }
#define WALK_SHAPES(NAME, FN, C)                                                                \
  WALK(NAME, FN, C, 4, 64)                                                                      \
  WALK(NAME, FN, C, 4, 128)                                                                     \
  WALK(NAME, FN, C, 4, 256)                                                                     \
  WALK(NAME, FN, C, 8, 64)                                                                      \
  WALK(NAME, FN, C, 8, 128)
WALK_SHAPES(paged_decode_split, SPLIT, __nv_bfloat16)
WALK_SHAPES(paged_decode_split_fp8, SPLIT, __nv_fp8_e4m3)
WALK_SHAPES(paged_decode_mma, MMA, __nv_bfloat16)
WALK_SHAPES(paged_decode_mma_direct, MMA_DIRECT, __nv_bfloat16)
WALK_SHAPES(paged_decode_mma_fp8, MMA, __nv_fp8_e4m3)
WALK_SHAPES(paged_decode_mma_fp8_direct, MMA_DIRECT, __nv_fp8_e4m3)
