//! The prefill attention kernels against the CPU attention ([`attend`], candle ops in f32) on
//! random inputs, for every instantiation (head sizes 64, 128 and 256), grouped queries, a
//! sliding window with soft-capping, and fresh and continued chunks in one launch:
//! - the tensor-core kernel's exact chunks within 1e-4 of the reference on the f32 inputs;
//! - its rounded chunks within 1e-2 of the reference on the inputs rounded to bf16 (what is left
//!   is the bf16 rounding of the softmax weights);
//! - the f32 kernel (fresh chunks) within 1e-4.

use candle_core::{DType, Device, Tensor};

use super::{Check, SelftestError};
use crate::checkpoint::CheckpointError;
use crate::engine::attention::cuda::{prefill_attention, PrefillChunk, PrefillKernel};
use crate::engine::attention::{attend, AttnParams, MaskCache};

/// (head size, query heads, kv heads, window, soft cap).
type Case = (usize, usize, usize, Option<usize>, Option<f64>);

const CASES: [Case; 3] = [
    (64, 4, 4, None, None),
    (128, 32, 8, None, None),
    (256, 8, 4, Some(48), Some(50.0)),
];

/// (len, start, exact): two fresh chunks, two continuing a history.
const CHUNKS: [(usize, usize, bool); 4] = [
    (150, 0, false),
    (70, 0, true),
    (75, 90, false),
    (130, 10, true),
];

/// `n` values of a fixed pseudo-random sequence, roughly uniform in [-2, 2).
pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Attention settings of a test case (the usual 1 / sqrt(head size) scale).
pub(super) fn test_params(
    hd: usize,
    (heads, kv_heads): (usize, usize),
    window: Option<usize>,
    softcap: Option<f64>,
) -> AttnParams {
    AttnParams {
        scale: 1.0 / (hd as f64).sqrt(),
        softcap,
        window,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
    }
}

fn rounded(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Max |kernel - reference| over exact and rounded chunks for one case and kernel.
fn run_case(
    cuda: &Device,
    (hd, heads, kv_heads, window, softcap): Case,
    kernel: PrefillKernel,
) -> candle_core::Result<(f32, f32)> {
    let params = test_params(hd, (heads, kv_heads), window, softcap);
    // The f32 kernel takes fresh chunks only, their keys at their query rows.
    let specs: Vec<_> = CHUNKS
        .iter()
        .filter(|c| kernel == PrefillKernel::Mma || c.1 == 0)
        .collect();
    let (mut chunks, mut q_rows, mut k_rows) = (Vec::new(), 0, 0);
    for &&(len, start, exact) in &specs {
        let k_row0 = if kernel == PrefillKernel::Simt {
            q_rows
        } else {
            k_rows
        };
        chunks.push(PrefillChunk {
            q_row0: q_rows,
            len,
            k_row0,
            start,
            out0: q_rows,
            exact,
        });
        q_rows += len;
        k_rows += start + len;
    }
    let k_rows = if kernel == PrefillKernel::Simt {
        q_rows
    } else {
        k_rows
    };
    let cpu = Device::Cpu;
    let q = Tensor::from_vec(values(q_rows * heads * hd, 1), (q_rows, heads, hd), &cpu)?;
    let k = Tensor::from_vec(
        values(k_rows * kv_heads * hd, 2),
        (k_rows, kv_heads, hd),
        &cpu,
    )?;
    let v = Tensor::from_vec(
        values(k_rows * kv_heads * hd, 3),
        (k_rows, kv_heads, hd),
        &cpu,
    )?;
    let on = |t: &Tensor| t.to_device(cuda);
    let out = prefill_attention(
        (&on(&q)?, &on(&k)?, &on(&v)?),
        &chunks,
        q_rows,
        &params,
        kernel,
    )?
    .to_device(&cpu)?;
    let (mut exact_err, mut rounded_err) = (0f32, 0f32);
    let mut masks = MaskCache::default();
    for c in &chunks {
        let heads_of = |t: &Tensor| t.narrow(0, c.k_row0, c.start + c.len)?.transpose(0, 1);
        let (mut cq, mut ck, mut cv) =
            (q.narrow(0, c.q_row0, c.len)?, heads_of(&k)?, heads_of(&v)?);
        let rounding = kernel == PrefillKernel::Mma && !c.exact;
        if rounding {
            (cq, ck, cv) = (rounded(&cq)?, rounded(&ck)?, rounded(&cv)?);
        }
        let want = attend(
            &cq,
            &ck.contiguous()?,
            &cv.contiguous()?,
            c.start,
            &params,
            &mut masks,
        )?;
        let d = max_diff(&out.narrow(0, c.out0, c.len)?, &want)?;
        if rounding {
            rounded_err = rounded_err.max(d);
        } else {
            exact_err = exact_err.max(d);
        }
    }
    Ok((exact_err, rounded_err))
}

/// One check per kernel over every case.
pub(super) fn prefill_checks(cuda: &Device) -> Result<Vec<Check>, SelftestError> {
    let mut checks = Vec::new();
    for kernel in [PrefillKernel::Mma, PrefillKernel::Simt] {
        let (mut exact, mut rounded, mut detail) = (0f32, 0f32, Vec::new());
        for case in CASES {
            let (e, r) = run_case(cuda, case, kernel).map_err(CheckpointError::from)?;
            detail.push(format!("hd {}: exact {e:.1e}, rounded {r:.1e}", case.0));
            (exact, rounded) = (exact.max(e), rounded.max(r));
        }
        let (name, passed) = match kernel {
            PrefillKernel::Mma => (
                "prefill attention, tensor cores vs CPU attention (exact chunks within 1e-4, \
                 rounded within 1e-2)",
                exact <= 1e-4 && rounded <= 1e-2,
            ),
            PrefillKernel::Simt => (
                "prefill attention, f32 kernel vs CPU attention (within 1e-4)",
                exact <= 1e-4,
            ),
        };
        checks.push(Check {
            name: name.into(),
            passed,
            informational: false,
            detail: detail.join("; "),
        });
    }
    Ok(checks)
}
