// Greedy picks and seeded draws on the device (second kernel below).
// Greedy picks (see src/engine/scoring.rs, whose candle-ops path defines the
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

extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    greedy_pick_f32(const float *logits, float *out, int vocab) {
  const float *row = logits + (size_t)blockIdx.x * vocab;
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
  const float max = best_v[0];
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += PICK_THREADS) sum += expf(row[i] - max);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  if (lane == 0) sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = sums[lane];
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (lane == 0) {
      out[2 * blockIdx.x] = (float)best_i[0];
      out[2 * blockIdx.x + 1] = -logf(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Seeded draws on the device (see src/engine/sample/truncation.rs, whose host code defines the
// result): per f32 logits row, with the row's uniform number u drawn on the host from the
// request's own generator, the token the host sampler would pick: weights w = exp((x - max) / T);
// top-k keeps the k best (value descending, lower id first on ties); top-p keeps the shortest such
// prefix whose mass reaches top_p of the top-k mass; min-p keeps w >= min_p; the draw walks the
// kept ids in id order until the running mass passes u times the kept mass. Masses are summed in
// 2^-40 fixed point (u64), so the result does not depend on the order of the threads' additions.
// out[row] = (token, raw logprob = x[token] - logsumexp(x)). Grid (rows), DRAW_THREADS threads.

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

// The shortest prefix (value descending, lower id first) of the candidates passing `within` whose
// amount reaches `target` (amount: 1 per id when `by_mass` is false, else the fixed-point mass):
// a radix select over the 32 key bits, 8 per pass, then the tied ids in id order.
__device__ Cut select_prefix(const float *row, int vocab, Cut within, bool by_mass, float max,
                             float inv_t, unsigned long long target, unsigned long long *hist,
                             unsigned long long *scan, int *found) {
  unsigned int prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += DRAW_THREADS) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) {
      const float x = row[i];
      const unsigned int key = order_key(x);
      if (passes(within, key, i) && (key & mask) == prefix)
        atomicAdd(&hist[(key >> shift) & 255u],
                  by_mass ? fixed_mass(x, max, inv_t) : 1ull);
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
  // Ties at the threshold key, in id order, until the target is reached.
  if (threadIdx.x == 0) found[0] = vocab - 1;
  __syncthreads();
  unsigned long long carry = above;
  for (int base = 0; base < vocab; base += DRAW_THREADS) {
    const int i = base + threadIdx.x;
    unsigned long long amount = 0;
    if (i < vocab) {
      const float x = row[i];
      const unsigned int key = order_key(x);
      if (key == prefix && passes(within, key, i))
        amount = by_mass ? fixed_mass(x, max, inv_t) : 1ull;
    }
    unsigned long long tile_total;
    const unsigned long long upto = carry + block_scan(amount, scan, tile_total);
    const bool crossed = amount > 0 && upto >= target && upto - amount < target;
    __syncthreads();
    if (crossed) found[0] = i;
    __syncthreads();
    if (found[0] != vocab - 1 || carry + tile_total >= target) break;
    carry += tile_total;
  }
  __syncthreads();
  Cut c;
  c.key = prefix;
  c.last_id = found[0];
  __syncthreads();
  return c;
}

extern "C" __global__ void __launch_bounds__(DRAW_THREADS)
    draw_f32(const float *logits, float *out, int vocab, const double *params) {
  const float *row = logits + (size_t)blockIdx.x * vocab;
  const double *p = params + (size_t)blockIdx.x * DRAW_PARAMS;
  const double u = p[0], top_p = p[2], min_p = p[3];
  const float inv_t = (float)p[1];
  const int top_k = (int)p[4];
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  __shared__ unsigned long long hist[256];
  __shared__ unsigned long long scan[33];
  __shared__ int found[1];

  float max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) max = fmaxf(max, row[i]);
  max = block_max(max, fscratch);
  double sum = 0.0;
  for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) sum += exp((double)(row[i] - max));
  const double lse = (double)max + log(block_sum(sum, dscratch));

  Cut keep;
  keep.key = 0;
  keep.last_id = vocab;
  if (top_k > 0 && top_k < vocab)
    keep = select_prefix(row, vocab, keep, false, max, inv_t, (unsigned long long)top_k, hist,
                         scan, found);
  if (top_p < 1.0) {
    double mass = 0.0;
    for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) {
      const float x = row[i];
      if (passes(keep, order_key(x), i)) mass += (double)fixed_mass(x, max, inv_t);
    }
    const double total = block_sum(mass, dscratch);
    const unsigned long long target = (unsigned long long)ceil(top_p * total);
    keep = select_prefix(row, vocab, keep, true, max, inv_t, target, hist, scan, found);
  }
  const unsigned long long floor_mass = (unsigned long long)(min_p * FIXED_ONE);

  // The kept mass, then the id where the running mass (id order) passes u times it.
  double kept = 0.0;
  for (int i = threadIdx.x; i < vocab; i += DRAW_THREADS) {
    const float x = row[i];
    const unsigned long long w = fixed_mass(x, max, inv_t);
    if (passes(keep, order_key(x), i) && (w >= floor_mass || x == max)) kept += (double)w;
  }
  const double kept_total = block_sum(kept, dscratch);
  const unsigned long long target = (unsigned long long)(u * kept_total);
  if (threadIdx.x == 0) found[0] = -1;
  __syncthreads();
  unsigned long long carry = 0;
  int last_kept = -1;
  for (int base = 0; base < vocab; base += DRAW_THREADS) {
    const int i = base + threadIdx.x;
    unsigned long long w = 0;
    if (i < vocab) {
      const float x = row[i];
      const unsigned long long m = fixed_mass(x, max, inv_t);
      if (passes(keep, order_key(x), i) && (m >= floor_mass || x == max)) {
        w = m;
        last_kept = i;
      }
    }
    unsigned long long tile_total;
    const unsigned long long upto = carry + block_scan(w, scan, tile_total);
    if (w > 0 && upto > target && upto - w <= target) found[0] = i;
    __syncthreads();
    if (found[0] >= 0) break;
    carry += tile_total;
  }
  // Rounding ran past the end: the last kept id.
  __syncthreads();
  const bool none = found[0] < 0;
  __syncthreads();
  if (none) atomicMax(&found[0], last_kept);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int token = found[0] < 0 ? 0 : found[0];
    out[2 * blockIdx.x] = (float)token;
    out[2 * blockIdx.x + 1] = (float)((double)row[token] - lse);
  }
}
