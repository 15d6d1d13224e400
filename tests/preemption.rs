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

fn run(
    model: &Arc<pruneserve::engine::model::DecoderModel>,
    blocks: usize,
    reqs: Vec<GenRequest>,
) -> (Vec<GenOutput>, u64) {
    let opts = EngineOptions {
        kv_blocks: blocks,
        ..EngineOptions::default()
    };
    let mut b = Batcher::new(Engine::with_contiguous_cache(model.clone(), &opts), 64);
    let outs = b.run_all(reqs).into_iter().map(|o| o.unwrap()).collect();
    (outs, b.num_preemptions())
}

#[test]
fn a_small_pool_preempts_and_every_request_ends_as_it_would_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(tmp.path(), "m", tiny_config("LlamaForCausalLM"), 4);
    let model = load_cpu(&dir);
    let plan = Arc::new(LayerPlan::full(6));
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
