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
// logsumexp(x), the sum of f32 exponentials in double). Grid (rows), DRAW_THREADS threads.

#define DRAW_THREADS 1024
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

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
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

// Walks in id order. The ids are cut into DRAW_WARPS contiguous chunks, one per warp; a pass
// sums each chunk (exact integers, so in any order), then only the chunk where the running sum
// crosses the target is walked tile by tile. `A` gives an id's amount (0: not counted).
#define DRAW_WARPS (DRAW_THREADS / 32)

__device__ __forceinline__ int chunk_len(int vocab) {
  return ((vocab + DRAW_WARPS - 1) / DRAW_WARPS + 31) / 32 * 32;
}

// Every chunk's sum into chunk_sum[warp]; returns the total (every thread), and the largest id
// with an amount in `last` (-1: none).
template <typename A>
__device__ unsigned long long chunk_sums(int vocab, const A &amount,
                                         unsigned long long *chunk_sum, int *last) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, len = chunk_len(vocab);
  if (threadIdx.x == 0) *last = -1;
  __syncthreads();
  unsigned long long sum = 0;
  int mine = -1;
  const int end = min(vocab, (warp + 1) * len);
  for (int i = warp * len + lane; i < end; i += 32) {
    const unsigned long long a = amount(i);
    sum += a;
    if (a > 0) mine = i;
  }
  sum = warp_sum_u64(sum);
  if (lane == 0) chunk_sum[warp] = sum;
  if (mine >= 0) atomicMax(last, mine);
  __syncthreads();
  unsigned long long total = warp_sum_u64(chunk_sum[lane]);
  __syncthreads();
  return total;
}

// The id where the running sum (id order, starting from `carry`) crosses `target`: with STRICT
// the first id whose sum passes it (sum > target >= sum - amount), else the first whose sum
// reaches it (sum >= target > sum - amount). -1 when no id does. chunk_sum from chunk_sums.
template <bool STRICT, typename A>
__device__ int chunk_crossing(int vocab, const A &amount, unsigned long long carry,
                              unsigned long long target, const unsigned long long *chunk_sum,
                              unsigned long long *scan, int *found) {
  const int len = chunk_len(vocab);
  if (threadIdx.x == 0) {
    int c = -1;
    for (int w = 0; w < DRAW_WARPS; w++) {
      const unsigned long long upto = carry + chunk_sum[w];
      if (STRICT ? upto > target : upto >= target) {
        c = w;
        break;
      }
      carry = upto;
    }
    found[0] = c;
    found[1] = -1;
    scan[32] = carry;
  }
  __syncthreads();
  const int c = found[0];
  carry = scan[32];
  __syncthreads();
  if (c < 0) return -1;
  const int end = min(vocab, (c + 1) * len);
  for (int base = c * len; base < end; base += DRAW_THREADS) {
    const int i = base + threadIdx.x;
    const unsigned long long a = i < end ? amount(i) : 0ull;
    unsigned long long tile_total;
    const unsigned long long upto = carry + block_scan(a, scan, tile_total);
    const bool crossed =
        a > 0 && (STRICT ? upto > target && upto - a <= target : upto >= target && upto - a < target);
    if (crossed) found[1] = i;
    __syncthreads();
    if (found[1] >= 0) break;
    carry += tile_total;
  }
  __syncthreads();
  const int r = found[1];
  __syncthreads();
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
// `first_built`, hist already holds the first pass (key bits 24..31 of every candidate).
__device__ Cut select_prefix(const float *row, const unsigned long long *mass, int vocab,
                             Cut within, bool by_mass, unsigned long long target, bool first_built,
                             unsigned long long *hist, unsigned long long *scan, int *found) {
  unsigned int prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (!(first_built && shift == 24)) {
      for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) hist[b] = 0;
      __syncthreads();
      for (int base = 0; base < vocab; base += DRAW_THREADS) {
        const int i = base + threadIdx.x;
        int bin = -1;
        unsigned long long a = 0;
        if (i < vocab) {
          const float x = row[i];
          const unsigned int key = order_key(x);
          if (passes(within, key, i) && (key & mask) == prefix) {
            bin = (int)((key >> shift) & 255u);
            a = by_mass ? mass[i] : 1ull;
          }
        }
        hist_add(hist, bin, a);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long acc = above;
      int chosen = -1, lowest = 0;
      for (int b = 255; b >= 0; --b) {
        if (hist[b] == 0) continue;
        lowest = b;
        if (acc + hist[b] >= target) {
          chosen = b;
          break;
        }
        acc += hist[b];
      }
      if (chosen < 0) {  // rounding: the whole remainder
        chosen = lowest;
        acc -= hist[lowest];
      }
      found[0] = chosen;
      scan[32] = acc;
    }
    __syncthreads();
    prefix |= ((unsigned int)found[0]) << shift;
    mask |= 255u << shift;
    above = scan[32];
    __syncthreads();
  }
  // Ties at the threshold key, in id order, until the target is reached (all of them when it
  // is not).
  const TieAmount ties{row, mass, within, prefix, by_mass};
  chunk_sums(vocab, ties, hist, found + 2);
  const int crossing = chunk_crossing<false>(vocab, ties, above, target, hist, scan, found);
  Cut c;
  c.key = prefix;
  c.last_id = crossing < 0 ? vocab - 1 : crossing;
  return c;
}

extern "C" __global__ void __launch_bounds__(DRAW_THREADS)
    draw_f32(const float *logits, float *out, int vocab, const double *params,
             unsigned long long *masses) {
  const float *row = logits + (size_t)blockIdx.x * vocab;
  unsigned long long *mass = masses + (size_t)blockIdx.x * vocab;
  const double *p = params + (size_t)blockIdx.x * DRAW_PARAMS;
  const double u = p[0], top_p = p[2], min_p = p[3];
  const float inv_t = (float)p[1];
  const int top_k = (int)p[4];
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long scan[33];
  __shared__ int found[3];

  float max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) max = fmaxf(max, row[i]);
  max = block_max(max, fscratch);
  // One pass computes every id's mass (the row's scratch; the later passes read it), the
  // log-sum-exp and, when every id is a top-p candidate (no top-k), the first histogram of the
  // top-p select (key bits 24..31, by mass), whose bins sum to the total mass.
  const bool by_top_k = top_k > 0 && top_k < vocab;
  const bool fused = top_p < 1.0 && !by_top_k;
  for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) hist[b] = 0;
  __syncthreads();
  double sum = 0.0;
  for (int base = 0; base < vocab; base += DRAW_THREADS) {
    const int i = base + threadIdx.x;
    int bin = -1;
    unsigned long long a = 0;
    if (i < vocab) {
      const float x = row[i];
      sum += (double)expf(x - max);
      a = fixed_mass(x, max, inv_t);
      mass[i] = a;
      if (fused) bin = (int)(order_key(x) >> 24);
    }
    if (fused) hist_add(hist, bin, a);
  }
  const double lse = (double)max + log(block_sum(sum, dscratch));

  Cut keep;
  keep.key = 0;
  keep.last_id = vocab;
  if (by_top_k)
    keep = select_prefix(row, mass, vocab, keep, false, (unsigned long long)top_k, false, hist,
                         scan, found);
  if (top_p < 1.0) {
    unsigned long long total_mass = 0;
    if (fused) {
      __syncthreads();
      for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) total_mass += hist[b];
    } else {
      for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) {
        const float x = row[i];
        const unsigned int key = order_key(x);
        if (passes(keep, key, i)) total_mass += mass[i];
      }
    }
    total_mass = warp_sum_u64(total_mass);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scan[threadIdx.x / 32] = total_mass;
    __syncthreads();
    const double total = (double)warp_sum_u64(scan[threadIdx.x % 32]);
    __syncthreads();
    const unsigned long long target = (unsigned long long)ceil(top_p * total);
    keep = select_prefix(row, mass, vocab, keep, true, target, fused, hist, scan, found);
  }
  const unsigned long long floor_mass = (unsigned long long)(min_p * FIXED_ONE);

  // The kept mass, then the id where the running mass (id order) passes u times it; when
  // rounding runs past the end, the last kept id.
  const KeptMass kept{row, mass, keep, floor_mass, max};
  const double kept_total = (double)chunk_sums(vocab, kept, hist, found + 2);
  const int last_kept = found[2];
  const unsigned long long target = (unsigned long long)(u * kept_total);
  const int crossing = chunk_crossing<true>(vocab, kept, 0ull, target, hist, scan, found);
  if (threadIdx.x == 0) {
    const int token = crossing >= 0 ? crossing : last_kept < 0 ? 0 : last_kept;
    out[2 * blockIdx.x] = (float)token;
    out[2 * blockIdx.x + 1] = (float)((double)row[token] - lse);
  }
}
