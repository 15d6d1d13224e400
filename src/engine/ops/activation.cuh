// The gated MLP's activations on f32 values, shared by fused.cu's `act_mul` and lora.cu's fused
// gate|up expand, so that both give the same numbers (CPU definitions: candle's silu and gelu,
// `ops::fused::act_mul`).
#pragma once

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
// act 0: silu, otherwise the tanh approximation of gelu.
__device__ __forceinline__ float act_of(float g, int act) {
  return act == 0 ? silu(g) : gelu_tanh(g);
}
