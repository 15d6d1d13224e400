//! The decoder's custom ops, each with a CPU implementation that defines what it computes and a
//! CUDA kernel (`*.cu` beside its launcher, built by build.rs) checked against it: fused norms,
//! rope and activations ([`fused`]), f32-output projections ([`gemm`]), and row gathers and bias
//! adds that upload nothing per launch ([`rows`]).

pub mod fused;
pub mod gemm;
pub mod rows;
