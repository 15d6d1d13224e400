// An adapter's decode cost with and without programmatic dependent launch (PDL): a layer of the
// 8B shape as the engine's decode graph runs it with a rank-64 adapter on all seven projections
// (per group: the cuBLAS projection, f32 out, o and down accumulating; then lora.cu's
// `lora_shrink_mma*` and `lora_expand_mma` in line), captured for 32 layers (weights rotated over
// 4 copies so that L2 holds none) and timed as graph replays, best of 5, in three forms: the
// projections alone, the adapter's kernels launched plainly, and launched with the PDL attribute
// (their prologues, the host's tables and weights, overlap the kernel before). The two adapter
// forms' outputs are compared bit for bit. Built and run by bench/lora-pdl.sh.
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include "lora.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)
#define CB(x) do { cublasStatus_t e = (x); if (e != CUBLAS_STATUS_SUCCESS) { printf("cuBLAS %s at %d: %d\n", #x, __LINE__, (int)e); exit(1); } } while (0)

struct G { const char* name; int in, out, R; bool accumulate; std::vector<int> ob, rb; };

static unsigned short f2bf(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
static std::mt19937 rng(1);
static std::vector<unsigned short> rnd_bf(size_t n, float sd) { std::normal_distribution<float> d(0, sd); std::vector<unsigned short> v(n); for (auto& x : v) x = f2bf(d(rng)); return v; }
template <class T> T* dev(const std::vector<T>& v) { T* p; CK(cudaMalloc(&p, v.size() * sizeof(T) + 256)); CK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); return p; }

// The engine's table (cuda.rs `table_words`): row slots, [group][slot] entries, tiles, order.
struct Meta { std::vector<unsigned long long> w; int entries0, tiles_at, max_tiles; };
static Meta build(int T, int cap, const std::vector<std::array<unsigned long long, 4>>& ent) {
  Meta m;
  for (int i = 0; i < T; i++) m.w.push_back(0);
  m.entries0 = T;
  for (int g = 0; g < 4; g++) for (int k = 0; k < cap; k++) for (int q = 0; q < 4; q++) m.w.push_back(k == 0 ? ent[g][q] : 0);
  m.tiles_at = m.w.size(); m.max_tiles = (T + 63) / 64 + cap;
  std::vector<unsigned long long> tiles;
  for (int st = 0; st < T; st += 64) { tiles.push_back(0); tiles.push_back(st); tiles.push_back(std::min(64, T - st)); }
  m.w.push_back(tiles.size() / 3); m.w.push_back(T);
  for (auto x : tiles) m.w.push_back(x);
  m.w.resize(m.w.size() + 3 * m.max_tiles - tiles.size(), 0);
  for (int i = 0; i < T; i++) m.w.push_back(i);
  return m;
}

template <typename... K, typename... A>
static void launch(bool pdl, dim3 grid, dim3 block, cudaStream_t s, void (*k)(K...), A... args) {
  cudaLaunchConfig_t c = {};
  c.gridDim = grid; c.blockDim = block; c.dynamicSmemBytes = 0; c.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  c.attrs = at; c.numAttrs = pdl ? 1 : 0;
  CK(cudaLaunchKernelEx(&c, k, (K)args...));
}

int main() {
  std::vector<G> gs = {{"qkv", 4096, 6144, 192, false, {4096, 5120, 6144}, {64, 128, 192}},
                       {"o", 4096, 4096, 64, true, {4096}, {64}},
                       {"gate_up", 4096, 28672, 128, false, {14336, 28672}, {64, 128}},
                       {"down", 14336, 4096, 64, true, {4096}, {64}}};
  const int COPIES = 4, LAYERS = 32, RMAX = 256, TMAX = 256;
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cublasHandle_t hb; CB(cublasCreate(&hb)); CB(cublasSetStream(hb, st));
  void* ws; CK(cudaMalloc(&ws, 32 << 20)); CB(cublasSetWorkspace(hb, ws, 32 << 20));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  std::vector<std::array<unsigned long long, 4>> ent;
  std::vector<std::vector<__nv_bfloat16*>> W(4);
  std::vector<__nv_bfloat16*> X(4);
  std::vector<float*> Y(4);
  for (int g = 0; g < 4; g++) {
    const G& q = gs[g];
    auto bh = rnd_bf((size_t)q.out * q.R, 0.02f);
    for (size_t p = 0, o0 = 0, r0 = 0; p < q.ob.size(); o0 = q.ob[p], r0 = q.rb[p], p++)
      for (int o = o0; o < q.ob[p]; o++) for (int r = 0; r < q.R; r++) if (r < (int)r0 || r >= q.rb[p]) bh[(size_t)o * q.R + r] = 0;
    unsigned long long seg = 0;
    if (q.ob.size() > 1) seg = (1ull << 63) | (unsigned long long)(q.ob[0] / 16) | ((unsigned long long)(q.rb[0] / 8) << 16) | ((unsigned long long)(q.ob[1] / 16) << 24) | ((unsigned long long)(q.rb[1] / 8) << 40);
    auto a = dev(rnd_bf((size_t)q.R * q.in, 0.02f)); auto b = dev(bh);
    ent.push_back({(unsigned long long)a, (unsigned long long)b, (unsigned long long)q.R, seg});
    for (int c = 0; c < COPIES; c++) W[g].push_back((__nv_bfloat16*)dev(rnd_bf((size_t)q.out * q.in, 0.02f)));
    X[g] = (__nv_bfloat16*)dev(rnd_bf((size_t)TMAX * q.in, 1.0f));
    CK(cudaMalloc(&Y[g], (size_t)TMAX * q.out * 4));
  }
  float* h; CK(cudaMalloc(&h, (size_t)TMAX * RMAX * 4));
  for (int T : {1, 16, 64, 256}) {
    Meta m = build(T, 2, ent);
    unsigned long long* meta = dev(m.w);
    // mode 0: projections only; 1: adapter, plain launches; 2: adapter, PDL launches.
    auto layer = [&](int mode, int l) {
      for (int g = 0; g < 4; g++) {
        const G& q = gs[g];
        const float one = 1.f, beta = q.accumulate ? 1.f : 0.f;
        CB(cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, q.out, T, q.in, &one, W[g][l % COPIES], CUDA_R_16BF, q.in,
                        X[g], CUDA_R_16BF, q.in, &beta, Y[g], CUDA_R_32F, q.out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
        if (mode == 0) continue;
        const bool pdl = mode == 2;
        const int entries = m.entries0 + g * 2 * 4, rb = RMAX / 16;
        const __nv_bfloat16* x = X[g];
        if (q.in > 8192)
          launch(pdl, dim3(m.max_tiles * SLICES, rb, 8), dim3(32 * SHRINK_WARPS), st, lora_shrink_mma8, x, (const unsigned long long*)meta, entries, m.tiles_at, m.max_tiles, q.in, RMAX, h);
        else
          launch(pdl, dim3(m.max_tiles * SLICES, rb, 4), dim3(32 * SHRINK_WARPS), st, lora_shrink_mma4, x, (const unsigned long long*)meta, entries, m.tiles_at, m.max_tiles, q.in, RMAX, h);
        launch(pdl, dim3(m.max_tiles, (q.out + 16 * EXPAND_WARPS - 1) / (16 * EXPAND_WARPS)), dim3(32 * EXPAND_WARPS), st, lora_expand_mma,
               (const float*)h, (const unsigned long long*)meta, entries, m.tiles_at, m.max_tiles, q.out, RMAX, Y[g]);
      }
    };
    // Bit-for-bit: one layer each way from the same outputs.
    std::vector<std::vector<float>> out[2];
    for (int mode = 1; mode <= 2; mode++) {
      for (int g = 0; g < 4; g++) CK(cudaMemsetAsync(Y[g], 0, (size_t)T * gs[g].out * 4, st));
      layer(mode, 0);
      CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
      for (int g = 0; g < 4; g++) { std::vector<float> v((size_t)T * gs[g].out); CK(cudaMemcpy(v.data(), Y[g], v.size() * 4, cudaMemcpyDeviceToHost)); out[mode - 1].push_back(v); }
    }
    size_t differ = 0;
    for (int g = 0; g < 4; g++) for (size_t i = 0; i < out[0][g].size(); i++) differ += memcmp(&out[0][g][i], &out[1][g][i], 4) != 0;
    float t[3];
    for (int mode = 0; mode < 3; mode++) {
      cudaGraph_t gr; cudaGraphExec_t ex;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      for (int l = 0; l < LAYERS; l++) layer(mode, l);
      CK(cudaStreamEndCapture(st, &gr)); CK(cudaGraphInstantiate(&ex, gr, 0));
      CK(cudaGraphLaunch(ex, st)); CK(cudaStreamSynchronize(st));
      float best = 1e9;
      for (int rep = 0; rep < 5; rep++) {
        cudaEventRecord(e0, st); CK(cudaGraphLaunch(ex, st)); cudaEventRecord(e1, st); CK(cudaEventSynchronize(e1));
        float ms; cudaEventElapsedTime(&ms, e0, e1); best = std::min(best, ms);
      }
      t[mode] = best * 1000.f / LAYERS;
      cudaGraphExecDestroy(ex); cudaGraphDestroy(gr);
    }
    printf("rows %3d: projections %6.1f us a layer; + adapter, plain %6.1f (+%5.1f, %4.1f %%); PDL %6.1f (+%5.1f, %4.1f %%); outputs differing %zu\n",
           T, t[0], t[1], t[1] - t[0], 100 * (t[1] - t[0]) / t[0], t[2], t[2] - t[0], 100 * (t[2] - t[0]) / t[0], differ);
    cudaFree(meta);
  }
  return 0;
}
