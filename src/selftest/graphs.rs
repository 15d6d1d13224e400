//! The decode path on the device:
//! - projections of 1 to 65 rows (one row through `gemm.cu`'s skinny kernel, 2 to 64 through the
//!   weight-streaming kernel (repeatable bit for bit) and cuBLAS, more through cuBLAS), plain and
//!   accumulated, against the CPU's f32 product of the same bf16 values;
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
use crate::engine::ops::stream_gemm;

/// [`super::prefill::values`] as a bf16 matrix on the CPU.
pub(super) fn values(shape: (usize, usize), seed: u64) -> candle_core::Result<Tensor> {
    let v = super::prefill::values(shape.0 * shape.1, seed);
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)
}

/// Projections of 1 to 65 rows, plain and accumulated into existing rows, against the CPU's f32
/// product of the same bf16 values: one row through the skinny kernel, 2 to 64 through the
/// weight-streaming kernel (run twice: results must be bit-identical) and through cuBLAS, more
/// through cuBLAS. Two shapes: one whose tiles are each split over many blocks, one larger.
pub(super) fn skinny_check(cuda: &Device) -> Result<Check, SelftestError> {
    let result = projection_diffs(cuda);
    stream_gemm::set_enabled(true);
    result.map_err(|e| SelftestError::Engine(e.into()))
}

const PROJECTION_SHAPES: [(usize, usize); 2] = [(300, 1032), (1000, 4104)];
const PROJECTION_ROWS: [usize; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33, 64, 65];

fn projection_diffs(cuda: &Device) -> candle_core::Result<Check> {
    let (mut worst, mut worst_cublas, mut repeatable) = (0f32, 0f32, true);
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
            let (xd, wd, based) = (x.to_device(cuda)?, w.to_device(cuda)?, base.to_device(cuda)?);
            let run = || -> candle_core::Result<(Tensor, Tensor)> {
                let got = linear_rows(&xd, &wd, None, &ExactRows::from_runs([]))?;
                let acc = linear_f32_accumulate(based.copy()?, &xd, &wd)?;
                Ok((got.to_device(&Device::Cpu)?, acc.to_device(&Device::Cpu)?))
            };
            let diff = |(got, acc): &(Tensor, Tensor)| -> candle_core::Result<f32> {
                let d1 = max_relative(got, &want, &scale)?;
                Ok(d1.max(max_relative(acc, &(&want + &base)?, &scale)?))
            };
            let engine = run()?;
            let d = diff(&engine)?;
            worst = worst.max(d);
            report.push(format!("{n}x{k} {t}: {d:.1e}"));
            if (2..=stream_gemm::MAX_ROWS).contains(&t) {
                let again = run()?;
                let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<bool> {
                    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0)
                };
                repeatable &= same(&engine.0, &again.0)? && same(&engine.1, &again.1)?;
                stream_gemm::set_enabled(false);
                let cublas = run();
                stream_gemm::set_enabled(true);
                worst_cublas = worst_cublas.max(diff(&cublas?)?);
            }
        }
    }
    Ok(Check {
        name: "projections of 1 (skinny kernel), 2-64 (streaming kernel; and cuBLAS) and 65 rows \
               (cuBLAS) vs CPU f32, within 3e-5 of the products' magnitude, streaming results \
               repeatable"
            .into(),
        passed: worst <= 3e-5 && worst_cublas <= 3e-5 && repeatable,
        informational: false,
        detail: format!(
            "max |d| / sum |x w| (cuBLAS at 2-64 rows: {worst_cublas:.1e}; streaming repeated \
             bit for bit: {repeatable}) by rows {}",
            report.join(", ")
        ),
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
