//! Projections with f32 output: `x · wᵀ` accumulated and returned in f32 whatever the weights'
//! dtype. bf16 weights take bf16 activations in one GEMM, or f32 activations compensated as two
//! bf16 terms (see [`linear_f32`]), on every row or only on the rows a step names exact
//! ([`ExactRows`], [`linear_rows`]); on CUDA each GEMM is one cuBLAS GemmEx (bf16 inputs, f32
//! compute and output), or for a single row (batch-1 decode) a skinny kernel of `gemm.cu` with
//! the same products and f32 sums, and the hi/lo split is `split_bf16` in `fused.cu`. The CPU path
//! computes the same values and is what the CPU tests run.

use std::ops::Range;

use candle_core::{CustomOp2, DType, Result, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{Layout, Shape};

/// The rows of a packed step whose f32 inputs are taken compensated (two bf16 terms); every
/// other row takes its input rounded once to bf16. Sorted, disjoint and merged runs, so each
/// row's product depends only on whether its own row is exact (batch invariance), and the
/// second GEMM runs over the exact rows alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExactRows(Vec<Range<usize>>);

impl ExactRows {
    /// Every one of `rows` rows.
    pub fn all(rows: usize) -> Self {
        Self::from_runs(std::iter::once(0..rows))
    }

    /// The union of `runs` given in row order (empty runs are dropped, touching ones merged).
    pub fn from_runs(runs: impl IntoIterator<Item = Range<usize>>) -> Self {
        let mut out: Vec<Range<usize>> = Vec::new();
        for r in runs.into_iter().filter(|r| !r.is_empty()) {
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Self(out)
    }

    pub fn runs(&self) -> &[Range<usize>] {
        &self.0
    }

    /// Whether the runs cover all of rows `0..rows`.
    pub fn covers(&self, rows: usize) -> bool {
        rows == 0 || (self.0.len() == 1 && self.0[0] == (0..rows))
    }

    /// A `[rows, 1]` f32 mask: 1 on exact rows, 0 elsewhere.
    fn mask(&self, rows: usize, device: &candle_core::Device) -> Result<Tensor> {
        let mut m = vec![0f32; rows];
        for r in &self.0 {
            m[r.start.min(rows)..r.end.min(rows)].fill(1.0);
        }
        Tensor::from_vec(m, (rows, 1), device)
    }
}

/// [`linear_f32`] with the compensation of f32 inputs on the `exact` rows only: the others take
/// one bf16 GEMM, as a bf16 input would (the same values a decode step computes). bf16 inputs
/// and f32 weights are unaffected.
pub fn linear_rows(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    exact: &ExactRows,
) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    let lo_rows = (x.dtype() == DType::F32 && !exact.covers(rows)).then_some(exact);
    linear_terms(x, w, b, lo_rows)
}

/// `x · wᵀ (+ b)` as f32 `[T, n]` for `x` `[T, k]` and weights `w` `[n, k]` (bias f32 `[n]`),
/// with f32 products and sums. With bf16 weights the precision of `x` is kept as given:
/// - bf16 `x`: one bf16 GEMM (cuBLAS GemmEx on CUDA);
/// - f32 `x`: compensated, `x = hi + lo` split into two bf16 terms (16 significant bits) and
///   `y = hi · wᵀ + lo · wᵀ`, two GEMMs over the same weights. The rounding error of the input
///   drops from 2⁻⁹ to 2⁻¹⁷ relative, for twice the multiply work.
pub fn linear_f32(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_terms(x, w, b, None)
}

/// [`linear_f32`], the lo term of an f32 `x` taken on `lo_rows` only when given.
fn linear_terms(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lo_rows: Option<&ExactRows>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = if w.dtype() == DType::F32 {
        x.to_dtype(DType::F32)?.matmul(&w.t()?)?
    } else if w.device().is_cuda() {
        let lo_rows = lo_rows.cloned();
        x.apply_op2_no_bwd(w, &GemmF32Out { lo_rows })?
    } else {
        // What GemmEx computes: bf16 inputs, f32 products and sums; f32 inputs as two terms.
        let w = w.to_dtype(DType::F32)?;
        let hi = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let y = hi.matmul(&w.t()?)?;
        if x.dtype() == DType::F32 {
            let lo = (&x - &hi)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let lo = match lo_rows {
                Some(rows) => lo.broadcast_mul(&rows.mask(x.dim(0)?, x.device())?)?,
                None => lo,
            };
            (y + lo.matmul(&w.t()?)?)?
        } else {
            y
        }
    };
    match b {
        // `y` is the GEMM's fresh output: nothing else holds it.
        Some(b) => crate::engine::ops::rows::add_row_bias(y, b),
        None => Ok(y),
    }
}

/// `y + x · wᵀ` as [`linear_f32`] computes the product, for an f32 `y` `[T, n]` that nothing
/// else holds: on CUDA with bf16 weights the GEMMs accumulate into `y` in place (beta = 1), so no
/// `[T, n]` temporary is made; elsewhere a plain add.
pub fn linear_f32_accumulate(y: Tensor, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    accumulate_terms(y, x, w, None)
}

/// [`linear_f32_accumulate`] with the products as [`linear_rows`] makes them: an f32 `x`
/// compensated on the `exact` rows only.
pub fn linear_rows_accumulate(
    y: Tensor,
    x: &Tensor,
    w: &Tensor,
    exact: &ExactRows,
) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    let lo_rows = (x.dtype() == DType::F32 && !exact.covers(rows)).then_some(exact);
    accumulate_terms(y, x, w, lo_rows)
}

/// `y + x · wᵀ`, the lo term of an f32 `x` taken on `lo_rows` only when given.
fn accumulate_terms(
    y: Tensor,
    x: &Tensor,
    w: &Tensor,
    lo_rows: Option<&ExactRows>,
) -> Result<Tensor> {
    if w.device().is_cuda() && w.dtype() == DType::BF16 && y.is_contiguous() {
        let op = GemmAccumulate {
            lo_rows: lo_rows.cloned(),
        };
        y.inplace_op3(&x.contiguous()?, w, &op)?;
        Ok(y)
    } else {
        y + linear_terms(x, w, None, lo_rows)?
    }
}

/// `y += x · bf16ᵀ` in place with cuBLAS (CUDA only), the lo term of an f32 `x` over `lo_rows`
/// only when given.
struct GemmAccumulate {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lo_rows: Option<ExactRows>,
}

impl candle_core::InplaceOp3 for GemmAccumulate {
    fn name(&self) -> &'static str {
        "gemm-accumulate"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(inplace 3);

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
        cuda::gemm_accumulate(ys, yl, (xs, xl), (ws, wl), self.lo_rows.as_ref())
    }
}

/// x · bf16ᵀ → f32 with cuBLAS (CUDA only): x bf16 in one GEMM, or f32 split in two terms (the
/// lo term over `lo_rows` only when given).
struct GemmF32Out {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lo_rows: Option<ExactRows>,
}

impl CustomOp2 for GemmF32Out {
    fn name(&self) -> &'static str {
        "gemm-f32-out"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemm_bf16_f32_out(s1, l1, s2, l2, self.lo_rows.as_ref())
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result, Shape};

    use super::ExactRows;
    use crate::engine::ops::fused::cuda::PTX;

    /// `y[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 weights, f32 compute and output; a bf16 `x` in
    /// one GemmEx, an f32 `x` split into bf16 hi and lo terms accumulated by two (the lo GEMM
    /// once per run of `lo_rows` when given, over those rows only).
    pub fn gemm_bf16_f32_out(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        lo_rows: Option<&ExactRows>,
    ) -> Result<(CudaStorage, Shape)> {
        let (t, k, n) = dims(xl, wl)?;
        let dev = xs.device().clone();
        let w = weights(ws, wl)?;
        // SAFETY: the first GEMM writes every element (beta = 0).
        let mut y = unsafe { dev.alloc::<f32>(t * n)? };
        gemm_terms(&dev, (xs, xl), &w, &mut y, (t, n, k), (0.0, lo_rows))?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((t, n))))
    }

    /// `y[T, n] += x[T, k] · w[n, k]ᵀ` in place, the product as [`gemm_bf16_f32_out`] makes it.
    pub fn gemm_accumulate(
        ys: &mut CudaStorage,
        yl: &Layout,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        lo_rows: Option<&ExactRows>,
    ) -> Result<()> {
        let (t, k, n) = dims(xl, wl)?;
        if yl.dims() != [t, n] || yl.start_offset() != 0 || !yl.is_contiguous() {
            candle_core::bail!("gemm-accumulate: the output must be [{t}, {n}], contiguous");
        }
        let dev = xs.device().clone();
        let w = weights(ws, wl)?;
        let y = ys.as_cuda_slice_mut::<f32>()?;
        gemm_terms(&dev, (xs, xl), &w, y, (t, n, k), (1.0, lo_rows))
    }

    /// `y = beta · y + x · wᵀ` for `x`'s bf16 terms: the first with `beta`, an f32 `x`'s lo term
    /// accumulated after it, once per run of `lo_rows` when given (over those rows only).
    fn gemm_terms(
        dev: &candle_core::cuda_backend::CudaDevice,
        (xs, xl): (&CudaStorage, &Layout),
        w: &CudaView<'_, half::bf16>,
        y: &mut CudaSlice<f32>,
        (t, n, k): (usize, usize, usize),
        (beta, lo_rows): (f32, Option<&ExactRows>),
    ) -> Result<()> {
        // An f32 `x` whose lo term no row takes is only rounded (half the bytes of a split).
        let with_lo = lo_rows.is_none_or(|rows| rows.runs().iter().any(|r| r.end <= t));
        bf16_terms(xs, xl, with_lo, |term, i| {
            if i == 0 {
                return gemm(dev, term, w, y, (t, n, k), beta);
            }
            let Some(rows) = lo_rows else {
                return gemm(dev, term, w, y, (t, n, k), 1.0);
            };
            for r in rows.runs().iter().filter(|r| r.end <= t) {
                let lo = term.slice(r.start * k..r.end * k);
                let mut out = y.slice_mut(r.start * n..r.end * n);
                gemm(dev, &lo, w, &mut out, (r.len(), n, k), 1.0)?;
            }
            Ok(())
        })
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
    /// (f32, split by `split_bf16`; the hi half alone unless `with_lo`), with each term's index.
    fn bf16_terms(
        xs: &CudaStorage,
        xl: &Layout,
        with_lo: bool,
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
                let terms = split_terms(&dev, &x, with_lo)?;
                f(&terms.slice(..len), 0)?;
                match with_lo {
                    true => f(&terms.slice(len..), 1),
                    false => Ok(()),
                }
            }
            other => candle_core::bail!("gemm-f32-out: unsupported input dtype {other:?}"),
        }
    }

    /// The bf16 terms of f32 values, `x = hi + lo` (`split_bf16` in fused.cu): the `n` hi
    /// values, then, when `with_lo`, the `n` lo values.
    pub(crate) fn split_terms(
        dev: &candle_core::cuda_backend::CudaDevice,
        x: &CudaView<'_, f32>,
        with_lo: bool,
    ) -> Result<CudaSlice<half::bf16>> {
        let len = x.len();
        let terms_n = if with_lo { 2 } else { 1 };
        // SAFETY: the kernel writes all terms_n * len values.
        let terms = unsafe { dev.alloc::<half::bf16>(terms_n * len.max(1))? };
        let with_lo = i32::from(with_lo);
        let func = dev.get_or_load_custom_func("split_bf16", "pruneserve_fused", PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (len.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(x);
        b.arg(&terms);
        b.arg(&len);
        b.arg(&with_lo);
        // SAFETY: the arguments match `split_bf16` in fused.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok(terms)
    }

    /// The skinny kernel of gemm.cu (a warp per output column, f32 sums) for up to this many
    /// rows; more rows go to cuBLAS. Measured on the 8B shape: one row 5.25 -> 5.08 ms per decode
    /// step; eight rows through an 8-row instantiation took 1.8x cuBLAS's time (every weight
    /// vector re-reads eight x vectors from L1), so only single rows take it.
    pub(crate) const SKINNY_ROWS: usize = 1;

    /// `y = x · wᵀ (+ y)` by `skinny_gemm_{t}` (gemm.cu) when it applies — at most
    /// [`SKINNY_ROWS`] rows, `beta` 0 or 1, `k` a multiple of 8 and 16-byte aligned rows, and not
    /// turned off by `PRUNESERVE_SKINNY_GEMM=0` (cuBLAS for A/B runs); `false` when it does not.
    fn skinny(
        dev: &candle_core::cuda_backend::CudaDevice,
        (xp, wp, yp): (u64, u64, u64),
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<bool> {
        static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            std::env::var("PRUNESERVE_SKINNY_GEMM").map_or(true, |v| v != "0")
        });
        let aligned = xp % 16 == 0 && wp % 16 == 0 && k.is_multiple_of(8);
        if !*ON || t == 0 || t > SKINNY_ROWS || !aligned || (beta != 0.0 && beta != 1.0) {
            return Ok(false);
        }
        const GEMM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemm.ptx"));
        let func =
            dev.get_or_load_custom_func(&format!("skinny_gemm_{t}"), "pruneserve_gemm", GEMM_PTX)?;
        let (n32, k32, accumulate) = (n as i32, k as i32, i32::from(beta != 0.0));
        let mut b = func.builder();
        b.arg(&xp)
            .arg(&wp)
            .arg(&yp)
            .arg(&n32)
            .arg(&k32)
            .arg(&accumulate);
        let cfg = LaunchConfig {
            grid_dim: ((n * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `skinny_gemm_*` in gemm.cu; x holds t rows of k, w n rows
        // of k and y t rows of n (the caller's views), all on candle's stream; rows are 16-byte
        // aligned (checked above, k a multiple of 8).
        unsafe { b.launch(cfg) }.w()?;
        Ok(true)
    }

    /// `y = x · wᵀ + beta · y` for bf16 `x` `[t, k]` and `w` `[n, k]`, f32 `y` `[t, n]`.
    fn gemm(
        dev: &candle_core::cuda_backend::CudaDevice,
        x: &CudaView<'_, half::bf16>,
        w: &CudaView<'_, half::bf16>,
        y: &mut impl DevicePtrMut<f32>,
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
        if skinny(dev, (xp, wp, yp), (t, n, k), beta)? {
            return Ok(());
        }
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

    #[test]
    fn linear_rows_compensates_only_the_exact_rows() {
        let x = randn(&[5, 256], 9);
        let w = randn(&[6, 256], 10).to_dtype(DType::BF16).unwrap();
        let exact = ExactRows::from_runs([1..2, 2..3, 4..4]);
        assert_eq!(exact.runs(), std::slice::from_ref(&(1..3)));
        let mixed = linear_rows(&x, &w, None, &exact).unwrap();
        let all = linear_f32(&x, &w, None).unwrap();
        let rounded = linear_f32(&x.to_dtype(DType::BF16).unwrap(), &w, None).unwrap();
        for r in 0..5 {
            let want = if (1..3).contains(&r) { &all } else { &rounded };
            let d = max_diff(
                &mixed.narrow(0, r, 1).unwrap(),
                &want.narrow(0, r, 1).unwrap(),
            );
            assert!(d < 1e-6, "row {r}: {d:e}");
        }
        // The rounded rows really differ from the compensated ones.
        assert!(
            max_diff(
                &all.narrow(0, 0, 1).unwrap(),
                &rounded.narrow(0, 0, 1).unwrap()
            ) > 1e-3
        );
        assert!(ExactRows::all(5).covers(5) && !exact.covers(5) && ExactRows::default().covers(0));
    }

    /// The accumulating form adds exactly what `linear_rows` computes, row by row: compensated
    /// on the exact rows, the rounded input elsewhere.
    #[test]
    fn linear_rows_accumulate_adds_what_linear_rows_computes() {
        let x = randn(&[5, 256], 11);
        let w = randn(&[6, 256], 12).to_dtype(DType::BF16).unwrap();
        let y = randn(&[5, 6], 13);
        let exact = ExactRows::from_runs(std::iter::once(3..5));
        let got = linear_rows_accumulate(y.clone(), &x, &w, &exact).unwrap();
        let want = (&y + linear_rows(&x, &w, None, &exact).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
        let all = linear_f32_accumulate(y.clone(), &x, &w).unwrap();
        let all_want = (&y + linear_f32(&x, &w, None).unwrap()).unwrap();
        assert!(max_diff(&all, &all_want) < 1e-6);
        // Row 0 is not exact: it differs from the compensated sum; row 4 is and does not.
        let row = |t: &Tensor, r| t.narrow(0, r, 1).unwrap();
        assert!(max_diff(&row(&got, 0), &row(&all, 0)) > 1e-3);
        assert!(max_diff(&row(&got, 4), &row(&all, 4)) < 1e-6);
    }
}
