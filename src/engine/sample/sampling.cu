// Greedy picks, prompt scores and seeded draws on the device (the draw kernel last).
// Greedy picks (see src/engine/sample/scoring.rs, whose candle-ops path defines the
// result): per f32 logits row, the argmax (lowest index on ties) and its log-softmax value,
// in one pass over the row plus one over its exponentials. out[row] = (token, logprob), the
// token as a float (exact below 2^24). Grid (rows), PICK_THREADS threads.
#include <stdint.h>

#define PICK_THREADS 1024

// The warp's largest (v, idx), lowest idx on ties, in every lane.
__device__ __forceinline__ void warp_argmax(float &v, int &idx) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffff, v, o);
    const int oi = __shfl_xor_sync(0xffffffff, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// The row's maximum (lowest index among equal maxima) and the sum of exp(x - max), block-wide
// (PICK_THREADS threads, in a fixed order: the same row gives the same values in any batch);
// valid in thread 0 only.
__device__ void max_and_sum(const float *row, int vocab, float &max, int &arg, float &sum) {
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  __shared__ float sums[32];
  float v = -INFINITY;
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += PICK_THREADS) {
    const float x = row[i];
    if (x > v) {  // strided scan: a thread's first maximum is its lowest index
      v = x;
      idx = i;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  warp_argmax(v, idx);
  if (lane == 0) {
    best_v[warp] = v;
    best_i[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    v = best_v[lane];
    idx = best_i[lane];
    warp_argmax(v, idx);
    if (lane == 0) {
      best_v[0] = v;
      best_i[0] = idx;
    }
  }
  __syncthreads();
  max = best_v[0];
  arg = best_i[0];
  float s = 0.f;
  for (int i = threadIdx.x; i < vocab; i += PICK_THREADS) s += expf(row[i] - max);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  if (lane == 0) sums[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = sums[lane];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  }
  sum = s;
}

extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    greedy_pick_f32(const float *logits, float *out, int vocab) {
  float max, sum;
  int arg;
  max_and_sum(logits + (size_t)blockIdx.x * vocab, vocab, max, arg, sum);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = (float)arg;
    out[2 * blockIdx.x + 1] = -logf(sum);
  }
}

// Prompt scoring (see score_spans in src/engine/sample/scoring.rs, whose candle-ops path defines
// the result): for logits row rows[b] and its target token targets[b], out[b] = (the target's
// log-softmax value, the argmax as a float, the argmax's log-softmax value), each x - max -
// log(sum exp(x - max)) as candle's log_softmax writes it, without the [rows, vocab] log-softmax
// in memory. Grid (scored rows), PICK_THREADS threads.
extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    score_pick_f32(const float *logits, const uint32_t *rows, const uint32_t *targets, float *out,
                   int vocab) {
  const float *row = logits + (size_t)rows[blockIdx.x] * vocab;
  float max, sum;
  int arg;
  max_and_sum(row, vocab, max, arg, sum);
  if (threadIdx.x == 0) {
    const float log_sum = logf(sum);
    out[3 * blockIdx.x] = (row[targets[blockIdx.x]] - max) - log_sum;
    out[3 * blockIdx.x + 1] = (float)arg;
    out[3 * blockIdx.x + 2] = -log_sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Seeded draws on the device (see src/engine/sample/truncation.rs, whose host code defines the
// result): per f32 logits row, with the row's uniform number u drawn on the host from the
// request's own generator, the token the host sampler would pick: weights w = exp((x - max) / T);
// top-k keeps the k best (value descending, lower id first on ties); top-p keeps the shortest such
// prefix whose mass reaches top_p of the top-k mass; min-p keeps w >= min_p; the draw walks the
// kept ids in id order until the running mass passes u times the kept mass. Masses are summed in
// 2^-40 fixed point (u64), so the result does not depend on the order of the threads' additions;
// each id's mass (a double-precision exp) is computed once, into `masses` (rows x vocab u64,
// scratch), and read by the later passes. out[row] = (token, raw logprob = x[token] -
// logsumexp(x), the sum of f32 exponentials in double). `draw_f32`: grid (rows), a block of
// DRAW_THREADS threads per row. `draw_f32_c8` (sm_90, for steps of few rows): a cluster of
// DRAW_CLUSTER blocks per row, each over its own contiguous eighth of the ids, every reduction
// taken over the cluster through distributed shared memory, so one row's passes run on eight
// multiprocessors; the same integer sums and cuts give the same token (the double-precision
// log-sum-exp is summed in another order, a difference far below f32's rounding).

#include <cooperative_groups.h>

#define DRAW_THREADS 1024
#define DRAW_WARPS (DRAW_THREADS / 32)
#define DRAW_CLUSTER 8
#define FIXED_ONE 1099511627776.0  // 2^40

// Per row, 5 doubles: u, 1 / temperature, top_p, min_p, top_k (0: all).
#define DRAW_PARAMS 5

// A float as an unsigned key with the same order.
__device__ __forceinline__ unsigned int order_key(float x) {
  const unsigned int b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long fixed_mass(float x, float max, float inv_t) {
  return (unsigned long long)(exp((double)((x - max) * inv_t)) * FIXED_ONE);
}

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The C blocks of a row: this block's rank, a barrier over all of them, and another block's
// copy of a shared variable. C = 1 is a plain block (clusters exist from sm_90 on).
template <int C> struct Rows {
  static __device__ __forceinline__ int rank() {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) return (int)cooperative_groups::this_cluster().block_rank();
#endif
    return 0;
  }
  static __device__ __forceinline__ void sync() {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }
  template <typename T> static __device__ __forceinline__ T *at(T *p, int r) {
#if __CUDA_ARCH__ >= 900
    if constexpr (C > 1) return cooperative_groups::this_cluster().map_shared_rank(p, r);
#endif
    return p;
  }
};

// Reductions over the row's blocks; every thread of every block gets the result. `slot` is a
// shared variable of this block that the others read (published, then a barrier; a second
// barrier before it is written again). Sums are taken in block order.
template <int C, typename T, typename Op>
__device__ T rows_reduce(T block_value, T *slot, Op op) {
  if constexpr (C == 1) return block_value;
  if (threadIdx.x == 0) *slot = block_value;
  Rows<C>::sync();
  T v = *Rows<C>::at(slot, 0);
  for (int r = 1; r < C; r++) v = op(v, *Rows<C>::at(slot, r));
  Rows<C>::sync();
  return v;
}

// Block-wide reductions (every thread gets the result).
__device__ float block_max(float v, float *scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[lane];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

__device__ double block_sum(double v, double *scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[lane];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long *scratch) {
  v = warp_sum_u64(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_sum_u64(scratch[threadIdx.x % 32]);
  __syncthreads();
  return v;
}

// Which ids are still candidates: key above `key`, or equal to it with id <= `last_id`.
struct Cut {
  unsigned int key;
  int last_id;
};

__device__ __forceinline__ bool passes(const Cut &c, unsigned int key, int i) {
  return key > c.key || (key == c.key && i <= c.last_id);
}

// Inclusive prefix sum of one value per thread, in thread order; every thread gets its own sum
// and `total` the block's.
__device__ unsigned long long block_scan(unsigned long long v, unsigned long long *scratch,
                                         unsigned long long &total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long n = __shfl_up_sync(0xffffffff, v, o);
    if (lane >= o) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = scratch[lane];
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long n = __shfl_up_sync(0xffffffff, w, o);
      if (lane >= o) w += n;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  total = scratch[31];
  return v + (warp > 0 ? scratch[warp - 1] : 0ull);
}

// The shared state of one row's draw in one block.
template <int C> struct DrawShared {
  float fscratch[32];
  double dscratch[32];
  // This block's histogram (read by the row's other blocks) and the row's (summed).
  unsigned long long hist[256];
  unsigned long long bins[256];
  // Chunk sums: this block's DRAW_WARPS, then the row's C * DRAW_WARPS in id order.
  unsigned long long chunk[DRAW_WARPS];
  unsigned long long chunks[C * DRAW_WARPS];
  unsigned long long scan[33];
  int found[3];
  // Published values for rows_reduce and broadcasts.
  float slot_f;
  double slot_d;
  unsigned long long slot_u;
};

// Walks in id order. The row's ids are cut into C * DRAW_WARPS contiguous chunks of chunk_len
// ids, chunk c summed by warp c % DRAW_WARPS of block c / DRAW_WARPS (a block's chunks are its
// ids [lo, hi)); a pass sums each chunk (exact integers, so in any order), then only the chunk
// where the running sum crosses the target is walked tile by tile, by its block. `A` gives an
// id's amount (0: not counted).
template <int C> __device__ __forceinline__ int chunk_len(int vocab) {
  return ((vocab + C * DRAW_WARPS - 1) / (C * DRAW_WARPS) + 31) / 32 * 32;
}

// Sums the blocks' histograms `hist` into every block's `bins`.
template <int C> __device__ void merge_hist(DrawShared<C> &sh) {
  Rows<C>::sync();
  for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) {
    unsigned long long v = 0;
    for (int r = 0; r < C; r++) v += Rows<C>::at(sh.hist, r)[b];
    sh.bins[b] = v;
  }
  Rows<C>::sync();
}

// The total of an amount over the row's ids and the largest id with an amount (-1: none).
struct Sums {
  unsigned long long total;
  int last;
};

// Every chunk's sum into sh.chunks (id order); returns the total and the last id (every thread).
template <int C, typename A>
__device__ __forceinline__ Sums chunk_sums(int vocab, const A &amount, DrawShared<C> &sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, len = chunk_len<C>(vocab);
  const int c = Rows<C>::rank() * DRAW_WARPS + warp;
  if (threadIdx.x == 0) sh.found[2] = -1;
  __syncthreads();
  unsigned long long sum = 0;
  int mine = -1;
  const int end = min(vocab, (c + 1) * len);
  for (int i = c * len + lane; i < end; i += 32) {
    const unsigned long long a = amount(i);
    sum += a;
    if (a > 0) mine = i;
  }
  sum = warp_sum_u64(sum);
  if (lane == 0) sh.chunk[warp] = sum;
  if (mine >= 0) atomicMax(&sh.found[2], mine);
  Rows<C>::sync();
  for (int k = threadIdx.x; k < C * DRAW_WARPS; k += DRAW_THREADS)
    sh.chunks[k] = Rows<C>::at(sh.chunk, k / DRAW_WARPS)[k % DRAW_WARPS];
  int l = -1;
  for (int r = 0; r < C; r++) l = max(l, *Rows<C>::at(&sh.found[2], r));
  Rows<C>::sync();
  unsigned long long total = 0;
  for (int k = 0; k < C * DRAW_WARPS; k++) total += sh.chunks[k];
  return {total, l};
}

// The id where the running sum (id order, starting from `carry`) crosses `target`: with STRICT
// the first id whose sum passes it (sum > target >= sum - amount), else the first whose sum
// reaches it (sum >= target > sum - amount). -1 when no id does. sh.chunks from chunk_sums.
template <bool STRICT, int C, typename A>
__device__ int chunk_crossing(int vocab, const A &amount, unsigned long long carry,
                              unsigned long long target, DrawShared<C> &sh) {
  const int len = chunk_len<C>(vocab);
  if (threadIdx.x == 0) {
    int c = -1;
    for (int w = 0; w < C * DRAW_WARPS; w++) {
      const unsigned long long upto = carry + sh.chunks[w];
      if (STRICT ? upto > target : upto >= target) {
        c = w;
        break;
      }
      carry = upto;
    }
    sh.found[0] = c;
    sh.found[1] = -1;
    sh.scan[32] = carry;
  }
  __syncthreads();
  const int c = sh.found[0];
  carry = sh.scan[32];
  __syncthreads();
  if (c < 0) return -1;
  // The block holding chunk c walks it; the others wait for its answer.
  const int owner = c / DRAW_WARPS;
  if (owner == Rows<C>::rank()) {
    const int end = min(vocab, (c + 1) * len);
    for (int base = c * len; base < end; base += DRAW_THREADS) {
      const int i = base + threadIdx.x;
      const unsigned long long a = i < end ? amount(i) : 0ull;
      unsigned long long tile_total;
      const unsigned long long upto = carry + block_scan(a, sh.scan, tile_total);
      const bool crossed = a > 0 && (STRICT ? upto > target && upto - a <= target
                                            : upto >= target && upto - a < target);
      if (crossed) sh.found[1] = i;
      __syncthreads();
      if (sh.found[1] >= 0) break;
      carry += tile_total;
    }
  }
  Rows<C>::sync();
  const int r = *Rows<C>::at(&sh.found[1], owner);
  Rows<C>::sync();
  return r;
}

// Adds amount `a` (at most 2^40) to hist[bin] for every lane with bin >= 0. Lanes of one bin are
// summed first (two 20-bit halves, exact in 32 bits over 32 lanes) and their first lane adds
// once, as two native 32-bit atomics with the carry of the low word (a 64-bit shared atomic
// add is a compare-and-swap loop, whose retries serialize the warps on a busy bin).
__device__ __forceinline__ void hist_add(unsigned long long *hist, int bin, unsigned long long a) {
  if (__ballot_sync(0xffffffff, bin >= 0) == 0) return;
  const unsigned peers = __match_any_sync(0xffffffff, bin);
  const unsigned hi = __reduce_add_sync(peers, (unsigned)(a >> 20));
  const unsigned lo = __reduce_add_sync(peers, (unsigned)(a & 0xfffffu));
  if (bin >= 0 && (int)(threadIdx.x % 32) == __ffs(peers) - 1) {
    const unsigned long long add = ((unsigned long long)hi << 20) + lo;
    unsigned *word = reinterpret_cast<unsigned *>(&hist[bin]);  // little-endian: low word first
    const unsigned add_lo = (unsigned)add;
    const unsigned old = atomicAdd(word, add_lo);
    const unsigned add_hi = (unsigned)(add >> 32) + (old + add_lo < old ? 1u : 0u);
    if (add_hi != 0) atomicAdd(word + 1, add_hi);
  }
}

// An id's amount at the threshold key of select_prefix (ties at that key, id order).
struct TieAmount {
  const float *row;
  const unsigned long long *mass;
  Cut within;
  unsigned int key;
  bool by_mass;
  __device__ unsigned long long operator()(int i) const {
    const float x = row[i];
    const unsigned int k = order_key(x);
    if (k != key || !passes(within, k, i)) return 0ull;
    return by_mass ? mass[i] : 1ull;
  }
};

// An id's mass in the final draw (0 when truncation dropped it).
struct KeptMass {
  const float *row;
  const unsigned long long *mass;
  Cut keep;
  unsigned long long floor_mass;
  float max;
  __device__ unsigned long long operator()(int i) const {
    const float x = row[i];
    if (!passes(keep, order_key(x), i)) return 0ull;
    const unsigned long long m = mass[i];
    return m >= floor_mass || x == max ? m : 0ull;
  }
};

// The shortest prefix (value descending, lower id first) of the candidates passing `within` whose
// amount reaches `target` (amount: 1 per id when `by_mass` is false, else the fixed-point mass):
// a radix select over the 32 key bits, 8 per pass, then the tied ids in id order. With
// `first_built`, sh.bins already holds the first pass (key bits 24..31 of every candidate).
// [lo, hi) are this block's ids.
template <int C>
__device__ Cut select_prefix(const float *row, const unsigned long long *mass, int vocab, int lo,
                             int hi, Cut within, bool by_mass, unsigned long long target,
                             bool first_built, DrawShared<C> &sh) {
  unsigned int prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (!(first_built && shift == 24)) {
      for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) sh.hist[b] = 0;
      __syncthreads();
      for (int base = lo; base < hi; base += DRAW_THREADS) {
        const int i = base + threadIdx.x;
        int bin = -1;
        unsigned long long a = 0;
        if (i < hi) {
          const float x = row[i];
          const unsigned int key = order_key(x);
          if (passes(within, key, i) && (key & mask) == prefix) {
            bin = (int)((key >> shift) & 255u);
            a = by_mass ? mass[i] : 1ull;
          }
        }
        hist_add(sh.hist, bin, a);
      }
      merge_hist<C>(sh);
    }
    if (threadIdx.x == 0) {
      unsigned long long acc = above;
      int chosen = -1, lowest = 0;
      for (int b = 255; b >= 0; --b) {
        if (sh.bins[b] == 0) continue;
        lowest = b;
        if (acc + sh.bins[b] >= target) {
          chosen = b;
          break;
        }
        acc += sh.bins[b];
      }
      if (chosen < 0) {  // rounding: the whole remainder
        chosen = lowest;
        acc -= sh.bins[lowest];
      }
      sh.found[0] = chosen;
      sh.scan[32] = acc;
    }
    __syncthreads();
    prefix |= ((unsigned int)sh.found[0]) << shift;
    mask |= 255u << shift;
    above = sh.scan[32];
    __syncthreads();
  }
  // Ties at the threshold key, in id order, until the target is reached (all of them when it
  // is not).
  const TieAmount ties{row, mass, within, prefix, by_mass};
  chunk_sums<C>(vocab, ties, sh);
  const int crossing = chunk_crossing<false, C>(vocab, ties, above, target, sh);
  Cut c;
  c.key = prefix;
  c.last_id = crossing < 0 ? vocab - 1 : crossing;
  return c;
}

// One row's draw by block `rank` of its C (see the section's comment).
template <int C>
__device__ void draw_row(const float *row, float *out, int vocab, const double *p,
                         unsigned long long *mass) {
  __shared__ DrawShared<C> sh;
  const double u = p[0], top_p = p[2], min_p = p[3];
  const float inv_t = (float)p[1];
  const int top_k = (int)p[4];
  const int len = chunk_len<C>(vocab), rank = Rows<C>::rank();
  const int lo = min(vocab, rank * DRAW_WARPS * len), hi = min(vocab, lo + DRAW_WARPS * len);

  float max = -INFINITY;
  for (int i = lo + threadIdx.x; i < hi; i += DRAW_THREADS) max = fmaxf(max, row[i]);
  max = rows_reduce<C>(block_max(max, sh.fscratch), &sh.slot_f,
                       [](float a, float b) { return fmaxf(a, b); });
  // One pass computes every id's mass (the row's scratch; the later passes read it), the
  // log-sum-exp and, when every id is a top-p candidate (no top-k), the first histogram of the
  // top-p select (key bits 24..31, by mass), whose bins sum to the total mass.
  const bool by_top_k = top_k > 0 && top_k < vocab;
  const bool fused = top_p < 1.0 && !by_top_k;
  for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) sh.hist[b] = 0;
  __syncthreads();
  double sum = 0.0;
  for (int base = lo; base < hi; base += DRAW_THREADS) {
    const int i = base + threadIdx.x;
    int bin = -1;
    unsigned long long a = 0;
    if (i < hi) {
      const float x = row[i];
      sum += (double)expf(x - max);
      a = fixed_mass(x, max, inv_t);
      mass[i] = a;
      if (fused) bin = (int)(order_key(x) >> 24);
    }
    if (fused) hist_add(sh.hist, bin, a);
  }
  const double total_exp = rows_reduce<C>(block_sum(sum, sh.dscratch), &sh.slot_d,
                                           [](double a, double b) { return a + b; });
  const double lse = (double)max + log(total_exp);
  if (fused) merge_hist<C>(sh);

  Cut keep;
  keep.key = 0;
  keep.last_id = vocab;
  if (by_top_k)
    keep = select_prefix<C>(row, mass, vocab, lo, hi, keep, false, (unsigned long long)top_k,
                            false, sh);
  if (top_p < 1.0) {
    unsigned long long total_mass = 0;
    if (fused) {
      for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) total_mass += sh.bins[b];
    } else {
      for (int i = lo + threadIdx.x; i < hi; i += DRAW_THREADS) {
        const float x = row[i];
        const unsigned int key = order_key(x);
        if (passes(keep, key, i)) total_mass += mass[i];
      }
    }
    total_mass = block_sum_u64(total_mass, sh.scan);
    if (!fused)
      total_mass = rows_reduce<C>(total_mass, &sh.slot_u,
                                  [](unsigned long long a, unsigned long long b) { return a + b; });
    const unsigned long long target = (unsigned long long)ceil(top_p * (double)total_mass);
    keep = select_prefix<C>(row, mass, vocab, lo, hi, keep, true, target, fused, sh);
  }
  const unsigned long long floor_mass = (unsigned long long)(min_p * FIXED_ONE);

  // The kept mass, then the id where the running mass (id order) passes u times it; when
  // rounding runs past the end, the last kept id.
  const KeptMass kept{row, mass, keep, floor_mass, max};
  const Sums kept_sums = chunk_sums<C>(vocab, kept, sh);
  const double kept_total = (double)kept_sums.total;
  const int last_kept = kept_sums.last;
  const unsigned long long target = (unsigned long long)(u * kept_total);
  const int crossing = chunk_crossing<true, C>(vocab, kept, 0ull, target, sh);
  if (threadIdx.x == 0 && rank == 0) {
    const int token = crossing >= 0 ? crossing : last_kept < 0 ? 0 : last_kept;
    out[0] = (float)token;
    out[1] = (float)((double)row[token] - lse);
  }
}

extern "C" __global__ void __launch_bounds__(DRAW_THREADS)
    draw_f32(const float *logits, float *out, int vocab, const double *params,
             unsigned long long *masses) {
  const size_t r = blockIdx.x;
  draw_row<1>(logits + r * vocab, out + 2 * r, vocab, params + r * DRAW_PARAMS,
              masses + r * vocab);
}

#if __CUDA_ARCH__ >= 900
extern "C" __global__ void __cluster_dims__(DRAW_CLUSTER, 1, 1) __launch_bounds__(DRAW_THREADS)
    draw_f32_c8(const float *logits, float *out, int vocab, const double *params,
                unsigned long long *masses) {
  const size_t r = blockIdx.x / DRAW_CLUSTER;
  draw_row<DRAW_CLUSTER>(logits + r * vocab, out + 2 * r, vocab, params + r * DRAW_PARAMS,
                         masses + r * vocab);
}
#endif
