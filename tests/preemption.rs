//! KV on demand with preemption: a pool too small for every request's `max_tokens` at once but
//! large enough for each alone admits them all, preempts the most recent when it runs out, and
//! every request ends with exactly what it gets alone (greedy and seeded tokens identical, prompt
//! and token logprobs within float rounding of a different batch composition).

mod common;

use std::sync::Arc;

use common::*;
use pruneserve::engine::batch::{Batcher, GenOutput, GenRequest};
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::{Engine, EngineOptions};
use pruneserve::plan::LayerPlan;

fn requests(plan: &Arc<LayerPlan>) -> Vec<GenRequest> {
    (0..6)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: Some(100 + i as u64),
                    ..SamplingParams::default()
                }
            };
            GenRequest {
                prompt_logprobs: (i % 3 == 0).then_some(2),
                ignore_eos: true,
                ..gen_request(plan, pseudo_tokens(10 + i, 300, i), 40, sampling, &[257])
            }
        })
        .collect()
}

/// A tiny random Llama (kept on disk while the first value lives) and its full plan.
fn tiny_model() -> (
    tempfile::TempDir,
    Arc<pruneserve::engine::model::DecoderModel>,
    Arc<LayerPlan>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(tmp.path(), "m", tiny_config("LlamaForCausalLM"), 4);
    (tmp, load_cpu(&dir), Arc::new(LayerPlan::full(6)))
}

/// A batcher over a `blocks`-block pool.
fn batcher_with(
    model: &Arc<pruneserve::engine::model::DecoderModel>,
    blocks: usize,
    reserve_max_tokens: bool,
) -> Batcher {
    let opts = EngineOptions {
        kv_blocks: blocks,
        ..EngineOptions::default()
    };
    Batcher::new(Engine::with_contiguous_cache(model.clone(), &opts), 64)
        .reserving_max_tokens(reserve_max_tokens)
}

fn run(
    model: &Arc<pruneserve::engine::model::DecoderModel>,
    blocks: usize,
    reqs: Vec<GenRequest>,
) -> (Vec<GenOutput>, u64) {
    let mut b = batcher_with(model, blocks, false);
    let outs = b.run_all(reqs).into_iter().map(|o| o.unwrap()).collect();
    (outs, b.num_preemptions())
}

#[test]
fn a_small_pool_preempts_and_every_request_ends_as_it_would_alone() {
    let (_tmp, model, plan) = tiny_model();
    // Each request ends at 10..16 + 40 tokens (4 blocks of 16); six need 24 blocks, the pool
    // holds 12: at most three could run with their whole max_tokens reserved up front.
    let (together, preemptions) = run(&model, 12, requests(&plan));
    assert!(preemptions > 0, "the pool should have run out");
    for (i, req) in requests(&plan).into_iter().enumerate() {
        let (alone, none) = run(&model, 4096, vec![req]);
        assert_eq!(none, 0);
        let alone = &alone[0];
        let t = &together[i];
        let ids = |o: &GenOutput| o.tokens.iter().map(|s| s.token).collect::<Vec<_>>();
        assert_eq!(ids(t), ids(alone), "request {i}: tokens");
        assert_eq!(t.tokens.len(), 40);
        for (x, y) in t.tokens.iter().zip(&alone.tokens) {
            assert!(
                (x.logprob - y.logprob).abs() < 1e-5,
                "request {i}: {} vs {}",
                x.logprob,
                y.logprob
            );
        }
        assert_eq!(
            t.prompt_scores.len(),
            alone.prompt_scores.len(),
            "request {i}"
        );
        for (x, y) in t.prompt_scores.iter().zip(&alone.prompt_scores) {
            assert_eq!(x.token, y.token);
            assert!(
                (x.logprob - y.logprob).abs() < 1e-5,
                "request {i}: prompt logprobs"
            );
        }
    }
    println!("six requests in a 12-block pool: {preemptions} preemptions");
}

/// Steps `reqs` to the end on a `blocks`-block pool; the outputs' tokens, the preemptions and
/// the most sequences running at once.
fn run_counting(
    model: &Arc<pruneserve::engine::model::DecoderModel>,
    blocks: usize,
    reserve_max_tokens: bool,
    reqs: Vec<GenRequest>,
) -> (Vec<Vec<u32>>, u64, usize) {
    let mut b = batcher_with(model, blocks, reserve_max_tokens);
    let ids: Vec<_> = reqs.into_iter().map(|r| b.submit(r).unwrap()).collect();
    let mut tokens = std::collections::HashMap::new();
    let mut peak = 0;
    while !b.is_idle() {
        for ev in b.step() {
            if let pruneserve::engine::batch::BatchEvent::Finished { id, output } = ev {
                tokens.insert(id, output.tokens.iter().map(|s| s.token).collect());
            }
        }
        peak = peak.max(b.num_active());
    }
    let out = ids.iter().map(|id| tokens.remove(id).unwrap()).collect();
    (out, b.num_preemptions(), peak)
}

#[test]
fn reserving_max_tokens_never_preempts_and_runs_fewer_at_once() {
    let (_tmp, model, plan) = tiny_model();
    let (on_demand, preempted, peak_on_demand) = run_counting(&model, 12, false, requests(&plan));
    let (whole, none, peak_whole) = run_counting(&model, 12, true, requests(&plan));
    println!("on demand: {preempted} preemptions, peak {peak_on_demand}; whole: peak {peak_whole}");
    assert_eq!(whole, on_demand, "the same tokens either way");
    assert!(preempted > 0);
    assert_eq!(none, 0, "a reserved request is never preempted");
    // Each request's whole reservation is 4 blocks of the 12: three at a time.
    assert_eq!(peak_whole, 3);
    assert!(peak_on_demand > 3, "{peak_on_demand}");
}
