//! The precision of a step's activations: which dtype the layers write their activations in,
//! which rows take their projections compensated, and which dtype feeds the projections. One
//! place owns the rule, so that every row's values depend only on its own chunk (batch
//! invariance) and only scored rows pay for f32 inputs.

use candle_core::DType;

use crate::engine::kv::ChunkRef;
use crate::engine::ops::gemm::ExactRows;

/// The precision of a step's activations, the inputs of every projection. The residual stream
/// is f32 throughout and projections accumulate in f32; with bf16 weights:
/// - steps with prompt rows keep activations in f32; the rows of scored chunks (prompt logprobs
///   asked, [`exact_rows`]) take them compensated (two bf16 terms,
///   [`linear_rows`](crate::engine::ops::gemm::linear_rows)), so prompt logprobs carry no bf16
///   rounding of activations, and every other row takes them rounded once to bf16 (one GEMM,
///   the cost of a bf16 prefill);
/// - decode-only steps round them once to bf16 (one GEMM each, the memory-bound fast path), as
///   the paged decode kernel takes its queries.
///
/// With f32 weights everything is f32.
pub fn activation_dtype(weights: DType, chunks: &[ChunkRef]) -> DType {
    if decode_only(chunks) {
        weights
    } else {
        DType::F32
    }
}

/// The dtype of the activations that only feed projections (the norms' outputs before q|k|v
/// and gate|up, the attention output, the MLP product): bf16 when the weights are bf16 and no
/// row of the step is `exact`, since a projection then rounds every row of an f32 input to bf16
/// anyway — written rounded once, the values are the same and no projection (nor an adapter's
/// shrink beside it) splits them again; otherwise the step's activation dtype `act`.
pub fn gemm_input_dtype(weights: DType, act: DType, exact: &ExactRows) -> DType {
    if weights == DType::BF16 && act == DType::F32 && exact.runs().is_empty() {
        DType::BF16
    } else {
        act
    }
}

/// The packed rows of the scored chunks: those whose projections are compensated (every row of
/// the step with `PRUNESERVE_EXACT_ROWS=all`, the rule before scored-only compensation, kept for
/// A/B measurements).
pub fn exact_rows(chunks: &[ChunkRef]) -> ExactRows {
    static ALL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ALL.get_or_init(|| std::env::var("PRUNESERVE_EXACT_ROWS").is_ok_and(|v| v == "all")) {
        return ExactRows::all(chunks.iter().map(|c| c.len).sum());
    }
    ExactRows::from_runs(
        chunks
            .iter()
            .filter(|c| c.scored)
            .map(|c| c.offset..c.offset + c.len),
    )
}

/// A step of one-token chunks only (no prompt rows).
pub fn decode_only(chunks: &[ChunkRef]) -> bool {
    chunks.iter().all(|c| c.len == 1)
}
