//! Decode steps replayed from captured CUDA graphs against the same engine launching every
//! kernel itself (`--enforce-eager`): requests of different lengths generate past a context
//! bucket (256 tokens), so graphs of several buckets are captured and replayed, padded rows
//! included. On f32 both are held to 1e-4 with every token equal; on bf16 (the GEMMs see the
//! padded row count) the first 16 tokens must agree and the figures are reported. A run in which
//! no graph was replayed fails.

use std::sync::Arc;

use super::{compare, run_with, CacheKind, Check, Picking, SelftestError, GREEDY};
use crate::engine::model::DecoderModel;

/// Graphs vs eager on `model` over `prompts`, `steps` greedy tokens each.
pub(super) fn graph_check(
    model: &Arc<DecoderModel>,
    prompts: &[Vec<u32>],
    steps: usize,
    name: &str,
) -> Result<Check, SelftestError> {
    let eager = Picking {
        eager: true,
        ..GREEDY
    };
    let want = run_with(model, CacheKind::Paged, prompts, steps, 4096, None, eager)?;
    let got = run_with(model, CacheKind::Paged, prompts, steps, 4096, None, GREEDY)?;
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
