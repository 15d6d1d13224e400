// LoRA shrink and expand for a step whose rows may each use a different adapter (Punica's BGMV):
// one launch each per packed projection group, whatever the number of adapters in the step.
//
// `meta` (64-bit words): meta[t] is row t's slot (all ones: no adapter), and at `entries` a table
// of slots, each {A pointer, B pointer, R}: A is [R, in], B is [out, R] (scale folded in), bf16,
// R a multiple of 8 (zero-padded at load). Products and sums are f32; the shrunk rows stay f32.
// CPU reference: `StepLora::add`'s candle path (adapters/mod.rs), checked by `selftest`.
#include <cuda_bf16.h>
#include <stdint.h>

#define NONE 0xffffffffffffffffull

struct Entry {
    const __nv_bfloat16* a;
    const __nv_bfloat16* b;
    unsigned long long r;
};

__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

// h[t, r] = x[t, :] · A_slot(t)[r, :] (0 where the row has no adapter or r >= its R).
// Grid (ceil(T / ROWS), rmax); a block per (row tile, r) whose WARPS warps split `in` and reduce
// in shared memory, so each warp's chain of loads stays short.
template <typename X, int ROWS, int WARPS>
__device__ void shrink(const X* x, const unsigned long long* meta, int T, int entries, int in,
                       int rmax, float* h) {
    __shared__ float partial[WARPS][ROWS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = blockIdx.y;
    const int t0 = blockIdx.x * ROWS;
    const Entry* table = reinterpret_cast<const Entry*>(meta + entries);
    const __nv_bfloat16* arow[ROWS];
    float acc[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
        acc[j] = 0.f;
        arow[j] = nullptr;
        const int t = t0 + j;
        if (t < T) {
            const unsigned long long s = meta[t];
            if (s != NONE) {
                const Entry e = table[s];
                if ((unsigned long long)r < e.r) arow[j] = e.a + (size_t)r * in;
            }
        }
    }
    for (int k = (warp * 32 + lane) * 8; k < in; k += WARPS * 32 * 8) {
        float a0[8];
        const __nv_bfloat16* last = nullptr;
#pragma unroll
        for (int j = 0; j < ROWS; j++) {
            if (!arow[j]) continue;
            // Rows of one adapter share the A chunk.
            if (arow[j] != last) {
                load8(arow[j] + k, a0);
                last = arow[j];
            }
            float xv[8];
            load8(x + (size_t)(t0 + j) * in + k, xv);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[j] += a0[i] * xv[i];
        }
    }
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
        if (lane == 0) partial[warp][j] = acc[j];
    }
    __syncthreads();
    if (threadIdx.x < ROWS) {
        const int j = threadIdx.x, t = t0 + j;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) sum += partial[w][j];
        if (t < T) h[(size_t)t * rmax + r] = sum;
    }
}

extern "C" __global__ void lora_shrink_f32(const float* x, const unsigned long long* meta, int T,
                                           int entries, int in, int rmax, float* h) {
    shrink<float, 4, 8>(x, meta, T, entries, in, rmax, h);
}

extern "C" __global__ void lora_shrink_bf16(const __nv_bfloat16* x,
                                            const unsigned long long* meta, int T, int entries,
                                            int in, int rmax, float* h) {
    shrink<__nv_bfloat16, 4, 8>(x, meta, T, entries, in, rmax, h);
}

// y[t, o] += h[t, :R] · B_slot(t)[o, :R]. Grid (ceil(out / blockDim), ceil(T / 8)); a thread per
// output column, 8 rows per block with their shrunk rows in shared memory (8 * rmax floats); rows
// of one adapter share each loaded chunk of B.
extern "C" __global__ void lora_expand(const float* h, const unsigned long long* meta, int T,
                                       int entries, int out, int rmax, float* y) {
    constexpr int ROWS = 8;
    extern __shared__ float hs[];
    const int t0 = blockIdx.y * ROWS;
    for (int i = threadIdx.x; i < ROWS * rmax; i += blockDim.x) {
        const int t = t0 + i / rmax;
        hs[i] = t < T ? h[(size_t)t * rmax + i % rmax] : 0.f;
    }
    __syncthreads();
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out) return;
    const Entry* table = reinterpret_cast<const Entry*>(meta + entries);
    const __nv_bfloat16* brow[ROWS];
    int rank[ROWS];
    int widest = 0;
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
        brow[j] = nullptr;
        rank[j] = 0;
        const int t = t0 + j;
        if (t >= T) continue;
        const unsigned long long s = meta[t];
        if (s == NONE) continue;
        const Entry e = table[s];
        rank[j] = (int)e.r;
        brow[j] = e.b + (size_t)o * e.r;
        widest = max(widest, rank[j]);
    }
    float acc[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; j++) acc[j] = 0.f;
    for (int r = 0; r < widest; r += 8) {
        float b[8];
        const __nv_bfloat16* last = nullptr;
#pragma unroll
        for (int j = 0; j < ROWS; j++) {
            if (r >= rank[j]) continue;
            if (brow[j] != last) {
                load8(brow[j] + r, b);
                last = brow[j];
            }
            const float* hr = hs + j * rmax + r;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[j] += b[i] * hr[i];
        }
    }
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
        if (rank[j] > 0) y[(size_t)(t0 + j) * out + o] += acc[j];
    }
}
