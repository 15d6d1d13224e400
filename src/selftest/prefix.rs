//! Shared work on the paged pool against the same engine without it (held to the limit on CUDA
//! f32, every token equal; reported for bf16):
//! - prefix caching: requests sharing a long start run in three rounds on one batcher (scored
//!   prompts; the same prompts and new endings of their start, scored; then generation only), so
//!   later rounds start from blocks earlier ones left (bf16 continued chunks attend to bf16
//!   history where a one-step prefill attends to its own f32 keys);
//! - shared hidden states: each prompt scored and continued on the full plan, its last quarter
//!   dropped and its second layer dropped, in one batch (the branches take the trunk's blocks and
//!   a copy of its partly filled last one, then generate apart).
//!
//! A run in which nothing was shared fails.

use std::sync::Arc;

use super::{compare, pseudo_prompts, Check, RunOut, SelftestError};
use crate::engine::batch::{Batcher, GenOutput, GenRequest};
use crate::engine::model::DecoderModel;
use crate::engine::sample::sampler::SamplingParams;
use crate::engine::{Engine, EngineOptions};
use crate::plan::LayerPlan;

/// Prompts: a 200-token start (a few-shot prefix) with endings of different lengths.
fn prompts(vocab: usize, salt: usize) -> Vec<Vec<u32>> {
    let start: Vec<u32> = (0..200).map(|i| ((i * 7919 + 17) % vocab) as u32).collect();
    [9usize, 23, 40, 61]
        .iter()
        .map(|&n| {
            let end = (0..n).map(|i| ((i * 104_729 + n * 31 + salt * 977) % vocab) as u32);
            start.iter().copied().chain(end).collect()
        })
        .collect()
}

/// The rounds' outputs after the first, and the prompt tokens found in the cache.
fn rounds(model: &Arc<DecoderModel>, caching: bool) -> Result<(RunOut, u64), SelftestError> {
    let mut batcher = batcher(model, caching)?;
    let plan = Arc::new(LayerPlan::full(model.config().num_hidden_layers));
    let vocab = model.config().vocab_size;
    let first = prompts(vocab, 0);
    let second: Vec<Vec<u32>> = first.iter().cloned().chain(prompts(vocab, 1)).collect();
    let mut later: Vec<GenOutput> = Vec::new();
    for (round, (set, scored)) in [(&first, true), (&second, true), (&second, false)]
        .into_iter()
        .enumerate()
    {
        let reqs = set
            .iter()
            .map(|p| request(&plan, p.clone(), scored))
            .collect();
        let outs = batcher
            .run_all(reqs)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        if round > 0 {
            later.extend(outs);
        }
    }
    Ok((RunOut::of(&later), batcher.engine().prefix_counts().1))
}

/// Each prompt on three plans (full, last quarter dropped, second layer dropped) in one batch;
/// the outputs and the rows times layers shared.
fn plans_together(
    model: &Arc<DecoderModel>,
    sharing: bool,
) -> Result<(RunOut, u64), SelftestError> {
    let mut batcher = batcher(model, sharing)?;
    let n = model.config().num_hidden_layers;
    let plans = [
        (0..n).collect::<Vec<_>>(),
        (0..n - n / 4).collect(),
        (0..n).filter(|&l| l != 1).collect(),
    ]
    .map(|layers| LayerPlan::new(layers, n).map(Arc::new));
    let mut reqs = Vec::new();
    for prompt in pseudo_prompts(model.config().vocab_size, &[30, 77, 140]) {
        for plan in &plans {
            let plan = plan
                .as_ref()
                .map_err(|e| SelftestError::Usage(e.to_string()))?;
            reqs.push(request(plan, prompt.clone(), true));
        }
    }
    let outs = batcher
        .run_all(reqs)
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok((RunOut::of(&outs), batcher.engine().shared_layer_rows()))
}

/// A batcher on the paged pool, with prefix caching (and so shared hidden states) or without.
fn batcher(model: &Arc<DecoderModel>, sharing: bool) -> Result<Batcher, SelftestError> {
    let opts = EngineOptions {
        prefix_caching: sharing,
        ..EngineOptions::default()
    };
    Ok(Batcher::new(
        Engine::for_device(model.clone(), &opts)?,
        4096,
    ))
}

/// A request of the checks above: greedy, 12 tokens, scored or not.
fn request(plan: &Arc<LayerPlan>, prompt: Vec<u32>, scored: bool) -> GenRequest {
    GenRequest {
        plan: plan.clone(),
        overlay: None,
        lora: None,
        prompt,
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        prompt_logprobs: scored.then_some(1),
        stop_token_ids: vec![],
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

/// The check for the sharing of hidden states within a step.
pub(super) fn sharing_check(
    model: &Arc<DecoderModel>,
    name: &str,
    strict: bool,
) -> Result<Check, SelftestError> {
    let (shared, rows) = plans_together(model, true)?;
    let (plain, _) = plans_together(model, false)?;
    outcome(
        format!("{name}: shared hidden states on the paged pool, on vs off"),
        strict,
        rows,
        "rows x layers shared",
        compare(&shared, &plain),
    )
}

/// A check passing when something was shared and, if `strict`, the runs agree.
fn outcome(
    name: String,
    strict: bool,
    shared: u64,
    what: &str,
    d: super::Diff,
) -> Result<Check, SelftestError> {
    let held = d.max() <= 1e-3 && d.diverge.iter().all(Option::is_none);
    Ok(Check {
        name: format!(
            "{name}{}",
            if strict {
                " (within 1e-3, tokens equal, something shared)"
            } else {
                " (something shared)"
            }
        ),
        passed: shared > 0 && (!strict || held),
        informational: !strict,
        detail: format!("{shared} {what}; {}", d.describe(12)),
    })
}

/// The check for prefix caching (`strict`: within 1e-3 with every token equal).
pub(super) fn prefix_check(
    model: &Arc<DecoderModel>,
    name: &str,
    strict: bool,
) -> Result<Check, SelftestError> {
    let (cached, hits) = rounds(model, true)?;
    let (plain, _) = rounds(model, false)?;
    outcome(
        format!("{name}: paged prefix caching on vs off"),
        strict,
        hits,
        "prompt tokens from the cache",
        compare(&cached, &plain),
    )
}
