//! The decoder's custom ops, each with a CPU implementation that defines what it computes and a
//! CUDA kernel (`*.cu` beside its launcher, built by build.rs) checked against it: fused norms,
//! rope and activations ([`fused`]), and f32-output projections ([`gemm`]).

pub mod fused;
pub mod gemm;
