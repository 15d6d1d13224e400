// LoRA shrink and expand for a step whose rows may each use a different adapter (Punica's BGMV):
// one launch each per packed projection group, whatever the number of adapters in the step.
//
// `meta` (64-bit words): meta[t] is row t's slot (all ones: no adapter), and at `entries` a table
// of slots, each {A pointer, B pointer, R, segments}: A is [R, in], B is [out, R] (scale folded
// in), bf16, R a multiple of 16 (zero-padded at load). Products and sums are f32; the shrunk rows
// stay f32.
// CPU reference: `StepLora::add`'s candle path (adapters/mod.rs), checked by `selftest`.
#include <cuda_bf16.h>
#include <stdint.h>
#include <cooperative_groups.h>

#include "../attention/common.cuh"  // mma_16x8x16

#define NONE 0xffffffffffffffffull

struct Entry {
    const __nv_bfloat16* a;
    const __nv_bfloat16* b;
    unsigned long long r;
    // The ranks each output column's row of B can hold non-zero (packed groups are
    // block-diagonal): 0 for all of [0, R); otherwise bit 63 set, output columns [0, o1) take
    // ranks [0, r1), [o1, o2) take [r1, r2) and [o2, out) take [r2, R), with o1 / 16 and o2 / 16
    // in bits 0-15 and 24-39, r1 / 8 and r2 / 8 in bits 16-23 and 40-47.
    unsigned long long seg;
};

// The ranks [lo, hi) that output column o's row of B can hold non-zero.
__device__ __forceinline__ void seg_ranks(const Entry& e, int o, int& lo, int& hi) {
    const unsigned long long s = e.seg;
    if (!(s >> 63)) {
        lo = 0;
        hi = (int)e.r;
        return;
    }
    const int o1 = 16 * (int)(s & 0xffff), r1 = 8 * (int)((s >> 16) & 0xff);
    const int o2 = 16 * (int)((s >> 24) & 0xffff), r2 = 8 * (int)((s >> 40) & 0xff);
    lo = o < o1 ? 0 : (o < o2 ? r1 : r2);
    hi = o < o1 ? r1 : (o < o2 ? r2 : (int)e.r);
}

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
// Both kernels issue `mma.sync.m16n8k16` (bf16 in, f32 accumulate) on fragments loaded 16 bytes
// a lane: a lane takes 8 consecutive k of each row it holds, and the two k16 steps of each 32
// are fed those k in an order that is the same for both operands, which a dot product allows.
// Shrink gives each block one 16-row slice and 16 ranks over a fixed part of `in`; on sm_90 the
// SHRINK_SPLIT parts are a cluster of blocks whose first adds the others' sums from their shared
// memory in rank order, so h (f32) is written in one pass with no global partial sums. Expand
// gives each block one tile and 16 * EXPAND_WARPS columns: it stages the tile's h in shared memory
// as bf16 hi + lo halves (about f32's precision), once for all its warps; each warp keeps its
// columns of B in registers across the tile's slices and loads the outputs it updates before the
// products. Every memory access a kernel can issue early is issued before the first wait. An
// output row depends only on its own input row, whatever tile it lands in.
#define TILE 64
#define SLICES (TILE / 16)
#define SHRINK_BATCH 4
#define SHRINK_WARPS 8
#define EXPAND_WARPS 8
#define EXPAND_CH 64
// Words per staged row: EXPAND_CH / 2 pairs and 16 more, so that the 16-byte loads of a quarter
// warp (rows g, g + 1, four lanes each) fall in distinct banks.
#define HS_STRIDE (EXPAND_CH / 2 + 16)

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

// 8 bf16 at p when `ok` (16-byte aligned), zeros otherwise.
__device__ __forceinline__ uint4 ld128(const __nv_bfloat16* p, bool ok) {
    return ok ? *reinterpret_cast<const uint4*>(p) : make_uint4(0, 0, 0, 0);
}

// acc[n] += rows (x0: row g, x1: row g + 8) . columns b[n] over one 32-wide chunk of k, each
// lane's 8 k per row in x0, x1 and b[n] (the same 8 k for all); common.cuh's product.
__device__ __forceinline__ void mma_chunk(float (&acc)[2][4], uint4 x0, uint4 x1, const uint4 (&b)[2]) {
#pragma unroll
    for (int n = 0; n < 2; n++) {
        mma_16x8x16(acc[n], x0.x, x1.x, x0.y, x1.y, b[n].x, b[n].y);
        mma_16x8x16(acc[n], x0.z, x1.z, x0.w, x1.w, b[n].z, b[n].w);
    }
}

// One warp's part of a shrink block: `acc` += a 16-row slice (rows xr0, xr1) times 16 ranks
// (ar0, ar1) over the 32-wide chunks c0 .. c1 of `in`, SHRINK_BATCH chunks' loads issued before
// their products, so the warp waits for memory once a batch.
__device__ __forceinline__ void shrink_chunks(const __nv_bfloat16* xr0, const __nv_bfloat16* xr1,
                                              const __nv_bfloat16* ar0, const __nv_bfloat16* ar1,
                                              int c0, int c1, int in, int t, float (&acc)[2][4]) {
    for (int c = c0; c < c1; c += SHRINK_BATCH) {
        uint4 x[SHRINK_BATCH][2], b[SHRINK_BATCH][2];
#pragma unroll
        for (int j = 0; j < SHRINK_BATCH; j++) {
            const int k = 32 * (c + j) + 8 * t;
            const bool ok = c + j < c1 && k < in;
            x[j][0] = ld128(xr0 + k, ok);
            x[j][1] = ld128(xr1 + k, ok);
            b[j][0] = ld128(ar0 + k, ok);
            b[j][1] = ld128(ar1 + k, ok);
        }
#pragma unroll
        for (int j = 0; j < SHRINK_BATCH; j++) {
            if (c + j < c1) mma_chunk(acc, x[j][0], x[j][1], b[j]);
        }
    }
}

// This block's sums over the chunks c0 .. c1 of `in` for its 16 rows and 16 ranks, into `sum`:
// each of SHRINK_WARPS warps takes a fixed part, added in warp order.
__device__ __forceinline__ void shrink_block(const __nv_bfloat16* xr0, const __nv_bfloat16* xr1,
                                             const __nv_bfloat16* ar0, const __nv_bfloat16* ar1,
                                             int c0, int c1, int in, float (*sum)[17]) {
    __shared__ float red[SHRINK_WARPS][16][17];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n = c1 - c0;
    float acc[2][4] = {};
    shrink_chunks(xr0, xr1, ar0, ar1, c0 + warp * n / SHRINK_WARPS,
                  c0 + (warp + 1) * n / SHRINK_WARPS, in, t, acc);
#pragma unroll
    for (int q = 0; q < 2; q++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            red[warp][g + 8 * u][8 * q + 2 * t] = acc[q][2 * u];
            red[warp][g + 8 * u][8 * q + 2 * t + 1] = acc[q][2 * u + 1];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < SHRINK_WARPS; w++) v += red[w][i / 16][i % 16];
        sum[i / 16][i % 16] = v;
    }
}

// h[p, r] = x[order[p], :] . A_slot[r, :] for the 16-row slice blockIdx.x % SLICES of tile
// blockIdx.x / SLICES and ranks blockIdx.y * 16 .. +16 (below the slot's R). Grid (max_tiles *
// SLICES, rmax / 16, SPLIT), 32 * SHRINK_WARPS threads. On sm_90 the SPLIT blocks along z form a
// cluster, block z summing the z-th part of `in`'s 32-wide chunks (so that `in` is read by
// several SMs), and the first adds the others' sums in rank order; before sm_90 the first block
// takes all of `in` and the others return.
template <int SPLIT>
__device__ __forceinline__ void shrink_mma(const __nv_bfloat16* x, const unsigned long long* meta,
                                           int entries, int tiles_at, int max_tiles, int in,
                                           int rmax, float* h) {
    __shared__ float sum[16][17];
    Tile tile;
    const int slice = blockIdx.x % SLICES;
    if (!tile_at(meta, tiles_at, blockIdx.x / SLICES, tile) || 16 * slice >= tile.rows) return;
    const Entry e = reinterpret_cast<const Entry*>(meta + entries)[tile.slot];
    const int r0 = blockIdx.y * 16;
    if (r0 >= (int)e.r) return;
    const int g = (threadIdx.x % 32) / 4;
    const unsigned long long* order = meta + tiles_at + 2 + 3 * max_tiles;
    const int first = 16 * slice, row0 = first + g, row1 = row0 + 8;
    // Rows past the tile read the slice's first row; their sums are not written.
    const __nv_bfloat16* xr0 = x + order[tile.start + (row0 < tile.rows ? row0 : first)] * in;
    const __nv_bfloat16* xr1 = x + order[tile.start + (row1 < tile.rows ? row1 : first)] * in;
    const __nv_bfloat16* ar0 = e.a + (size_t)(r0 + g) * in;
    const __nv_bfloat16* ar1 = e.a + (size_t)(r0 + 8 + g) * in;
    const int chunks = (in + 31) / 32;
#if __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    const int part = (int)cluster.block_rank();
    shrink_block(xr0, xr1, ar0, ar1, part * chunks / SPLIT, (part + 1) * chunks / SPLIT, in, sum);
    cluster.sync();
    for (int i = threadIdx.x; part == 0 && i < 256; i += blockDim.x) {
        const int row = i / 16, c = i % 16;
        float v = 0.f;
#pragma unroll
        for (int z = 0; z < SPLIT; z++) v += cluster.map_shared_rank(&sum[0][0], z)[row * 17 + c];
        if (first + row < tile.rows) h[(size_t)(tile.start + first + row) * rmax + r0 + c] = v;
    }
    // The others' shared memory stays until the first block has read it.
    cluster.sync();
#else
    if (blockIdx.z != 0) return;
    shrink_block(xr0, xr1, ar0, ar1, 0, chunks, in, sum);
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        const int row = i / 16, c = i % 16;
        if (first + row < tile.rows) h[(size_t)(tile.start + first + row) * rmax + r0 + c] = sum[row][c];
    }
#endif
}

#if __CUDA_ARCH__ >= 900
#define CLUSTER(n) __cluster_dims__(1, 1, n)
#else
#define CLUSTER(n)
#endif

// Splits of 4 for `in` up to 8,192, of 8 above (the host picks; measured on the H200).
#define SHRINK_KERNEL(split)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * SHRINK_WARPS) CLUSTER(split)             \
        lora_shrink_mma##split(const __nv_bfloat16* x, const unsigned long long* meta,         \
                               int entries, int tiles_at, int max_tiles, int in, int rmax,     \
                               float* h) {                                                     \
        shrink_mma<split>(x, meta, entries, tiles_at, max_tiles, in, rmax, h);                 \
    }
SHRINK_KERNEL(4)
SHRINK_KERNEL(8)

// The bf16 hi and lo halves of two floats, each packed as a pair.
__device__ __forceinline__ void halves(float2 v, unsigned& hi, unsigned& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
    const float2 back = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(v.x - back.x, v.y - back.y);
    hi = *reinterpret_cast<const unsigned*>(&h);
    lo = *reinterpret_cast<const unsigned*>(&l);
}

// y[order[p], o] += h[p, :R] . B_slot[o, :R] for the rows of tile blockIdx.x and columns
// blockIdx.y * 16 * EXPAND_WARPS + 16 * warp .. +16, over only the ranks each column's row of B
// can hold non-zero (Entry::seg; a warp's 16 columns share them). Grid (max_tiles, ceil(out /
// (16 * EXPAND_WARPS))), 32 * EXPAND_WARPS threads. The block's ranks go by chunks of EXPAND_CH:
// each warp issues its B loads for the chunk and the block its loads of the chunk's h, which it
// stages as hi and lo pairs; then every slice of the tile is multiplied by the same B fragments.
extern "C" __global__ void __launch_bounds__(32 * EXPAND_WARPS)
    lora_expand_mma(const float* h, const unsigned long long* meta, int entries, int tiles_at,
                    int max_tiles, int out, int rmax, float* y) {
    constexpr int PAIRS = EXPAND_CH / 2, PER_THREAD = TILE * PAIRS / (32 * EXPAND_WARPS);
    __shared__ __align__(16) unsigned hs[2][TILE][HS_STRIDE];
    Tile tile;
    if (!tile_at(meta, tiles_at, blockIdx.x, tile)) return;
    const Entry e = reinterpret_cast<const Entry*>(meta + entries)[tile.slot];
    const int R = (int)e.r;
    if (R == 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int first = blockIdx.y * 16 * EXPAND_WARPS, o0 = first + 16 * warp;
    // Warps past `out` still stage h with the others.
    const bool active = o0 < out;
    int lo, hi, block_lo, block_hi, unused;
    seg_ranks(e, min(o0, out - 1), lo, hi);
    seg_ranks(e, first, block_lo, unused);
    seg_ranks(e, min(first + 16 * EXPAND_WARPS, out) - 1, unused, block_hi);
    const __nv_bfloat16* br[2] = {e.b + (size_t)(active ? o0 + g : 0) * R,
                                  e.b + (size_t)(active ? o0 + 8 + g : 0) * R};
    // The outputs this lane updates, loaded before any product.
    const unsigned long long* order = meta + tiles_at + 2 + 3 * max_tiles;
    long long prow[SLICES][2];
    float2 yv[SLICES][2][2];
#pragma unroll
    for (int s = 0; s < SLICES; s++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int row = 16 * s + g + 8 * u;
            prow[s][u] = active && row < tile.rows ? (long long)order[tile.start + row] : -1;
#pragma unroll
            for (int n = 0; n < 2; n++)
                yv[s][u][n] = prow[s][u] >= 0 ? *reinterpret_cast<const float2*>(
                                                    y + prow[s][u] * out + o0 + 8 * n + 2 * t)
                                              : make_float2(0.f, 0.f);
        }
    // A warp's last chunk of ranks may read up to 16 words past a staged row: zeros, which its
    // zero B fragments multiply, never uninitialized (NaN) words.
    for (int i = threadIdx.x; i < 2 * TILE * (HS_STRIDE - PAIRS); i += blockDim.x) {
        const int pad = HS_STRIDE - PAIRS;
        hs[i / (TILE * pad)][(i / pad) % TILE][PAIRS + i % pad] = 0;
    }
    float acc[SLICES][2][4] = {};
    for (int c0 = block_lo; c0 < block_hi; c0 += EXPAND_CH) {
        // This warp's ranks within the chunk, from a multiple of 8 above c0.
        const int from = max(lo, c0), to = min(hi, c0 + EXPAND_CH);
        uint4 b[EXPAND_CH / 32][2];
#pragma unroll
        for (int j = 0; j < EXPAND_CH / 32; j++) {
            const int r = from + 32 * j + 8 * t;
#pragma unroll
            for (int n = 0; n < 2; n++) b[j][n] = ld128(br[n] + r, active && r < to);
        }
        float2 hv[PER_THREAD];
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++) {
            const int q = threadIdx.x + i * 32 * EXPAND_WARPS, row = q / PAIRS, r = c0 + 2 * (q % PAIRS);
            hv[i] = row < tile.rows && r < block_hi
                        ? *reinterpret_cast<const float2*>(h + (size_t)(tile.start + row) * rmax + r)
                        : make_float2(0.f, 0.f);
        }
        if (c0 > block_lo) __syncthreads();
#pragma unroll
        for (int i = 0; i < PER_THREAD; i++) {
            const int q = threadIdx.x + i * 32 * EXPAND_WARPS, row = q / PAIRS, kp = q % PAIRS;
            halves(hv[i], hs[0][row][kp], hs[1][row][kp]);
        }
        __syncthreads();
        if (!active || from >= to) continue;
        const int chunks = (to - from + 31) / 32, w0 = (from - c0) / 2;
#pragma unroll
        for (int s = 0; s < SLICES; s++) {
            if (16 * s >= tile.rows) continue;
#pragma unroll
            for (int j = 0; j < EXPAND_CH / 32; j++) {
                if (j >= chunks) continue;
                const int w = w0 + 16 * j + 4 * t;
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const uint4 x0 = *reinterpret_cast<const uint4*>(&hs[half][16 * s + g][w]);
                    const uint4 x1 = *reinterpret_cast<const uint4*>(&hs[half][16 * s + 8 + g][w]);
                    mma_chunk(acc[s], x0, x1, b[j]);
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int s = 0; s < SLICES; s++)
#pragma unroll
        for (int u = 0; u < 2; u++)
#pragma unroll
            for (int n = 0; n < 2; n++) {
                if (prow[s][u] < 0) continue;
                float2 v = yv[s][u][n];
                v.x += acc[s][n][2 * u];
                v.y += acc[s][n][2 * u + 1];
                *reinterpret_cast<float2*>(y + prow[s][u] * out + o0 + 8 * n + 2 * t) = v;
            }
}
