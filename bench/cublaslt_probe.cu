// What cuBLASLt's algorithms reach on the decode GEMMs of the Llama-3.1-8B shape, beyond the
// one its heuristic puts first (the engine's GemmEx runs at that one's speed: bench/gemm_probe.py).
// For each projection and row count it asks the heuristic for up to 64 algorithms, tries each
// also with split-K 1, 2, 4, 8 and 16 where cublasLtMatmulAlgoCheck accepts it, and times every
// candidate as the engine runs the GEMM: bf16 rows `x [M, K]` by bf16 weights `w [N, K]`, f32
// output `[M, N]` (written, or accumulated with beta = 1 for o and down), f32 compute. Weights
// are rotated over enough copies (about 600 MB) that L2 holds none between launches; best of 3
// rounds of 20 launches between two events. Prints the heuristic's first choice and the five
// fastest, µs and TB/s of weights read.
// Also times the engine's call, cublasGemmEx with the default tensor-op algorithm, on the same
// operands (pseudo-random bf16 values).
// Build and run (GPU machine): nvcc -O2 -arch=sm_90 -o /tmp/ltp bench/cublaslt_probe.cu -lcublasLt
// -lcublas && /tmp/ltp
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      exit(1);                                                                  \
    }                                                                           \
  } while (0)
#define LT(x)                                                          \
  do {                                                                 \
    cublasStatus_t st_ = (x);                                           \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                \
      fprintf(stderr, "%s:%d cublasLt status %d\n", __FILE__, __LINE__, \
              (int)st_);                                               \
      exit(1);                                                         \
    }                                                                  \
  } while (0)

struct Shape {
  const char *name;
  int n, k;
  bool accumulate;
};

struct Result {
  float us;
  int id, tile, stages, split, reduction;
};

static const size_t WORKSPACE = 32u << 20;

// Pseudo-random bf16 values in [-1, 1) (zeros or constants would draw less power than weights).
__global__ void fill(__nv_bfloat16 *p, size_t len, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);
  }
}

static cublasHandle_t blas;

struct Problem {
  cublasLtHandle_t lt;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, c;
  std::vector<void *> ws;
  void *x, *y, *workspace;
  float beta;
};

static int attr(const cublasLtMatmulAlgo_t &algo, cublasLtMatmulAlgoConfigAttributes_t which) {
  int v = 0;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, which, &v, sizeof(v), &written);
  return v;
}

static float time_algo(Problem &p, const cublasLtMatmulAlgo_t &algo, cudaEvent_t e0, cudaEvent_t e1) {
  const float alpha = 1.f;
  const int reps = 20;
  float best = 1e30f;
  for (int round = 0; round < 4; round++) {
    CK(cudaEventRecord(e0));
    for (int i = 0; i < reps; i++) {
      cublasStatus_t s = cublasLtMatmul(p.lt, p.desc, &alpha, p.ws[i % p.ws.size()], p.a, p.x, p.b,
                                        &p.beta, p.y, p.c, p.y, p.c, &algo, p.workspace,
                                        WORKSPACE, 0);
      if (s != CUBLAS_STATUS_SUCCESS) return -1.f;
    }
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (round > 0) best = std::min(best, ms * 1000.f / reps);  // round 0 warms up
  }
  return best;
}

static void probe(cublasLtHandle_t lt, const Shape &s, int m, void *workspace) {
  Problem p{};
  p.lt = lt;
  p.workspace = workspace;
  p.beta = s.accumulate ? 1.f : 0.f;
  size_t wbytes = (size_t)s.n * s.k * 2;
  int copies = std::max<int>(2, (int)(600e6 / wbytes));
  for (int i = 0; i < copies; i++) {
    void *w;
    CK(cudaMalloc(&w, wbytes));
    fill<<<1024, 256>>>((__nv_bfloat16 *)w, wbytes / 2, 17 + i);
    p.ws.push_back(w);
  }
  CK(cudaMalloc(&p.x, (size_t)m * s.k * 2));
  fill<<<256, 256>>>((__nv_bfloat16 *)p.x, (size_t)m * s.k, 5);
  CK(cudaMalloc(&p.y, (size_t)m * s.n * 4));
  CK(cudaMemset(p.y, 0, (size_t)m * s.n * 4));
  // Column-major view, as the engine's GemmEx: y^T [n, m] = op_T(w [k, n]) * x^T [k, m].
  LT(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
  LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
  LT(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, s.k, s.n, s.k));
  LT(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, s.k, m, s.k));
  LT(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, s.n, m, s.n));
  cublasLtMatmulPreference_t pref;
  LT(cublasLtMatmulPreferenceCreate(&pref));
  size_t wsz = WORKSPACE;
  LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz,
                                          sizeof(wsz)));
  cublasLtMatmulHeuristicResult_t heur[64];
  int found = 0;
  LT(cublasLtMatmulAlgoGetHeuristic(lt, p.desc, p.a, p.b, p.c, p.c, pref, 64, heur, &found));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<Result> results;
  float first = -1.f;
  const int splits[] = {1, 2, 4, 8, 16};
  for (int h = 0; h < found; h++) {
    if (heur[h].state != CUBLAS_STATUS_SUCCESS) continue;
    cublasLtMatmulAlgo_t base = heur[h].algo;
    float us = time_algo(p, base, e0, e1);
    if (h == 0) first = us;
    if (us > 0)
      results.push_back({us, attr(base, CUBLASLT_ALGO_CONFIG_ID), attr(base, CUBLASLT_ALGO_CONFIG_TILE_ID),
                         attr(base, CUBLASLT_ALGO_CONFIG_STAGES_ID), attr(base, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                         attr(base, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)});
    for (int split : splits) {
      if (split == attr(base, CUBLASLT_ALGO_CONFIG_SPLITK_NUM)) continue;
      cublasLtMatmulAlgo_t algo = base;
      cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split));
      cublasLtMatmulHeuristicResult_t check;
      if (cublasLtMatmulAlgoCheck(lt, p.desc, p.a, p.b, p.c, p.c, &algo, &check) != CUBLAS_STATUS_SUCCESS)
        continue;
      if (check.workspaceSize > WORKSPACE) continue;
      float v = time_algo(p, algo, e0, e1);
      if (v > 0)
        results.push_back({v, attr(algo, CUBLASLT_ALGO_CONFIG_ID), attr(algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                           attr(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), split,
                           attr(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)});
    }
  }
  std::sort(results.begin(), results.end(), [](const Result &a, const Result &b) { return a.us < b.us; });
  // The engine's call: cublasGemmEx, default tensor-op algorithm, same operands.
  float gemmex = 1e30f;
  {
    const float alpha = 1.f;
    for (int round = 0; round < 4; round++) {
      CK(cudaEventRecord(e0));
      for (int i = 0; i < 20; i++)
        cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha, p.ws[i % p.ws.size()],
                     CUDA_R_16BF, s.k, p.x, CUDA_R_16BF, s.k, &p.beta, p.y, CUDA_R_32F, s.n,
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (round > 0) gemmex = std::min(gemmex, ms * 1000.f / 20);
    }
  }
  double tb = wbytes / 1e6;
  printf("%-8s M=%4d %s GemmEx %7.1f us %5.2f TB/s | Lt heuristic-first %7.1f us %5.2f TB/s | %zu candidates of %d algos | best:",
         s.name, m, s.accumulate ? "acc" : "new", gemmex, tb / gemmex, first, tb / first, results.size(), found);
  for (size_t i = 0; i < std::min<size_t>(5, results.size()); i++) {
    const Result &r = results[i];
    printf(" %.1f (%.2f TB/s; id %d tile %d stages %d split %d red %d)", r.us, tb / r.us, r.id, r.tile,
           r.stages, r.split, r.reduction);
  }
  printf("\n");
  fflush(stdout);
  for (void *w : p.ws) CK(cudaFree(w));
  CK(cudaFree(p.x));
  CK(cudaFree(p.y));
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(p.a);
  cublasLtMatrixLayoutDestroy(p.b);
  cublasLtMatrixLayoutDestroy(p.c);
  cublasLtMatmulDescDestroy(p.desc);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

int main() {
  cublasLtHandle_t lt;
  LT(cublasLtCreate(&lt));
  LT(cublasCreate(&blas));
  void *workspace;
  CK(cudaMalloc(&workspace, WORKSPACE));
  const Shape shapes[] = {{"qkv", 6144, 4096, false},
                          {"o", 4096, 4096, true},
                          {"gate_up", 28672, 4096, false},
                          {"down", 4096, 14336, true}};
  const int rows[] = {1, 8, 16, 32, 64, 128, 256};
  for (const Shape &s : shapes)
    for (int m : rows) probe(lt, s, m, workspace);
  CK(cudaFree(workspace));
  cublasLtDestroy(lt);
  return 0;
}
