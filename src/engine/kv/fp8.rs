//! `--kv-cache-dtype`: what the KV cache holds. `auto` keeps keys and values in the model's
//! dtype; `fp8` (vLLM's name, also `fp8_e4m3`) rounds every key and value to OCP fp8 E4M3 with a
//! scale of 1 (vLLM's default without calibrated scales: magnitudes above 448 saturate, those of
//! 2^-10 or less round to zero) before anything attends to it, so a fresh prompt, a continued
//! chunk, a prefix-cache hit and a decode step all see the same rounded values. The CUDA paged pool
//! stores the bytes (half the memory and the bandwidth of bf16); the CPU engine, the reference,
//! rounds the same way and keeps the values in f32.
//!
//! The rounding is round-to-nearest-even with saturation, the same on both devices: on the CPU
//! `float8`'s port of CUDA's `__nv_cvt_float_to_fp8(.., __NV_SATFINITE, __NV_E4M3)`, which our
//! kernels and mistralrs-paged-attn's writes call on the GPU; the test below holds the CPU one
//! to an independent nearest-value search over all 256 codes (`selftest --device cuda` the GPU
//! one to the CPU).

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use float8::F8E4M3;

use crate::loaded::DeviceKind;

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvCacheDtype {
    /// The model's dtype (bf16 on CUDA, f32 on the CPU).
    #[default]
    Auto,
    /// OCP fp8 E4M3, scale 1.
    #[value(name = "fp8", alias = "fp8_e4m3")]
    Fp8,
}

/// Why a `--kv-cache-dtype` cannot serve a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--kv-cache-dtype fp8 {0}")]
pub struct UnsupportedKvDtype(&'static str);

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f64 = 448.0;

impl KvCacheDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Fp8 => "fp8",
        }
    }

    /// Whether a model computing in `dtype` on `device` can keep this cache.
    pub fn check(self, device: DeviceKind, dtype: DType) -> Result<(), UnsupportedKvDtype> {
        match (self, device, dtype) {
            (KvCacheDtype::Auto, _, _) | (KvCacheDtype::Fp8, DeviceKind::Cpu, _) => Ok(()),
            (KvCacheDtype::Fp8, DeviceKind::Cuda, DType::BF16) => Ok(()),
            (KvCacheDtype::Fp8, DeviceKind::Cuda, _) => Err(UnsupportedKvDtype(
                "on CUDA needs --dtype bf16 (the fp8 attention kernels take bf16 queries)",
            )),
        }
    }

    /// The dtype a cache of a model computing in `compute` stores on `device`.
    pub fn storage(self, compute: DType, device: &Device) -> DType {
        match (self, device.is_cuda()) {
            (KvCacheDtype::Fp8, true) => DType::F8E4M3,
            _ => compute,
        }
    }

    /// `t` (f32 or bf16) with every value rounded to what this cache keeps (unchanged for
    /// `auto`), in `t`'s dtype.
    pub fn round(self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            KvCacheDtype::Auto => Ok(t.clone()),
            KvCacheDtype::Fp8 => t.contiguous()?.apply_op1_no_bwd(&RoundFp8),
        }
    }
}

/// Rounds to E4M3 and back: on the CPU with `float8` (the reference), on CUDA with
/// `round_fp8` (attention.cu). candle 0.10.2's own fp8 casts cannot serve here: its CUDA cast
/// looks its kernels up under other names than it builds them with.
struct RoundFp8;

fn rounded<T: Copy>(v: &[T], via: impl Fn(T) -> f32, back: impl Fn(f32) -> T) -> Vec<T> {
    v.iter()
        .map(|&x| back(F8E4M3::from_f32(via(x)).to_f32()))
        .collect()
}

impl CustomOp1 for RoundFp8 {
    fn name(&self) -> &'static str {
        "round-fp8"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("round_fp8 takes contiguous values");
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(rounded(&v[a..b], |x| x, |x| x)),
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(rounded(&v[a..b], half::bf16::to_f32, half::bf16::from_f32))
            }
            other => candle_core::bail!(
                "round_fp8: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::engine::attention::cuda::round_fp8(s, l)?;
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of E4M3 code `c` (OCP: bias 7, no infinities, S.1111.111 is NaN), decoded
    /// from its bits.
    fn decode(c: u8) -> Option<f64> {
        let (sign, exp, man) = (c >> 7, (c >> 3) & 0xF, c & 7);
        if exp == 0xF && man == 7 {
            return None;
        }
        let mag = match exp {
            0 => f64::from(man) / 8.0 * 2f64.powi(-6),
            e => (1.0 + f64::from(man) / 8.0) * 2f64.powi(i32::from(e) - 7),
        };
        Some(if sign == 1 { -mag } else { mag })
    }

    /// Nearest finite code by search, ties to the even code, beyond the largest saturated.
    fn reference(x: f64) -> f64 {
        let x = x.clamp(-E4M3_MAX, E4M3_MAX);
        let mut best: Option<(f64, u8, f64)> = None;
        for c in 0..=255u8 {
            let Some(v) = decode(c) else { continue };
            let d = (v - x).abs();
            let better = match best {
                None => true,
                Some((bd, bc, _)) => d < bd || (d == bd && c % 2 == 0 && bc % 2 == 1),
            };
            if better {
                best = Some((d, c, v));
            }
        }
        best.map_or(f64::NAN, |b| b.2)
    }

    #[test]
    fn rounding_matches_a_search_over_every_code() {
        // Every code's value, the midpoints between neighbours (ties), points just off them,
        // subnormals, values past the largest finite one, and a spread of ordinary values.
        let mut finite: Vec<f64> = (0..=255u8).filter_map(decode).collect();
        finite.sort_by(f64::total_cmp);
        let mut xs = finite.clone();
        for w in finite.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            xs.extend([mid, mid * (1.0 + 1e-6), mid * (1.0 - 1e-6)]);
        }
        xs.extend([500.0, -1e6, 449.0, 464.0, 1e-4, -3e-3, 0.0]);
        xs.extend((0..2000).map(|i| ((i as f64) * 0.37).sin() * 10f64.powi(i % 7 - 3)));
        let f32s: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
        let t = Tensor::new(f32s.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f32> = KvCacheDtype::Fp8.round(&t).unwrap().to_vec1().unwrap();
        let mut ties = 0;
        for (&x, &g) in f32s.iter().zip(&got) {
            let want = reference(f64::from(x));
            assert_eq!(f64::from(g), want, "round({x})");
            ties += usize::from(
                finite
                    .windows(2)
                    .any(|w| f64::from(x) == (w[0] + w[1]) / 2.0),
            );
        }
        assert!(ties > 200, "the sweep must hit ties ({ties})");
        // And `auto` leaves values alone.
        let same: Vec<f32> = KvCacheDtype::Auto.round(&t).unwrap().to_vec1().unwrap();
        assert_eq!(same, f32s);
    }

    #[test]
    fn fp8_on_cuda_needs_bf16() {
        let fp8 = KvCacheDtype::Fp8;
        assert!(fp8.check(DeviceKind::Cuda, DType::BF16).is_ok());
        assert!(fp8.check(DeviceKind::Cpu, DType::F32).is_ok());
        let err = fp8.check(DeviceKind::Cuda, DType::F32).unwrap_err();
        assert!(err.to_string().contains("--dtype bf16"), "{err}");
        assert_eq!(fp8.storage(DType::F32, &Device::Cpu), DType::F32);
    }
}
