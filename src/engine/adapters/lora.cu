// LoRA shrink and expand for a step whose rows may each use a different adapter (Punica's BGMV):
// one launch each per packed projection group, whatever the number of adapters in the step.
//
// `meta` (64-bit words): meta[t] is row t's slot (all ones: no adapter), and at `entries` a table
// of slots, each {A pointer, B pointer, R}: A is [R, in], B is [out, R] (scale folded in), bf16,
// R a multiple of 16 (zero-padded at load). Products and sums are f32; the shrunk rows stay f32.
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

// ---- Tensor-core path (bf16 rows; `in`, `out` and R multiples of 16) ----
// The rows of a step are sorted by slot and cut into tiles of at most TILE rows of one slot
// (built on the host, after the entries at `tiles_at`): {tiles, rows, then per tile {slot,
// start, rows}, max_tiles of them, then order[p], the packed row of sorted position p}.
// Both kernels issue `mma.sync.m16n8k16` (bf16 in, f32 accumulate) on fragments each thread
// loads straight from global memory (the rows of a tile through `order`), so no staging.
// Shrink splits `in` across blocks (512 each, 128 per warp, the parts summed in order in
// shared memory); the last block of a (tile, 16 ranks) to finish adds the splits in order into
// h (f32), so the sums do not depend on the launch. Expand feeds h to the tensor cores as bf16
// hi + lo halves, which keeps about f32's precision. An output row depends only on its own
// input row, whatever tile it lands in.
#define TILE 64
#define WARP_K 128
#define SHRINK_PARTS 4
#define EXPAND_STEPS 4

struct Tile {
    int slot, start, rows;
};

__device__ __forceinline__ bool tile_at(const unsigned long long* meta, int tiles_at, int i,
                                        Tile& t) {
    if ((unsigned long long)i >= meta[tiles_at]) return false;
    const unsigned long long* w = meta + tiles_at + 2 + 3 * i;
    t.slot = (int)w[0];
    t.start = (int)w[1];
    t.rows = (int)w[2];
    return true;
}

__device__ __forceinline__ unsigned ld32(const __nv_bfloat16* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

// c += a (16x16, row-major fragment) . b (16x8, column-major fragment).
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One warp's part of a shrink block: `acc` += one 16-row slice (rows xr0, xr1) times 16 ranks
// (ar0, ar1) over `in` from k to k + WARP_K. Every fragment is loaded before the first product,
// so the warp waits for memory once; when not FULL, steps past `in` are skipped.
template <bool FULL>
__device__ __forceinline__ void shrink_slice(const __nv_bfloat16* xr0, const __nv_bfloat16* xr1,
                                             const __nv_bfloat16* ar0, const __nv_bfloat16* ar1,
                                             int k, int in, float (&acc)[2][4]) {
    constexpr int STEPS = WARP_K / 16;
    unsigned a[STEPS][4], b[STEPS][2][2];
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        const int kk = k + 16 * j;
        if (!FULL && kk >= in) continue;
        a[j][0] = ld32(xr0 + kk);
        a[j][1] = ld32(xr1 + kk);
        a[j][2] = ld32(xr0 + kk + 8);
        a[j][3] = ld32(xr1 + kk + 8);
        b[j][0][0] = ld32(ar0 + kk);
        b[j][0][1] = ld32(ar0 + kk + 8);
        b[j][1][0] = ld32(ar1 + kk);
        b[j][1][1] = ld32(ar1 + kk + 8);
    }
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        if (!FULL && k + 16 * j >= in) continue;
        mma16816(acc[0], a[j], b[j][0]);
        mma16816(acc[1], a[j], b[j][1]);
    }
}

// h[p, r] = x[order[p], :] . A_slot[r, :] for the tile blockIdx.x's rows and ranks
// blockIdx.y * 16 .. +16 (below R), over the split blockIdx.z of `in`: 16 warps, one per
// (16-row slice, WARP_K part of the split's SHRINK_PARTS * WARP_K). Grid (max_tiles, rmax / 16,
// ceil(in / (SHRINK_PARTS * WARP_K))), 512 threads; `counters` (one per (tile, rank block))
// start at 0.
extern "C" __global__ void lora_shrink_mma(const __nv_bfloat16* x, const unsigned long long* meta,
                                           int entries, int tiles_at, int max_tiles, int in,
                                           int rmax, int rows_cap, float* part,
                                           unsigned long long* counters, float* h) {
    __shared__ float red[SHRINK_PARTS][TILE][16];
    __shared__ bool last;
    Tile tile;
    if (!tile_at(meta, tiles_at, blockIdx.x, tile)) return;
    const Entry e = reinterpret_cast<const Entry*>(meta + entries)[tile.slot];
    const int r0 = blockIdx.y * 16;
    if (r0 >= (int)e.r) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int s = warp % 4, kpart = warp / 4;
    const unsigned long long* order = meta + tiles_at + 2 + 3 * max_tiles;
    if (16 * s < tile.rows) {
        float acc[2][4] = {};
        const int row0 = 16 * s + g, row1 = row0 + 8;
        const __nv_bfloat16* xr0 = x + order[tile.start + (row0 < tile.rows ? row0 : 0)] * in + 2 * t;
        const __nv_bfloat16* xr1 = x + order[tile.start + (row1 < tile.rows ? row1 : 0)] * in + 2 * t;
        const __nv_bfloat16* ar0 = e.a + (size_t)(r0 + g) * in + 2 * t;
        const __nv_bfloat16* ar1 = e.a + (size_t)(r0 + 8 + g) * in + 2 * t;
        const int k = (blockIdx.z * SHRINK_PARTS + kpart) * WARP_K;
        if (k + WARP_K <= in) {
            shrink_slice<true>(xr0, xr1, ar0, ar1, k, in, acc);
        } else if (k < in) {
            shrink_slice<false>(xr0, xr1, ar0, ar1, k, in, acc);
        }
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                red[kpart][row0 + 8 * u][8 * n + 2 * t] = acc[n][2 * u];
                red[kpart][row0 + 8 * u][8 * n + 2 * t + 1] = acc[n][2 * u + 1];
            }
    }
    __syncthreads();
    float* mine = part + (size_t)blockIdx.z * rows_cap * rmax;
    for (int i = threadIdx.x; i < tile.rows * 16; i += blockDim.x) {
        const int row = i / 16, c = i % 16;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < SHRINK_PARTS; w++) v += red[w][row][c];
        mine[(size_t)(tile.start + row) * rmax + r0 + c] = v;
    }
    // The last block of this (tile, rank block) adds every split, in order.
    __threadfence();
    __syncthreads();
    unsigned long long* counter = counters + blockIdx.x * gridDim.y + blockIdx.y;
    if (threadIdx.x == 0) last = atomicAdd(counter, 1ull) == gridDim.z - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const size_t stride = (size_t)rows_cap * rmax;
    for (int i = threadIdx.x; i < tile.rows * 16; i += blockDim.x) {
        const size_t at = (size_t)(tile.start + i / 16) * rmax + r0 + i % 16;
        float v = 0.f;
#pragma unroll 8
        for (int z = 0; z < (int)gridDim.z; z++) v += __ldcg(part + z * stride + at);
        h[at] = v;
    }
}

// The bf16 hi and lo halves of two floats, each packed as a pair.
__device__ __forceinline__ void halves(float2 v, unsigned& hi, unsigned& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
    const float2 back = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(v.x - back.x, v.y - back.y);
    hi = *reinterpret_cast<const unsigned*>(&h);
    lo = *reinterpret_cast<const unsigned*>(&l);
}

// y[order[p], o] += h[p, :R] . B_slot[o, :R] for the 16-row slice blockIdx.z of the tile
// blockIdx.x and columns blockIdx.y * 64 + 16 * warp .. +16. Grid (max_tiles, ceil(out / 64),
// 4), 128 threads. Each warp loads EXPAND_STEPS steps of 16 ranks before multiplying them.
extern "C" __global__ void lora_expand_mma(const float* h, const unsigned long long* meta,
                                           int entries, int tiles_at, int max_tiles, int out,
                                           int rmax, float* y) {
    Tile tile;
    if (!tile_at(meta, tiles_at, blockIdx.x, tile)) return;
    const int slice = blockIdx.z;
    if (16 * slice >= tile.rows) return;
    const Entry e = reinterpret_cast<const Entry*>(meta + entries)[tile.slot];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int o0 = blockIdx.y * 64 + 16 * warp;
    const int R = (int)e.r;
    if (R == 0 || o0 >= out) return;
    const unsigned long long* order = meta + tiles_at + 2 + 3 * max_tiles;
    const int row0 = 16 * slice + g, row1 = row0 + 8;
    const float* hr0 = h + (size_t)(tile.start + (row0 < tile.rows ? row0 : 0)) * rmax + 2 * t;
    const float* hr1 = h + (size_t)(tile.start + (row1 < tile.rows ? row1 : 0)) * rmax + 2 * t;
    const __nv_bfloat16* br0 = e.b + (size_t)(o0 + g) * R + 2 * t;
    const __nv_bfloat16* br1 = e.b + (size_t)(o0 + 8 + g) * R + 2 * t;
    float acc[2][4] = {};
    for (int r = 0; r < R; r += 16 * EXPAND_STEPS) {
        float2 hv[EXPAND_STEPS][4];
        unsigned b[EXPAND_STEPS][2][2];
#pragma unroll
        for (int j = 0; j < EXPAND_STEPS; j++) {
            const int rr = r + 16 * j;
            if (rr >= R) continue;
            hv[j][0] = *reinterpret_cast<const float2*>(hr0 + rr);
            hv[j][1] = *reinterpret_cast<const float2*>(hr1 + rr);
            hv[j][2] = *reinterpret_cast<const float2*>(hr0 + rr + 8);
            hv[j][3] = *reinterpret_cast<const float2*>(hr1 + rr + 8);
            b[j][0][0] = ld32(br0 + rr);
            b[j][0][1] = ld32(br0 + rr + 8);
            b[j][1][0] = ld32(br1 + rr);
            b[j][1][1] = ld32(br1 + rr + 8);
        }
#pragma unroll
        for (int j = 0; j < EXPAND_STEPS; j++) {
            if (r + 16 * j >= R) continue;
            unsigned hi[4], lo[4];
#pragma unroll
            for (int q = 0; q < 4; q++) halves(hv[j][q], hi[q], lo[q]);
#pragma unroll
            for (int n = 0; n < 2; n++) {
                mma16816(acc[n], hi, b[j][n]);
                mma16816(acc[n], lo, b[j][n]);
            }
        }
    }
#pragma unroll
    for (int n = 0; n < 2; n++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int row = row0 + 8 * u;
            if (row >= tile.rows) continue;
            float2* p = reinterpret_cast<float2*>(y + order[tile.start + row] * out + o0 + 8 * n +
                                                  2 * t);
            float2 v = *p;
            v.x += acc[n][2 * u];
            v.y += acc[n][2 * u + 1];
            *p = v;
        }
}
