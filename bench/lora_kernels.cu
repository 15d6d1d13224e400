// The LoRA slot-table kernels of src/engine/adapters/lora.cu against an earlier lora.cu (its
// tensor-core and BGMV kernels renamed old_*), at the 8B shape's projection groups with rank-64
// adapters on all seven projections (and a mix of three adapters of ranks 64/32/16 with plain
// rows): each pair of launches checked against the other (max |old - new| over max |delta|), then
// timed as 40 launches in one CUDA graph, best of 5 replays (so the kernels run back to back, as
// in a decode graph, with the adapters' tensors resident in L2). Built and run by
// bench/lora-kernels.sh.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cmath>
#include <random>
#include <algorithm>
#include <array>
#include <cuda_bf16.h>
#include <stdint.h>
#include <cooperative_groups.h>
namespace old_ {
#include "old_renamed.cu"
}
#undef TILE
#undef WARP_K
#undef SHRINK_PARTS
#undef EXPAND_STEPS
#undef NONE
namespace new_ {
#include "lora.cu"
}
using new_::lora_shrink_mma4; using new_::lora_shrink_mma8; using new_::lora_expand_mma;

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

struct G { const char* name; int in, out, R; };

static unsigned short f2bf(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }

template <class T> T* dev(const std::vector<T>& v) { T* p; CK(cudaMalloc(&p, v.size() * sizeof(T) + 256)); CK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); return p; }

std::mt19937 rng(1);
std::vector<unsigned short> rnd_bf(size_t n, float sd) { std::normal_distribution<float> d(0, sd); std::vector<unsigned short> v(n); for (auto& x : v) x = f2bf(d(rng)); return v; }
std::vector<float> rnd_f(size_t n, float sd) { std::normal_distribution<float> d(0, sd); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }

// meta: rows slots, entries [group g][slot k] {a, b, r} for 4 groups, tiles, order.
struct Meta { std::vector<unsigned long long> w; int entries0, tiles_at, max_tiles; };
Meta build(const std::vector<int>& slots, int cap, const std::vector<std::vector<std::array<unsigned long long,4>>>& ent, int ew) {
  Meta m; int T = slots.size();
  for (int s : slots) m.w.push_back(s < 0 ? ~0ull : (unsigned long long)s);
  m.entries0 = T;
  for (int g = 0; g < 4; g++) for (int k = 0; k < cap; k++) { auto e = k < (int)ent[g].size() ? ent[g][k] : std::array<unsigned long long,4>{0,0,0,0}; for (int q = 0; q < ew; q++) m.w.push_back(e[q]); }
  m.tiles_at = m.w.size(); m.max_tiles = (T + 63) / 64 + cap;
  std::vector<unsigned long long> order, tiles;
  for (int k = 0; k < cap; k++) { int first = order.size(); for (int i = 0; i < T; i++) if (slots[i] == k) order.push_back(i);
    for (int st = first; st < (int)order.size(); st += 64) { tiles.push_back(k); tiles.push_back(st); tiles.push_back(std::min<int>(64, order.size() - st)); } }
  m.w.push_back(tiles.size() / 3); m.w.push_back(order.size());
  for (auto x : tiles) m.w.push_back(x);
  m.w.resize(m.w.size() + 3 * m.max_tiles - tiles.size(), 0);
  for (auto x : order) m.w.push_back(x);
  m.w.resize(m.w.size() + T - order.size(), 0);
  return m;
}

struct Run { float *h, *part; unsigned long long* counters; int splits, rows_cap; };

int main() {
  G gs[4] = {{"qkv", 4096, 6144, 192}, {"o", 4096, 4096, 64}, {"gate_up", 4096, 28672, 128}, {"down", 14336, 4096, 64}};
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const int rmax = 256;
  // adapters: 3 slots with ranks scaled
  std::vector<std::vector<std::array<unsigned long long,4>>> ent(4);
  for (int g = 0; g < 4; g++) for (int k = 0; k < 3; k++) {
    int R = k == 0 ? gs[g].R : (k == 1 ? 32 : 16);
    int in = gs[g].in, out = gs[g].out;
    // segments: qkv [4096|1024|1024], gate_up [14336|14336]
    std::vector<int> ob, rb; // out ends, rank ends
    if (g == 0) { ob = {4096, 5120, 6144}; rb = k == 0 ? std::vector<int>{64, 128, 192} : (k == 1 ? std::vector<int>{16, 24, 32} : std::vector<int>{8, 16, 16}); }
    else if (g == 2) { ob = {14336, 28672}; rb = {R / 2, R}; }
    else { ob = {out}; rb = {R}; }
    auto bh = rnd_bf((size_t)out * R, 0.02f);
    int o_start = 0, r_start = 0;
    for (size_t p = 0; p < ob.size(); p++) { for (int o = o_start; o < ob[p]; o++) for (int r = 0; r < R; r++) if (r < r_start || r >= rb[p]) bh[(size_t)o * R + r] = 0; o_start = ob[p]; r_start = rb[p]; }
    unsigned long long seg = 0;
    if (ob.size() == 3) seg = (1ull << 63) | (unsigned long long)(ob[0] / 16) | ((unsigned long long)(rb[0] / 8) << 16) | ((unsigned long long)(ob[1] / 16) << 24) | ((unsigned long long)(rb[1] / 8) << 40);
    if (ob.size() == 2) seg = (1ull << 63) | (unsigned long long)(ob[0] / 16) | ((unsigned long long)(rb[0] / 8) << 16) | ((unsigned long long)(ob[1] / 16) << 24) | ((unsigned long long)(rb[1] / 8) << 40);
    auto a = dev(rnd_bf((size_t)R * in, 0.02f)); auto b = dev(bh);
    ent[g].push_back({(unsigned long long)a, (unsigned long long)b, (unsigned long long)R, seg});
  }
  for (int T : {64, 256, 16, 8, 4, 1}) for (int mixed = 0; mixed < (T >= 16 ? 2 : 1); mixed++) {
    std::vector<int> slots(T);
    for (int i = 0; i < T; i++) slots[i] = mixed ? (i % 4 == 3 ? -1 : i % 3) : 0;
    int cap = mixed ? 4 : 1;
    Meta m = build(slots, cap, ent, 3), mn = build(slots, cap, ent, 4);
    unsigned long long* meta = dev(m.w); unsigned long long* metan = dev(mn.w);
    printf("T=%d %s:\n", T, mixed ? "mixed (3 adapters, ranks 64-192/32/16, 1/4 rows none)" : "one adapter");
    double layer_old = 0, layer_new = 0, layer_bgmv = 0;
    for (int g = 0; g < 4; g++) {
      int in = gs[g].in, out = gs[g].out;
      auto xb = dev(rnd_bf((size_t)T * in, 1.0f));
      auto y0 = rnd_f((size_t)T * out, 1.0f);
      float* yo = dev(y0); float* yn = dev(y0);
      Run r; r.rows_cap = T + 16; r.splits = (in + 511) / 512;
      CK(cudaMalloc(&r.h, (size_t)r.rows_cap * rmax * 4)); CK(cudaMalloc(&r.part, (size_t)r.splits * r.rows_cap * rmax * 4)); CK(cudaMalloc(&r.counters, 4096 * 8));
      Run rn = r; CK(cudaMalloc(&rn.h, (size_t)r.rows_cap * rmax * 4));
      auto eo = [&](int gg) { return m.entries0 + gg * cap * 3; };
      auto en = [&](int gg) { return mn.entries0 + gg * cap * 4; };
      // correctness: one pass each
      int rb = rmax / 16;
      CK(cudaMemsetAsync(r.counters, 0, m.max_tiles * rb * 8, st));
      old_::old_shrink_mma<<<dim3(m.max_tiles, rb, r.splits), 512, 0, st>>>((const __nv_bfloat16*)xb, meta, eo(g), m.tiles_at, m.max_tiles, in, rmax, r.rows_cap, r.part, r.counters, r.h);
      old_::old_expand_mma<<<dim3(m.max_tiles, (out + 63) / 64, 4), 128, 0, st>>>(r.h, meta, eo(g), m.tiles_at, m.max_tiles, out, rmax, yo);
      auto ns = [&](cudaStream_t s) { if (in > 8192) lora_shrink_mma8<<<dim3(mn.max_tiles * SLICES, rb, 8), 32 * SHRINK_WARPS, 0, s>>>((const __nv_bfloat16*)xb, metan, en(g), mn.tiles_at, mn.max_tiles, in, rmax, rn.h); else lora_shrink_mma4<<<dim3(mn.max_tiles * SLICES, rb, 4), 32 * SHRINK_WARPS, 0, s>>>((const __nv_bfloat16*)xb, metan, en(g), mn.tiles_at, mn.max_tiles, in, rmax, rn.h); };
      auto ne = [&](cudaStream_t s) { lora_expand_mma<<<dim3(mn.max_tiles, (out + 16 * EXPAND_WARPS - 1) / (16 * EXPAND_WARPS)), 32 * EXPAND_WARPS, 0, s>>>(rn.h, metan, en(g), mn.tiles_at, mn.max_tiles, out, rmax, yn); };
      auto os = [&](cudaStream_t s) { CK(cudaMemsetAsync(r.counters, 0, m.max_tiles * rb * 8, s)); old_::old_shrink_mma<<<dim3(m.max_tiles, rb, r.splits), 512, 0, s>>>((const __nv_bfloat16*)xb, meta, eo(g), m.tiles_at, m.max_tiles, in, rmax, r.rows_cap, r.part, r.counters, r.h); };
      auto oe = [&](cudaStream_t s) { old_::old_expand_mma<<<dim3(m.max_tiles, (out + 63) / 64, 4), 128, 0, s>>>(r.h, meta, eo(g), m.tiles_at, m.max_tiles, out, rmax, yo); };
      ns(st); ne(st);
      CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
      std::vector<float> a((size_t)T * out), b((size_t)T * out);
      CK(cudaMemcpy(a.data(), yo, a.size() * 4, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(b.data(), yn, b.size() * 4, cudaMemcpyDeviceToHost));
      double md = 0, mdelta = 0;
      for (size_t i = 0; i < a.size(); i++) { md = std::max(md, (double)fabs(a[i] - b[i])); mdelta = std::max(mdelta, (double)fabs(a[i] - y0[i])); }
      // time in graphs: ITER of each
      const int ITER = 40;
      auto timeit = [&](auto body) {
        cudaGraph_t gr; cudaGraphExec_t ex;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        for (int i = 0; i < ITER; i++) body(st);
        CK(cudaStreamEndCapture(st, &gr)); CK(cudaGraphInstantiate(&ex, gr, 0));
        CK(cudaGraphLaunch(ex, st)); CK(cudaStreamSynchronize(st));
        float best = 1e9;
        for (int rep = 0; rep < 5; rep++) { cudaEventRecord(e0, st); CK(cudaGraphLaunch(ex, st)); cudaEventRecord(e1, st); CK(cudaEventSynchronize(e1)); float ms; cudaEventElapsedTime(&ms, e0, e1); best = std::min(best, ms); }
        cudaGraphExecDestroy(ex); cudaGraphDestroy(gr);
        return best * 1000.f / ITER;
      };
      float to = timeit([&](cudaStream_t s) { os(s); oe(s); });
      float tos = timeit([&](cudaStream_t s) { os(s); });
      float tn = timeit([&](cudaStream_t s) { ns(s); ne(s); });
      float tns = timeit([&](cudaStream_t s) { ns(s); });
      float tne = timeit([&](cudaStream_t s) { ne(s); });
      float tb = 0;
      if (T <= 16) tb = timeit([&](cudaStream_t s) {
        old_::old_shrink_bf16<<<dim3((T + 3) / 4, rmax), 256, 0, s>>>((const __nv_bfloat16*)xb, meta, T, eo(g), in, rmax, r.h);
        old_::old_expand<<<dim3((out + 255) / 256, (T + 7) / 8), 256, 8 * rmax * 4, s>>>(r.h, meta, T, eo(g), out, rmax, yo);
      });
      layer_bgmv += tb;
      layer_old += to; layer_new += tn;
      printf("  %-8s in %5d out %5d: old %6.2f us (shrink+memset %6.2f) | new %6.2f us (shrink %6.2f, expand %6.2f) | max|old-new| %.3g of max|delta| %.3g\n", gs[g].name, in, out, to, tos, tn, tns, tne, md, mdelta);
      cudaFree(xb); cudaFree(yo); cudaFree(yn); cudaFree(r.h); cudaFree(r.part); cudaFree(r.counters); cudaFree(rn.h);
    }
    printf("  per layer: old %.1f us, new %.1f us, bgmv %.1f us\n", layer_old, layer_new, layer_bgmv);
    cudaFree(meta); cudaFree(metan);
  }
  return 0;
}
