//! Fused decoder steps over the f32 residual stream, one kernel launch each on CUDA:
//! RMSNorm straight to the projections' dtype, rotary embedding of the heads of a packed
//! q|k|v projection and `act(gate) * up` from a packed gate|up projection (row gathers and the
//! bias add are in [`crate::engine::ops::rows`]; the projections
//! themselves are [`crate::engine::ops::gemm`]). Every value is rounded to the output dtype once. The CPU implementations here define what
//! the CUDA kernels (`kernels/fused.cu`) compute; the CPU tests run them.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::engine::model::config::Activation;

pub(crate) fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused: {what} must be contiguous"),
    }
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
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

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};

    /// The kernels of fused.cu (the hi/lo split of [`crate::engine::ops::gemm`] included).
    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

    fn view<'a>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        crate::engine::attention::cuda::storage_view(s, l, "fused op input")
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // A fixed pseudo-random sequence in [-2, 2).
        let v: Vec<f32> = (0..n as u64)
            .map(|i| (((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
}
