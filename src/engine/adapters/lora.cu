// LoRA shrink and expand for a step whose rows may each use a different adapter (Punica's BGMV):
// one launch each per packed projection group, whatever the number of adapters in the step; for
// a gated MLP's gate|up group the expand can also apply the activation (`lora_expand_act_*`),
// replacing the separate `act_mul`.
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
#include "../ops/activation.cuh"     // act_of

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
// The rows of a step are sorted by slot and cut into tiles of at most TILE rows of one slot,
// the rows with no adapter last, in tiles of slot -1 (built on the host, after the entries at
// `tiles_at`): {tiles, rows, then per tile {slot, start, rows}, max_tiles of them, then TILE
// words per tile: its packed rows (`tile_row`)}. A tile's rows hold sorted positions start ..
// start + rows, which index the shrunk rows h. Only the fused gate|up expand reads the tiles of
// slot -1 (every row needs its activation); the other kernels skip them. A block reads its tile,
// its slot's entry and its packed rows in one round of loads before any other.
// Both kernels issue `mma.sync.m16n8k16` (bf16 in, f32 accumulate) on fragments loaded 16 bytes
// a lane: a lane takes 8 consecutive k of each row it holds, and the two k16 steps of each 32
// are fed those k in an order that is the same for both operands, which a dot product allows.
// Shrink gives each block one 16-row slice and 16 ranks over a fixed part of `in`; on sm_90 the
// SHRINK_SPLIT parts are a cluster of blocks whose first adds the others' sums from their shared
// memory in rank order, so h (f32) is written in one pass with no global partial sums. Expand
// gives each block one tile and 16 * EXPAND_WARPS columns of B: it stages the tile's h in shared memory
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
// Words per staged row (expand_tile's STRIDE): a chunk's pairs and 16 more, so that the 16-byte
// loads of a quarter warp (rows g, g + 1, four lanes each) fall in distinct banks.

struct Tile {
    int slot, start, rows;
};

// Slots whose entries a block reads with its tile (the slot capacity of a step's table); the
// entry of a slot past them is read after the tile.
#define PRELOAD_SLOTS 32

// Tile i of the step and, in `e`, its slot's entry for the group at word `entries` (zeros for
// the rows with no adapter); false past the step's tiles. One round of loads: the threads below
// 4 + 4 * capacity each load one word into shared memory (the tile count, the tile's words and
// the group's entries of every slot) and the block picks its own, so that the tile and its
// slot's entry do not wait for each other. Every thread of the block calls it.
__device__ __forceinline__ bool tile_entry(const unsigned long long* meta, int tiles_at,
                                           int entries, int capacity, int i, Tile& t, Entry& e) {
    __shared__ unsigned long long words[4 + 4 * PRELOAD_SLOTS];
    const int n = 4 + 4 * min(capacity, PRELOAD_SLOTS);
    for (int k = threadIdx.x; k < n; k += blockDim.x)
        words[k] = k == 0 ? meta[tiles_at]
                          : (k < 4 ? meta[tiles_at + 2 + 3 * i + k - 1] : meta[entries + k - 4]);
    __syncthreads();
    if ((unsigned long long)i >= words[0]) return false;
    t.slot = (int)words[1];
    t.start = (int)words[2];
    t.rows = (int)words[3];
    if (t.slot < 0) {
        e = Entry{nullptr, nullptr, 0, 0};
    } else if (t.slot < PRELOAD_SLOTS) {
        const unsigned long long* w = words + 4 + 4 * t.slot;
        e = Entry{reinterpret_cast<const __nv_bfloat16*>(w[0]),
                  reinterpret_cast<const __nv_bfloat16*>(w[1]), w[2], w[3]};
    } else {
        e = reinterpret_cast<const Entry*>(meta + entries)[t.slot];
    }
    return true;
}

// The packed row of row j of tile i: the table keeps TILE words per tile (after its tiles,
// `max_tiles` records), rows past the tile's repeating its first, so that a kernel reads them
// with its tile, before it knows how many rows the tile holds.
__device__ __forceinline__ long long tile_row(const unsigned long long* meta, int tiles_at,
                                              int max_tiles, int i, int j) {
    return (long long)meta[tiles_at + 2 + 3 * max_tiles + i * TILE + j];
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

// h[p, r] = x[row, :] . A_slot[r, :] for the 16-row slice blockIdx.x % SLICES of tile
// blockIdx.x / SLICES and ranks blockIdx.y * 16 .. +16 (below the slot's R). Grid (max_tiles *
// SLICES, rmax / 16, SPLIT), 32 * SHRINK_WARPS threads. On sm_90 the SPLIT blocks along z form a
// cluster, block z summing the z-th part of `in`'s 32-wide chunks (so that `in` is read by
// several SMs), and the first adds the others' sums in rank order; before sm_90 the first block
// takes all of `in` and the others return.
template <int SPLIT>
__device__ __forceinline__ void shrink_mma(const __nv_bfloat16* x, const unsigned long long* meta,
                                           int entries, int capacity, int tiles_at,
                                           int max_tiles, int in, int rmax, float* h) {
    __shared__ float sum[16][17];
    Tile tile;
    Entry e;
    const int slice = blockIdx.x % SLICES, i = blockIdx.x / SLICES;
    const int g = (threadIdx.x % 32) / 4;
    const int first = 16 * slice, row0 = first + g, row1 = row0 + 8;
    // Rows past the tile read its first row; their sums are not written.
    const long long p0 = tile_row(meta, tiles_at, max_tiles, i, row0);
    const long long p1 = tile_row(meta, tiles_at, max_tiles, i, row1);
    if (!tile_entry(meta, tiles_at, entries, capacity, i, tile, e) || 16 * slice >= tile.rows ||
        tile.slot < 0)
        return;
    const int r0 = blockIdx.y * 16;
    if (r0 >= (int)e.r) return;
    const __nv_bfloat16* xr0 = x + p0 * in;
    const __nv_bfloat16* xr1 = x + p1 * in;
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
                               int entries, int capacity, int tiles_at, int max_tiles, int in, \
                               int rmax, float* h) {                                           \
        shrink_mma<split>(x, meta, entries, capacity, tiles_at, max_tiles, in, rmax, h);       \
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

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 8 bf16 pairs of rows g and g + 8 at pair w of a staged slice, both halves.
template <int STRIDE>
__device__ __forceinline__ void staged(const unsigned (*hs)[TILE][STRIDE], int row, int w,
                                       uint4 (&x)[2][2]) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        x[half][0] = *reinterpret_cast<const uint4*>(&hs[half][row][w]);
        x[half][1] = *reinterpret_cast<const uint4*>(&hs[half][row + 8][w]);
    }
}

// One 16 x 8 product: acc += rows (x) . one 8-column fragment b over a 32-wide chunk of ranks.
__device__ __forceinline__ void mma_frag(float (&acc)[4], const uint4 (&x)[2][2], uint4 b) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        mma_16x8x16(acc, x[half][0].x, x[half][1].x, x[half][0].y, x[half][1].y, b.x, b.y);
        mma_16x8x16(acc, x[half][0].z, x[half][1].z, x[half][0].w, x[half][1].w, b.z, b.w);
    }
}

// The expand of tile blockIdx.x: for each row p of the tile (packed row `tile_row`) and each of
// this warp's two 8-column fragments f of B (columns col[f] .. +8), acc = h[p, :R] . B_slot[col,
// :R] over only the ranks those columns' rows of B can hold non-zero (Entry::seg), then:
// - PARTS 1 (`lora_expand_mma`): y[row, col] += acc, y [T, cols]; the warp's columns are
//   16 consecutive ones, blockIdx.y * 16 * EXPAND_WARPS + 16 * warp;
// - PARTS 2 (`lora_expand_act_*`): y [T, 2 cols] holds a gated MLP's gate | up projections and
//   is only read; out[row, c] = act(gate + its delta) * (up + its delta) for the warp's 8
//   columns c from blockIdx.y * 8 * EXPAND_WARPS + 8 * warp, fragment 0 gate column c and
//   fragment 1 up column cols + c. Tiles of rows with no adapter (slot -1) get act(gate) * up.
// Grid (max_tiles, column blocks), 32 * EXPAND_WARPS threads. The block's ranks go by chunks of
// CH (EXPAND_CH; twice that for the fused activation): each warp issues its B loads for the
// chunk and the block its loads of the chunk's h, which it stages as bf16 hi and lo pairs (about
// f32's precision); then every slice of the tile is multiplied by the same B fragments. The
// outputs a lane updates are loaded before any product.
template <int PARTS, typename T>
__device__ __forceinline__ void expand_tile(const float* h, const unsigned long long* meta,
                                            int entries, int capacity, int tiles_at,
                                            int max_tiles, int cols, int rmax, float* y, T* out,
                                            int act) {
    // The fused activation's warps take ranks of two modules (gate's, then up's): their chunk
    // holds both, so that B and h are loaded in one round.
    constexpr int CH = PARTS * EXPAND_CH, PAIRS = CH / 2, STRIDE = PAIRS + 16;
    constexpr int PER_THREAD = TILE * PAIRS / (32 * EXPAND_WARPS);
    __shared__ __align__(16) unsigned hs[2][TILE][STRIDE];
    Tile tile;
    Entry e;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int prow[SLICES][2];
#pragma unroll
    for (int s = 0; s < SLICES; s++)
#pragma unroll
        for (int u = 0; u < 2; u++)
            prow[s][u] = (int)tile_row(meta, tiles_at, max_tiles, blockIdx.x, 16 * s + g + 8 * u);
    if (!tile_entry(meta, tiles_at, entries, capacity, blockIdx.x, tile, e)) return;
    const int R = (int)e.r;
    if (PARTS == 1 && R == 0) return;
    // B's columns of this warp's two fragments and of the block's first and last ones.
    const int per_warp = 16 / PARTS;
    const int first = blockIdx.y * per_warp * EXPAND_WARPS, c = first + per_warp * warp;
    const int last = min(first + per_warp * EXPAND_WARPS, cols) - 1;
    // Warps past `cols` still stage h with the others.
    const bool active = c < cols;
    const int col[2] = {c, PARTS == 1 ? c + 8 : cols + c};
    const int stride = PARTS * cols;
    int lo[2] = {0, 0}, hi[2] = {0, 0}, block_lo = 0, block_hi = 0;
    if (R > 0) {
        int unused;
        seg_ranks(e, first, block_lo, unused);
        seg_ranks(e, PARTS == 1 ? last : cols + last, unused, block_hi);
        if (PARTS == 2) {
            int l2, h2;
            seg_ranks(e, cols + first, l2, unused);
            seg_ranks(e, last, unused, h2);
            block_lo = min(block_lo, l2);
            block_hi = max(block_hi, h2);
        }
#pragma unroll
        for (int f = 0; f < 2; f++) seg_ranks(e, active ? col[f] : 0, lo[f], hi[f]);
    }
    float2 yv[SLICES][2][2];
#pragma unroll
    for (int s = 0; s < SLICES; s++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int row = 16 * s + g + 8 * u;
            if (!active || row >= tile.rows) prow[s][u] = -1;
#pragma unroll
            for (int f = 0; f < 2; f++)
                yv[s][u][f] = prow[s][u] >= 0 ? *reinterpret_cast<const float2*>(
                                                    y + (size_t)prow[s][u] * stride + col[f] + 2 * t)
                                              : make_float2(0.f, 0.f);
        }
    float acc[SLICES][2][4] = {};
    if (block_lo < block_hi) {
        // A warp's last chunk of ranks may read up to 16 words past a staged row: zeros, which
        // its zero B fragments multiply, never uninitialized (NaN) words.
        for (int i = threadIdx.x; i < 2 * TILE * (STRIDE - PAIRS); i += blockDim.x) {
            const int pad = STRIDE - PAIRS;
            hs[i / (TILE * pad)][(i / pad) % TILE][PAIRS + i % pad] = 0;
        }
    }
    for (int c0 = block_lo; c0 < block_hi; c0 += CH) {
        // Each fragment's ranks within the chunk, from a multiple of 8 above c0.
        int from[2], to[2];
        uint4 b[2][CH / 32];
#pragma unroll
        for (int f = 0; f < 2; f++) {
            from[f] = max(lo[f], c0);
            to[f] = min(hi[f], c0 + CH);
#pragma unroll
            for (int j = 0; j < CH / 32; j++) {
                const int r = from[f] + 32 * j + 8 * t;
                b[f][j] = ld128(e.b + (size_t)(active ? col[f] + g : 0) * R + r, active && r < to[f]);
            }
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
        if (!active) continue;
#pragma unroll
        for (int s = 0; s < SLICES; s++) {
            if (16 * s >= tile.rows) continue;
#pragma unroll
            for (int j = 0; j < CH / 32; j++) {
                if (PARTS == 1) {
                    // Both fragments take the same ranks: one load of the staged rows.
                    if (from[0] + 32 * j >= to[0]) continue;
                    uint4 x[2][2];
                    staged(hs, 16 * s + g, (from[0] - c0) / 2 + 16 * j + 4 * t, x);
#pragma unroll
                    for (int f = 0; f < 2; f++) mma_frag(acc[s][f], x, b[f][j]);
                } else {
#pragma unroll
                    for (int f = 0; f < 2; f++) {
                        if (from[f] + 32 * j >= to[f]) continue;
                        uint4 x[2][2];
                        staged(hs, 16 * s + g, (from[f] - c0) / 2 + 16 * j + 4 * t, x);
                        mma_frag(acc[s][f], x, b[f][j]);
                    }
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int s = 0; s < SLICES; s++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            if (prow[s][u] < 0) continue;
            float2 v[2];
#pragma unroll
            for (int f = 0; f < 2; f++) {
                v[f] = yv[s][u][f];
                v[f].x += acc[s][f][2 * u];
                v[f].y += acc[s][f][2 * u + 1];
            }
            if (PARTS == 1) {
#pragma unroll
                for (int f = 0; f < 2; f++)
                    *reinterpret_cast<float2*>(y + (size_t)prow[s][u] * cols + col[f] + 2 * t) = v[f];
            } else {
                T* dst = out + (size_t)prow[s][u] * cols + c + 2 * t;
                store(dst, act_of(v[0].x, act) * v[1].x);
                store(dst + 1, act_of(v[0].y, act) * v[1].y);
            }
        }
}

// y[row, o] += h[p, :R] . B_slot[o, :R] for the rows of each tile (expand_tile, PARTS 1).
// Grid (max_tiles, ceil(out / (16 * EXPAND_WARPS))).
extern "C" __global__ void __launch_bounds__(32 * EXPAND_WARPS)
    lora_expand_mma(const float* h, const unsigned long long* meta, int entries, int capacity,
                    int tiles_at, int max_tiles, int out, int rmax, float* y) {
    expand_tile<1, float>(h, meta, entries, capacity, tiles_at, max_tiles, out, rmax, y, nullptr,
                          0);
}

// out[t, c] = act(gate + delta) * (up + delta) for a gated MLP's f32 gate | up rows y [T, 2 n]
// and every row t of the step (expand_tile, PARTS 2; `act` 0 silu, 1 gelu tanh), out [T, n].
// Grid (max_tiles, ceil(n / (8 * EXPAND_WARPS))).
#define EXPAND_ACT(SUFFIX, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * EXPAND_WARPS) lora_expand_act_##SUFFIX(   \
        const float* h, const unsigned long long* meta, int entries, int capacity,             \
        int tiles_at, int max_tiles, int n, int rmax, const float* y, T* out, int act) {       \
        expand_tile<2, T>(h, meta, entries, capacity, tiles_at, max_tiles, n, rmax,            \
                          const_cast<float*>(y), out, act);                                     \
    }
EXPAND_ACT(f32, float)
EXPAND_ACT(bf16, __nv_bfloat16)
