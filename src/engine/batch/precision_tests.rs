//! Batch invariance of the projections' input precision on a tiny bf16 Llama (CPU, which
//! computes what cuBLAS's bf16 GEMMs compute): a prompt step without scored rows writes the
//! projections' inputs rounded to bf16 once ([`gemm_input_dtype`]); beside a scored prompt the
//! same rows are written in f32 and rounded by the projection instead. Both must give the
//! unscored request the same tokens, and the same logprobs bit for bit from its decode steps
//! (their keys and values came from the prompt step, so its layers computed the same rows). The
//! first token's logprob comes from the prompt step's LM head, which multiplies one row alone and
//! 34 rows beside the scored prompt: the CPU GEMM sums those in another order, so its logits differ
//! by an ulp and its logprob (summed in f64) agrees within 1e-6.

use candle_core::DType;

use super::prefill_cap_tests::{batcher, request, tiny};
use super::{GenOutput, GenRequest};
use crate::engine::model::precision::gemm_input_dtype;
use crate::engine::ops::gemm::ExactRows;

#[test]
fn an_unscored_prompt_gives_the_same_logprobs_beside_a_scored_one() {
    let (_dir, model) = tiny(DType::BF16);
    let run = |reqs: Vec<GenRequest>| -> Vec<GenOutput> {
        // One step holds both prompts whole.
        batcher(&model, 512, 0)
            .run_all(reqs)
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    };
    let unscored = || request(&model, 40, 6, false);
    let alone = run(vec![unscored()]);
    let beside = run(vec![request(&model, 33, 1, true), unscored()]);
    assert_eq!(
        beside[0].prompt_scores.len(),
        32,
        "the scored prompt was scored"
    );
    let bits = |o: &GenOutput| -> Vec<(u32, u32)> {
        o.tokens
            .iter()
            .map(|s| (s.token, s.logprob.to_bits()))
            .collect()
    };
    assert_eq!(alone[0].tokens.len(), 6);
    let (a, b) = (bits(&alone[0]), bits(&beside[1]));
    assert_eq!(a[1..], b[1..], "decode steps");
    assert_eq!(a[0].0, b[0].0, "first token");
    let first = |o: &GenOutput| o.tokens[0].logprob;
    assert!((first(&alone[0]) - first(&beside[1])).abs() < 1e-6);
}

#[test]
fn projections_take_bf16_inputs_only_where_no_row_is_compensated() {
    let none = ExactRows::from_runs([]);
    let some = ExactRows::from_runs(std::iter::once(3..9));
    // A prompt step of bf16 weights without scored rows: rounded once, up front.
    assert_eq!(
        gemm_input_dtype(DType::BF16, DType::F32, &none),
        DType::BF16
    );
    // Scored rows keep f32 inputs, split into two terms by their projections.
    assert_eq!(gemm_input_dtype(DType::BF16, DType::F32, &some), DType::F32);
    // Decode steps are bf16 already; f32 weights keep f32 everywhere.
    assert_eq!(
        gemm_input_dtype(DType::BF16, DType::BF16, &none),
        DType::BF16
    );
    assert_eq!(gemm_input_dtype(DType::F32, DType::F32, &none), DType::F32);
}
