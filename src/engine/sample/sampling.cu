// Greedy picks on the device (see src/engine/scoring.rs, whose candle-ops path defines the
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
