//! The decode path on the device:
//! - projections of 1 to 513 rows (one row through `gemm.cu`'s skinny kernel, more through
//!   cuBLAS), plain and accumulated, against the CPU's f32 product of the same bf16 values;
//! - decode steps replayed from captured CUDA graphs against the same engine launching every
//!   kernel itself (`--enforce-eager`): requests of different lengths generate past a context
//!   bucket (256 tokens), so graphs of several buckets are captured and replayed, padded rows
//!   included. On f32 both are held to 1e-4 with every token equal; on bf16 (the GEMMs see the
//!   padded row count) the first 16 tokens must agree and the figures are reported. A run in
//!   which no graph was replayed fails. The same holds with LoRA adapters on some requests (two
//!   adapters of different ranks mixed with plain rows: the graphs' slot tables).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::{compare, run_with, AdapterOn, CacheKind, Check, Picking, SelftestError, GREEDY};
use crate::engine::model::DecoderModel;
use crate::engine::ops::gemm::{linear_f32_accumulate, linear_rows, ExactRows};

/// [`super::prefill::values`] as a bf16 matrix on the CPU.
pub(super) fn values(shape: (usize, usize), seed: u64) -> candle_core::Result<Tensor> {
    let v = super::prefill::values(shape.0 * shape.1, seed);
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)
}

/// Projections of 1 to 513 rows (one through the skinny kernel, more through cuBLAS), plain and
/// accumulated into existing rows, against the CPU's f32 product of the same bf16 values, on two
/// shapes: a small one not a multiple of any tile, and one of 1,000 x 4,104.
pub(super) fn projection_check(cuda: &Device) -> Result<Check, SelftestError> {
    projection_diffs(cuda).map_err(|e| SelftestError::Engine(e.into()))
}

const PROJECTION_SHAPES: [(usize, usize); 2] = [(300, 1032), (1000, 4104)];
const PROJECTION_ROWS: [usize; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64, 65, 256, 513];

fn projection_diffs(cuda: &Device) -> candle_core::Result<Check> {
    let mut worst = 0f32;
    let mut report = Vec::new();
    for (n, k) in PROJECTION_SHAPES {
        for t in PROJECTION_ROWS {
            let seed = (t + n) as u64;
            let (x, w) = (values((t, k), seed)?, values((n, k), 100 + seed)?);
            let base = values((t, n), 200 + seed)?.to_dtype(DType::F32)?;
            let f32 = |a: &Tensor| a.to_dtype(DType::F32);
            let want = f32(&x)?.matmul(&f32(&w)?.t()?)?;
            // Each output's error is measured against the sum of its products' magnitudes.
            let scale = f32(&x)?.abs()?.matmul(&f32(&w)?.abs()?.t()?)?;
            let (xd, wd) = (x.to_device(cuda)?, w.to_device(cuda)?);
            let got = linear_rows(&xd, &wd, None, &ExactRows::from_runs([]))?;
            let acc = linear_f32_accumulate(base.to_device(cuda)?, &xd, &wd)?;
            let d1 = max_relative(&got.to_device(&Device::Cpu)?, &want, &scale)?;
            let d2 = max_relative(&acc.to_device(&Device::Cpu)?, &(&want + &base)?, &scale)?;
            worst = worst.max(d1).max(d2);
            report.push(format!("{n}x{k} {t}: {:.1e}", d1.max(d2)));
        }
    }
    Ok(Check {
        name: "projections of 1 (skinny kernel) to 513 rows (cuBLAS) vs CPU f32, 300x1032 and \
               1000x4104, within 3e-5 of the products' magnitude"
            .into(),
        passed: worst <= 3e-5,
        informational: false,
        detail: format!("max |d| / sum |x w| by rows {}", report.join(", ")),
    })
}

/// The largest `|a - b| / scale` over the elements.
fn max_relative(a: &Tensor, b: &Tensor, scale: &Tensor) -> candle_core::Result<f32> {
    ((a - b)?.abs()? / scale)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// Graphs vs eager on `model` over `prompts`, `steps` greedy tokens each, with `lora`'s adapters
/// on the requests it picks.
pub(super) fn graph_check(
    model: &Arc<DecoderModel>,
    prompts: &[Vec<u32>],
    steps: usize,
    lora: Option<AdapterOn<'_>>,
    name: &str,
) -> Result<Check, SelftestError> {
    let eager = Picking {
        eager: true,
        ..GREEDY
    };
    let want = run_with(model, CacheKind::Paged, prompts, steps, 4096, lora, eager)?;
    let got = run_with(model, CacheKind::Paged, prompts, steps, 4096, lora, GREEDY)?;
    let d = compare(&got, &want);
    let strict = model.dtype() == candle_core::DType::F32;
    let agree = match strict {
        true => d.max() <= 1e-4 && d.diverge.iter().all(Option::is_none),
        false => d.diverge.iter().all(|d| d.is_none_or(|s| s >= 16)),
    };
    let rule = match strict {
        true => "within 1e-4, tokens equal",
        false => "first 16 tokens equal",
    };
    Ok(Check {
        name: format!("{name}: decode steps from CUDA graphs vs eager ({rule})"),
        passed: agree && got.graph_replays > 0 && want.graph_replays == 0,
        informational: false,
        detail: format!(
            "{}; {} replays, {} captures",
            d.describe(steps),
            got.graph_replays,
            got.graph_captures
        ),
    })
}
