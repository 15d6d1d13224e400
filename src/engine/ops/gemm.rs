//! Projections with f32 output: `x · wᵀ` accumulated and returned in f32 whatever the weights'
//! dtype. bf16 weights take bf16 activations in one GEMM, or f32 activations compensated as two
//! bf16 terms (see [`linear_f32`]); on CUDA each GEMM is one cuBLAS GemmEx (bf16 inputs, f32
//! compute and output) and the hi/lo split is `split_bf16` in `kernels/fused.cu`. The CPU path
//! computes the same values and is what the CPU tests run.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x · wᵀ (+ b)` as f32 `[T, n]` for `x` `[T, k]` and weights `w` `[n, k]` (bias f32 `[n]`),
/// with f32 products and sums. With bf16 weights the precision of `x` is kept as given:
/// - bf16 `x`: one bf16 GEMM (cuBLAS GemmEx on CUDA);
/// - f32 `x`: compensated, `x = hi + lo` split into two bf16 terms (16 significant bits) and
///   `y = hi · wᵀ + lo · wᵀ`, two GEMMs over the same weights. The rounding error of the input
///   drops from 2⁻⁹ to 2⁻¹⁷ relative, for twice the multiply work.
pub fn linear_f32(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = if w.dtype() == DType::F32 {
        x.to_dtype(DType::F32)?.matmul(&w.t()?)?
    } else if w.device().is_cuda() {
        x.apply_op2_no_bwd(w, &GemmF32Out)?
    } else {
        // What GemmEx computes: bf16 inputs, f32 products and sums; f32 inputs as two terms.
        let w = w.to_dtype(DType::F32)?;
        let hi = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let y = hi.matmul(&w.t()?)?;
        if x.dtype() == DType::F32 {
            let lo = (&x - &hi)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            (y + lo.matmul(&w.t()?)?)?
        } else {
            y
        }
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `y + x · wᵀ` as [`linear_f32`] computes the product, for an f32 `y` `[T, n]` that nothing
/// else holds: on CUDA with bf16 weights the GEMMs accumulate into `y` in place (beta = 1), so no
/// `[T, n]` temporary is made; elsewhere a plain add.
pub fn linear_f32_accumulate(y: Tensor, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.device().is_cuda() && w.dtype() == DType::BF16 && y.is_contiguous() {
        y.inplace_op3(&x.contiguous()?, w, &GemmAccumulate)?;
        Ok(y)
    } else {
        y + linear_f32(x, w, None)?
    }
}

/// `y += x · bf16ᵀ` in place with cuBLAS (CUDA only).
struct GemmAccumulate;

impl candle_core::InplaceOp3 for GemmAccumulate {
    fn name(&self) -> &'static str {
        "gemm-accumulate"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("gemm-accumulate runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &mut candle_core::CudaStorage,
        yl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<()> {
        cuda::gemm_accumulate(ys, yl, (xs, xl), (ws, wl))
    }
}

/// x · bf16ᵀ → f32 with cuBLAS (CUDA only): x bf16 in one GEMM, or f32 split in two terms.
struct GemmF32Out;

impl CustomOp2 for GemmF32Out {
    fn name(&self) -> &'static str {
        "gemm-f32-out"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("gemm-f32-out runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemm_bf16_f32_out(s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    use crate::engine::ops::fused::cuda::PTX;

    /// `y[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 weights, f32 compute and output; a bf16 `x` in
    /// one GemmEx, an f32 `x` split into bf16 hi and lo terms accumulated by two.
    pub fn gemm_bf16_f32_out(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (t, k, n) = dims(xl, wl)?;
        let dev = xs.device().clone();
        let w = weights(ws, wl)?;
        // SAFETY: the first GEMM writes every element (beta = 0).
        let mut y = unsafe { dev.alloc::<f32>(t * n)? };
        bf16_terms(xs, xl, |term, i| {
            gemm(
                &dev,
                term,
                &w,
                &mut y,
                (t, n, k),
                if i == 0 { 0.0 } else { 1.0 },
            )
        })?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((t, n))))
    }

    /// `y[T, n] += x[T, k] · w[n, k]ᵀ` in place, the product as [`gemm_bf16_f32_out`] makes it.
    pub fn gemm_accumulate(
        ys: &mut CudaStorage,
        yl: &Layout,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
    ) -> Result<()> {
        let (t, k, n) = dims(xl, wl)?;
        if yl.dims() != [t, n] || yl.start_offset() != 0 || !yl.is_contiguous() {
            candle_core::bail!("gemm-accumulate: the output must be [{t}, {n}], contiguous");
        }
        let dev = xs.device().clone();
        let w = weights(ws, wl)?;
        let y = ys.as_cuda_slice_mut::<f32>()?;
        bf16_terms(xs, xl, |term, _| gemm(&dev, term, &w, y, (t, n, k), 1.0))
    }

    /// `(T, k, n)` of contiguous `x` `[T, k]` and `w` `[n, k]`.
    fn dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
        let (t, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("gemm-f32-out: inner dims {k} and {k2} differ");
        }
        if xl.contiguous_offsets().is_none() || wl.contiguous_offsets().is_none() {
            candle_core::bail!("gemm-f32-out: inputs must be contiguous");
        }
        Ok((t, k, n))
    }

    fn weights<'a>(ws: &'a CudaStorage, wl: &Layout) -> Result<CudaView<'a, half::bf16>> {
        let Some((a, b)) = wl.contiguous_offsets() else {
            candle_core::bail!("gemm-f32-out: weights must be contiguous");
        };
        Ok(ws.as_cuda_slice::<half::bf16>()?.slice(a..b))
    }

    /// Calls `f` with `x` as bf16 terms whose sum is `x`: itself (bf16), or its hi and lo halves
    /// (f32, split by `split_bf16`), with each term's index.
    fn bf16_terms(
        xs: &CudaStorage,
        xl: &Layout,
        mut f: impl FnMut(&CudaView<'_, half::bf16>, usize) -> Result<()>,
    ) -> Result<()> {
        let Some((xa, xb)) = xl.contiguous_offsets() else {
            candle_core::bail!("gemm-f32-out: inputs must be contiguous");
        };
        let dev = xs.device().clone();
        match xs.dtype() {
            DType::BF16 => f(&xs.as_cuda_slice::<half::bf16>()?.slice(xa..xb), 0),
            DType::F32 => {
                let x = xs.as_cuda_slice::<f32>()?.slice(xa..xb);
                let len = xb - xa;
                // SAFETY: the kernel writes all 2 * len values.
                let terms = unsafe { dev.alloc::<half::bf16>(2 * len)? };
                let func = dev.get_or_load_custom_func("split_bf16", "pruneserve_fused", PTX)?;
                let cfg = LaunchConfig {
                    grid_dim: (len.div_ceil(256).min(65_535) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&terms);
                b.arg(&len);
                // SAFETY: the arguments match `split_bf16` in fused.cu.
                unsafe { b.launch(cfg) }.w()?;
                f(&terms.slice(..len), 0)?;
                f(&terms.slice(len..), 1)
            }
            other => candle_core::bail!("gemm-f32-out: unsupported input dtype {other:?}"),
        }
    }

    /// `y = x · wᵀ + beta · y` for bf16 `x` `[t, k]` and `w` `[n, k]`, f32 `y` `[t, n]`.
    fn gemm(
        dev: &candle_core::cuda_backend::CudaDevice,
        x: &CudaView<'_, half::bf16>,
        w: &CudaView<'_, half::bf16>,
        y: &mut CudaSlice<f32>,
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let alpha = 1f32;
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (yp, _gy) = y.device_ptr_mut(&stream);
        // Column-major view: yᵀ[n, T] = (w stored [k, n])ᵀ · (x stored [k, T]).
        // SAFETY: the pointers are valid for the sizes given, on candle's stream.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::fused::tests::{max_diff, randn};

    #[test]
    fn linear_f32_keeps_the_precision_of_its_input() {
        let (x, w) = (
            randn(&[3, 256], 7),
            randn(&[6, 256], 8).to_dtype(DType::BF16).unwrap(),
        );
        let wf = w.to_dtype(DType::F32).unwrap();
        let exact = x.matmul(&wf.t().unwrap()).unwrap();
        let xr = x.to_dtype(DType::BF16).unwrap();
        // bf16 input: exactly the rounded input times the weights.
        let one = linear_f32(&xr, &w, None).unwrap();
        assert_eq!(one.dtype(), DType::F32);
        let want = xr
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&wf.t().unwrap())
            .unwrap();
        assert!(max_diff(&one, &want) < 1e-5);
        let rounded_err = max_diff(&one, &exact);
        // f32 input: two bf16 terms recover it to 16 bits, far closer to the f32 product.
        let split = linear_f32(&x, &w, None).unwrap();
        let split_err = max_diff(&split, &exact);
        assert!(
            rounded_err > 1e-3 && split_err < rounded_err / 50.0,
            "rounded {rounded_err:e}, split {split_err:e}"
        );
    }
}
