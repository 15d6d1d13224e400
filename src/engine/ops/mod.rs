//! The decoder's custom ops, each with a CPU implementation that defines what it computes and a
//! CUDA kernel (`*.cu` beside its launcher, built by build.rs) checked against it: fused norms,
//! rope and activations ([`fused`]), f32-output projections ([`gemm`]), and row gathers and bias
//! adds that upload nothing per launch ([`rows`]).

pub mod fused;
pub mod gemm;
pub mod rows;

/// The `cpu_fwd` of a custom op that runs on CUDA only (candle's `CustomOp1/2/3` and
/// `InplaceOp1/2/3` require one): an error naming the op. `cuda_only_cpu_fwd!(N)` inside the
/// impl of an op of N inputs, `cuda_only_cpu_fwd!(inplace N)` of an in-place one.
macro_rules! cuda_only_cpu_fwd {
    (@fn $($arg:ident),+) => {
        fn cpu_fwd(
            &self,
            $($arg: &candle_core::CpuStorage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $(let _ = $arg;)+
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (@inplace $dst:ident $(, $arg:ident)*) => {
        fn cpu_fwd(
            &self,
            $dst: &mut candle_core::CpuStorage,
            _: &candle_core::Layout
            $(, $arg: &candle_core::CpuStorage, _: &candle_core::Layout)*
        ) -> candle_core::Result<()> {
            let _ = $dst;
            $(let _ = $arg;)*
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (1) => { $crate::engine::ops::cuda_only_cpu_fwd!(@fn a); };
    (2) => { $crate::engine::ops::cuda_only_cpu_fwd!(@fn a, b); };
    (3) => { $crate::engine::ops::cuda_only_cpu_fwd!(@fn a, b, c); };
    (inplace 1) => { $crate::engine::ops::cuda_only_cpu_fwd!(@inplace a); };
    (inplace 2) => { $crate::engine::ops::cuda_only_cpu_fwd!(@inplace a, b); };
    (inplace 3) => { $crate::engine::ops::cuda_only_cpu_fwd!(@inplace a, b, c); };
}
pub(crate) use cuda_only_cpu_fwd;
