//! Fused decoder steps over the f32 residual stream, one kernel launch each on CUDA:
//! RMSNorm straight to the projections' dtype, rotary embedding of the heads of a packed
//! q|k|v projection, `act(gate) * up` from a packed gate|up projection, and projections with f32
//! output (bf16 weights on CUDA: one cuBLAS GemmEx, bf16 inputs, f32 accumulation and output).
//! Every value is rounded to the output dtype once. The CPU implementations here define what
//! the CUDA kernels (`kernels/fused.cu`) compute; the CPU tests run them.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::checkpoint::config::Activation;

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused: {what} must be contiguous"),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, what),
        other => candle_core::bail!(
            "fused: {what} must be f32, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// f32 values as CPU storage of `out` (round to nearest even for bf16, as `__float2bfloat16_rn`).
fn to_storage(values: Vec<f32>, out: DType) -> Result<CpuStorage> {
    match out {
        DType::F32 => Ok(CpuStorage::F32(values)),
        DType::BF16 => Ok(CpuStorage::BF16(
            values.into_iter().map(half::bf16::from_f32).collect(),
        )),
        other => candle_core::bail!("fused: unsupported output dtype {other:?}"),
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

struct RmsNormTo {
    eps: f32,
    out: DType,
}

struct RopeHeads {
    col0: usize,
    heads: usize,
    head_dim: usize,
    rotate: bool,
    out: DType,
}

struct ActMul {
    silu: bool,
    out: DType,
}

impl CustomOp2 for RmsNormTo {
    fn name(&self) -> &'static str {
        "rms-norm-to"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm input")?;
        let alpha = f32_slice(s2, l2, "rms_norm weight")?;
        let cols = alpha.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(cols) {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
            let inv = 1.0 / (mean + self.eps).sqrt();
            out.extend(row.iter().zip(alpha).map(|(v, a)| v * inv * a));
        }
        Ok((to_storage(out, self.out)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = l2.shape().elem_count();
        let rows = l1.shape().elem_count() / cols;
        let block = if cols >= 1024 { 1024 } else { 256 };
        let storage = cuda::launch(
            "rms_norm_to",
            self.out,
            rows * cols,
            (rows as u32, 1, 1),
            block,
            &[(s1, l1), (s2, l2)],
            &[cols as i32],
            &[self.eps],
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(s1, l1, "projection")?;
        let (cos, sin) = (f32_slice(s2, l2, "cos")?, f32_slice(s3, l3, "sin")?);
        let (rows, cols) = l1.shape().dims2()?;
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        let mut out = vec![0f32; rows * self.heads * hd];
        for r in 0..rows {
            for h in 0..self.heads {
                let x = &src[r * cols + self.col0 + h * hd..][..hd];
                let y = &mut out[(r * self.heads + h) * hd..][..hd];
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    if self.rotate {
                        let (c, s) = (cos[r * half + i], sin[r * half + i]);
                        y[i] = x1 * c - x2 * s;
                        y[i + half] = x2 * c + x1 * s;
                    } else {
                        y[i] = x1;
                        y[i + half] = x2;
                    }
                }
            }
        }
        let shape = Shape::from((rows, self.heads, hd));
        Ok((to_storage(out, self.out)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = l1.shape().dims2()?;
        let hd = self.head_dim;
        let storage = cuda::launch(
            "rope_heads",
            self.out,
            rows * self.heads * hd,
            (rows as u32, 1, 1),
            256,
            &[(s1, l1), (s2, l2), (s3, l3)],
            &[
                cols as i32,
                self.col0 as i32,
                self.heads as i32,
                hd as i32,
                i32::from(self.rotate),
            ],
            &[],
        )?;
        Ok((storage, Shape::from((rows, self.heads, hd))))
    }
}

impl CustomOp1 for ActMul {
    fn name(&self) -> &'static str {
        "act-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gu = f32_slice(s, l, "gate|up projection")?;
        let (rows, cols) = l.shape().dims2()?;
        let n = cols / 2;
        let act = if self.silu { silu } else { gelu_tanh };
        let out = gu
            .chunks(cols)
            .flat_map(|row| (0..n).map(move |c| act(row[c]) * row[n + c]))
            .collect();
        Ok((to_storage(out, self.out)?, Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let n = cols / 2;
        // Grid (rows, column blocks of ACT_COLS = 1024 in fused.cu).
        let storage = cuda::launch(
            "act_mul",
            self.out,
            rows * n,
            (rows as u32, n.div_ceil(1024) as u32, 1),
            256,
            &[(s, l)],
            &[rows as i32, n as i32, i32::from(!self.silu)],
            &[],
        )?;
        Ok((storage, Shape::from((rows, n))))
    }
}

/// RMSNorm of f32 rows `[T, h]` with the effective scale `alpha` (f32 `[h]`), in `out` dtype.
pub fn rms_norm_to(x: &Tensor, alpha: &Tensor, eps: f32, out: DType) -> Result<Tensor> {
    x.apply_op2_no_bwd(alpha, &RmsNormTo { eps, out })
}

/// Heads `heads` of f32 projection rows `[T, cols]` starting at column `col0`, as `[T, heads,
/// head_dim]` in `out` dtype, rotated by the `cos`/`sin` rows `[T, head_dim / 2]` when `rotate`.
pub fn rope_heads(
    src: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (col0, heads, head_dim): (usize, usize, usize),
    rotate: bool,
    out: DType,
) -> Result<Tensor> {
    let op = RopeHeads {
        col0,
        heads,
        head_dim,
        rotate,
        out,
    };
    src.apply_op3_no_bwd(cos, sin, &op)
}

/// `act(gate) * up` for f32 rows `[T, 2n]` laid out gate | up, as `[T, n]` in `out` dtype.
pub fn act_mul(gate_up: &Tensor, act: Activation, out: DType) -> Result<Tensor> {
    match act {
        Activation::Silu => gate_up.apply_op1_no_bwd(&ActMul { silu: true, out }),
        Activation::GeluTanh => gate_up.apply_op1_no_bwd(&ActMul { silu: false, out }),
        Activation::GeluErf => {
            let n = gate_up.dim(1)? / 2;
            (gate_up.narrow(1, 0, n)?.gelu_erf()? * gate_up.narrow(1, n, n)?)?.to_dtype(out)
        }
    }
}

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

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

    fn view<'a>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        crate::engine::attention_cuda::storage_view(s, l, "fused op input")
    }

    /// Launches `{name}_{f32|bf16}` with the f32 inputs, then the int and float scalars.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        name: &str,
        out: DType,
        len: usize,
        grid: (u32, u32, u32),
        block: u32,
        inputs: &[(&CudaStorage, &Layout)],
        ints: &[i32],
        floats: &[f32],
    ) -> Result<CudaStorage> {
        let dev = inputs[0].0.device().clone();
        let views = inputs
            .iter()
            .map(|(s, l)| view(s, l))
            .collect::<Result<Vec<_>>>()?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($t:ty, $suffix:literal) => {{
                let func = dev.get_or_load_custom_func(
                    &format!("{name}_{}", $suffix),
                    "pruneserve_fused",
                    PTX,
                )?;
                // SAFETY: every element is written by the kernel before it is read.
                let dst = unsafe { dev.alloc::<$t>(len)? };
                let mut b = func.builder();
                for v in &views {
                    b.arg(v);
                }
                b.arg(&dst);
                for i in ints {
                    b.arg(i);
                }
                for f in floats {
                    b.arg(f);
                }
                // SAFETY: the argument list matches the kernel's signature in fused.cu.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        Ok(match out {
            DType::F32 => run!(f32, "f32"),
            DType::BF16 => run!(half::bf16, "bf16"),
            other => candle_core::bail!("fused: unsupported output dtype {other:?}"),
        })
    }

    /// `y[T, n] = x[T, k] · w[n, k]ᵀ` with bf16 weights, f32 compute and output; a bf16 `x` in
    /// one GemmEx, an f32 `x` split into bf16 hi and lo terms accumulated by two.
    pub fn gemm_bf16_f32_out(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (t, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("gemm-f32-out: inner dims {k} and {k2} differ");
        }
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("gemm-f32-out: inputs must be contiguous");
        };
        let dev = xs.device().clone();
        let w = ws.as_cuda_slice::<half::bf16>()?.slice(wa..wb);
        // SAFETY: the first GEMM writes every element (beta = 0).
        let mut y = unsafe { dev.alloc::<f32>(t * n)? };
        match xs.dtype() {
            DType::BF16 => {
                let x = xs.as_cuda_slice::<half::bf16>()?.slice(xa..xb);
                gemm(&dev, &x, &w, &mut y, (t, n, k), 0.0)?;
            }
            DType::F32 => {
                let x = xs.as_cuda_slice::<f32>()?.slice(xa..xb);
                let len = t * k;
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
                gemm(&dev, &terms.slice(..len), &w, &mut y, (t, n, k), 0.0)?;
                gemm(&dev, &terms.slice(len..), &w, &mut y, (t, n, k), 1.0)?;
            }
            other => candle_core::bail!("gemm-f32-out: unsupported input dtype {other:?}"),
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((t, n))))
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
    use candle_core::{Device, IndexOp};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // A fixed pseudo-random sequence in [-2, 2).
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn rms_norm_to_matches_candle_and_rounds_once() {
        let (x, alpha) = (randn(&[3, 64], 1), randn(&[64], 2));
        let want = candle_nn::ops::rms_norm(&x, &alpha, 1e-5).unwrap();
        let got = rms_norm_to(&x, &alpha, 1e-5, DType::F32).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let bf = rms_norm_to(&x, &alpha, 1e-5, DType::BF16).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        let rounded = got
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_diff(&bf.to_dtype(DType::F32).unwrap(), &rounded), 0.0);
    }

    #[test]
    fn rope_heads_matches_candle_rope_thd_and_copies_unrotated_heads() {
        let (t, nh, nkv, hd) = (5, 4, 2, 8);
        let qkv = randn(&[t, (nh + 2 * nkv) * hd], 3);
        let (cos, sin) = (randn(&[t, hd / 2], 4), randn(&[t, hd / 2], 5));
        let k = rope_heads(&qkv, (&cos, &sin), (nh * hd, nkv, hd), true, DType::F32).unwrap();
        let k_in = qkv
            .narrow(1, nh * hd, nkv * hd)
            .unwrap()
            .reshape((1, t, nkv, hd))
            .unwrap()
            .contiguous()
            .unwrap();
        let want = candle_nn::rotary_emb::rope_thd(&k_in, &cos, &sin).unwrap();
        assert!(max_diff(&k, &want.i(0).unwrap()) < 1e-6);
        let v = rope_heads(
            &qkv,
            (&cos, &sin),
            ((nh + nkv) * hd, nkv, hd),
            false,
            DType::F32,
        )
        .unwrap();
        let v_in = qkv.narrow(1, (nh + nkv) * hd, nkv * hd).unwrap();
        assert_eq!(max_diff(&v, &v_in.reshape((t, nkv, hd)).unwrap()), 0.0);
    }

    #[test]
    fn act_mul_matches_candle_activations() {
        let gu = randn(&[3, 16], 6);
        let (g, u) = (gu.narrow(1, 0, 8).unwrap(), gu.narrow(1, 8, 8).unwrap());
        let silu = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let got = act_mul(&gu, Activation::Silu, DType::F32).unwrap();
        assert!(max_diff(&got, &silu) < 1e-6);
        let gelu = (g.gelu().unwrap() * &u).unwrap();
        let got = act_mul(&gu, Activation::GeluTanh, DType::F32).unwrap();
        assert!(max_diff(&got, &gelu) < 1e-5);
    }

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
