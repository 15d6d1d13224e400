//! Prefix caching (`--enable-prefix-caching`) never shows in results: generation with the cache
//! equals generation without it (greedy and seeded tokens identical, logprobs within float
//! reordering) on the base, on a plan that runs the base's first layers (which reuses the base's
//! cached KV), on single-layer drops (which cannot), with a LoRA adapter (kept apart), when entries
//! are evicted mid-way and when sequences are preempted. Prompt logprobs come from the cache only
//! for the plan that computed them, and equal computed ones within float reordering. The server
//! counts queried and hit tokens under vLLM's names.

mod common;

use std::sync::Arc;

use common::server::ServerProc;
use common::*;
use pruneserve::engine::batch::{Batcher, GenOutput, GenRequest};
use pruneserve::engine::model::DecoderModel;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::{Engine, EngineOptions};
use pruneserve::plan::LayerPlan;
use serde_json::json;

/// Requests sharing a 70-token prefix (four whole blocks and a part), each with its own tail.
fn requests(plan: &Arc<LayerPlan>, n: usize, salt: usize) -> Vec<GenRequest> {
    let shared = pseudo_tokens(70, 300, 1);
    (0..n)
        .map(|i| {
            let mut prompt = shared.clone();
            prompt.extend(pseudo_tokens(3 + i, 300, salt + i));
            let sampling = if i % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    seed: Some(7 + i as u64),
                    ..SamplingParams::default()
                }
            };
            GenRequest {
                ignore_eos: true,
                ..gen_request(plan, prompt, 12, sampling, &[257])
            }
        })
        .collect()
}

/// Runs request groups one after another on one batcher (so later groups can hit what earlier
/// ones left); returns the outputs and the (queried, hit) token counts.
fn run(
    model: &Arc<DecoderModel>,
    caching: bool,
    blocks: usize,
    groups: Vec<Vec<GenRequest>>,
) -> (Vec<Vec<GenOutput>>, (u64, u64), u64) {
    let opts = EngineOptions {
        kv_blocks: blocks,
        prefix_caching: caching,
        ..EngineOptions::default()
    };
    let mut b = Batcher::new(Engine::with_contiguous_cache(model.clone(), &opts), 64);
    let outs = groups
        .into_iter()
        .map(|g| b.run_all(g).into_iter().map(|o| o.unwrap()).collect())
        .collect();
    (outs, b.prefix_counts(), b.num_preemptions())
}

fn assert_same(a: &[Vec<GenOutput>], b: &[Vec<GenOutput>], what: &str) {
    for (ga, gb) in a.iter().zip(b) {
        for (i, (x, y)) in ga.iter().zip(gb).enumerate() {
            let ids = |o: &GenOutput| o.tokens.iter().map(|s| s.token).collect::<Vec<_>>();
            assert_eq!(ids(x), ids(y), "{what}: request {i} tokens");
            for (s, t) in x.tokens.iter().zip(&y.tokens) {
                assert!(
                    (s.logprob - t.logprob).abs() < 1e-4,
                    "{what}: {} vs {}",
                    s.logprob,
                    t.logprob
                );
            }
            assert_eq!(x.prompt_scores.len(), y.prompt_scores.len());
            for (j, (s, t)) in x.prompt_scores.iter().zip(&y.prompt_scores).enumerate() {
                assert_eq!(s.token, t.token);
                assert!(
                    (s.logprob - t.logprob).abs() < 1e-4,
                    "{what}: request {i} prompt token {j}: {} vs {}",
                    s.logprob,
                    t.logprob
                );
                let ids = |s: &[(u32, f32)]| s.iter().map(|e| e.0).collect::<Vec<_>>();
                assert_eq!(
                    ids(&s.top),
                    ids(&t.top),
                    "{what}: top-k of prompt token {j}"
                );
            }
        }
    }
}

/// A tiny random 6-layer Llama (seeded) and three plans: the base, its first four layers (which
/// reuse the base's KV), and layer 2 dropped (which cannot).
fn model_and_plans(dir: &std::path::Path, seed: u64) -> (Arc<DecoderModel>, [Arc<LayerPlan>; 3]) {
    let model = load_cpu(&write_tiny(dir, "m", tiny_config("LlamaForCausalLM"), seed));
    let plans = [
        Arc::new(LayerPlan::full(6)),
        Arc::new(LayerPlan::new(vec![0, 1, 2, 3], 6).unwrap()),
        Arc::new(LayerPlan::new(vec![0, 1, 3, 4, 5], 6).unwrap()),
    ];
    (model, plans)
}

#[test]
fn hits_are_exact_across_plans_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, [base, first4, drop2]) = model_and_plans(tmp.path(), 5);
    let groups = || {
        vec![
            requests(&base, 1, 10),
            requests(&base, 4, 20),
            requests(&first4, 3, 30),
            requests(&drop2, 3, 40),
        ]
    };
    let (off, none, _) = run(&model, false, 4096, groups());
    let (on, (queries, hits), _) = run(&model, true, 4096, groups());
    assert_eq!(none, (0, 0));
    assert_same(&off, &on, "cache on vs off");
    // The base's four later requests and the first-four-layers plan reuse the 64 tokens of the
    // four whole shared blocks (or more); the plan with layer 2 dropped reuses nothing.
    println!("queried {queries} tokens, hit {hits}");
    assert!(hits >= 7 * 64, "{hits}");
    let (_, (_, drop_hits), _) = run(
        &model,
        true,
        4096,
        vec![requests(&base, 1, 10), requests(&drop2, 3, 40)],
    );
    assert_eq!(
        drop_hits, 0,
        "a plan that diverges at layer 2 cannot reuse the base's KV"
    );
}

#[test]
fn eviction_preemption_adapters_and_scoring_stay_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config("LlamaForCausalLM");
    let model = load_cpu(&write_tiny(tmp.path(), "m", cfg.clone(), 6));
    let base = Arc::new(LayerPlan::full(6));
    // A pool of 11 blocks: each request needs 6 at its end, cached prefixes compete for room, so
    // entries are evicted and sequences preempted.
    let groups = || {
        vec![
            requests(&base, 2, 50),
            requests(&base, 5, 60),
            requests(&base, 3, 70),
        ]
    };
    let (off, _, _) = run(&model, false, 4096, groups());
    let (tight, (_, hits), preemptions) = run(&model, true, 11, groups());
    assert_same(&off, &tight, "small pool");
    println!("11-block pool: {hits} tokens hit, {preemptions} preemptions");
    assert!(hits > 0 && preemptions > 0);

    // An adapter's KV is its own: the same prompts with and without it never share entries.
    let adir = tmp.path().join("adapter");
    let spec = AdapterSpec {
        r: 4,
        alpha: 8.0,
        rslora: false,
        targets: &ALL_MODULES,
        rank_pattern: &[],
        alpha_pattern: &[],
        layers: 6,
        scale: 0.3,
        base_model: None,
    };
    write_adapter(&adir, &cfg, &spec, 3);
    let lora = Arc::new(
        pruneserve::engine::adapters::LoraAdapter::load(
            &adir,
            model.config(),
            model.device(),
            model.dtype(),
            64,
        )
        .unwrap(),
    );
    let with_lora = |reqs: Vec<GenRequest>| {
        reqs.into_iter()
            .map(|r| GenRequest {
                lora: Some(lora.clone()),
                ..r
            })
            .collect::<Vec<_>>()
    };
    let mixed = || {
        vec![
            requests(&base, 2, 80),
            with_lora(requests(&base, 2, 90)),
            with_lora(requests(&base, 2, 95)),
        ]
    };
    let (off, _, _) = run(&model, false, 4096, mixed());
    let (on, (_, hits), _) = run(&model, true, 4096, mixed());
    assert_same(&off, &on, "adapter");
    assert!(hits > 0, "the second adapter group reuses the first's");
}

/// `reqs` scoring their prompts with top-`k`.
fn scoring(reqs: Vec<GenRequest>, k: usize) -> Vec<GenRequest> {
    reqs.into_iter()
        .map(|r| GenRequest {
            prompt_logprobs: Some(k),
            ..r
        })
        .collect()
}

#[test]
fn scoring_reuses_prompt_logprobs_of_its_own_plan_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, [base, first4, drop2]) = model_and_plans(tmp.path(), 8);
    // Each plan scores once, then again with other tails; then base top-3 after top-2.
    let groups = || {
        let mut g = Vec::new();
        for (plan, salt) in [(&base, 100), (&first4, 200), (&drop2, 300)] {
            g.push(scoring(requests(plan, 1, salt), 2));
            g.push(scoring(requests(plan, 3, salt + 10), 2));
        }
        g.push(scoring(requests(&base, 2, 400), 3));
        g
    };
    let (off, _, _) = run(&model, false, 4096, groups());
    let (on, (_, hits), _) = run(&model, true, 4096, groups());
    assert_same(&off, &on, "scoring, cache on vs off");
    assert!(on.iter().flatten().all(|o| o.prompt_scores.len() > 70));
    // Per plan, the second group's three requests reuse the first's 64 scored tokens.
    println!("scoring: {hits} tokens hit");
    assert!(hits >= 3 * 3 * 64, "{hits}");

    // No scores from another plan (first4 runs the base's first layers, but its logprobs are
    // its own), nor top-3 from a top-2 memo.
    for later in [
        scoring(requests(&first4, 2, 500), 2),
        scoring(requests(&base, 2, 510), 3),
    ] {
        let (_, (_, hits), _) = run(
            &model,
            true,
            4096,
            vec![scoring(requests(&base, 1, 100), 2), later],
        );
        assert_eq!(hits, 0);
    }

    // A pool too small for the entries: they are evicted mid-way, sequences preempted, and the
    // scores are still the computed ones.
    let (tight, (_, hits), preemptions) = run(&model, true, 11, groups());
    assert_same(&off, &tight, "scoring, small pool");
    println!("scoring, 11-block pool: {hits} tokens hit, {preemptions} preemptions");
    assert!(preemptions > 0);
}

#[test]
fn the_server_counts_prefix_cache_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(tmp.path(), "m", tiny_config("LlamaForCausalLM"), 7);
    let s = ServerProc::start(&["--model", dir.to_str().unwrap(), "--enable-prefix-caching"]);
    let prompt = pseudo_tokens(100, 300, 3);
    let body = json!({"model": "m", "prompt": [prompt], "max_tokens": 4, "temperature": 0});
    let (status, first) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{first}");
    let (_, second) = s.post("/v1/completions", &body.to_string());
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
    let queries = s.metric("pruneserve:prefix_cache_queries_total{").unwrap();
    let hits = s.metric("pruneserve:prefix_cache_hits_total{").unwrap();
    assert_eq!(
        (queries, hits),
        (200.0, 96.0),
        "the second request reuses 6 whole blocks"
    );
    assert_eq!(s.metric("pruneserve:prefix_cache_blocks{"), Some(6.0));
    assert_eq!(s.metric("pruneserve:prefix_cache_memo_bytes{"), Some(0.0));

    // Echo scoring (lm-eval's loglikelihood request): the second one takes the first one's
    // prompt logprobs from the cache.
    let other = pseudo_tokens(100, 300, 4);
    let score = json!({"model": "m", "prompt": [other], "max_tokens": 0, "echo": true,
        "logprobs": 2, "temperature": 0});
    let (status, first) = s.post("/v1/completions", &score.to_string());
    assert_eq!(status, 200, "{first}");
    let (_, second) = s.post("/v1/completions", &score.to_string());
    let lp = |v: &serde_json::Value| v["choices"][0]["logprobs"].clone();
    let (a, b) = (lp(&first), lp(&second));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["top_logprobs"].as_array().unwrap().len(), 100);
    for (x, y) in a["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["token_logprobs"].as_array().unwrap())
        .skip(1)
    {
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4);
    }
    let hits = s.metric("pruneserve:prefix_cache_hits_total{").unwrap();
    assert_eq!(
        hits,
        96.0 + 96.0,
        "the second scoring request reused 6 blocks"
    );
    assert!(s.metric("pruneserve:prefix_cache_memo_bytes{").unwrap() > 0.0);
}

/// Runs `reqs` together on one batcher with a step budget of `step_tokens`, with or without
/// prefix caching (and so shared hidden states); returns the outputs and the rows × layers shared.
fn run_in_one_batch(
    model: &Arc<DecoderModel>,
    sharing: bool,
    step_tokens: usize,
    reqs: Vec<GenRequest>,
) -> (Vec<GenOutput>, u64) {
    let opts = EngineOptions {
        kv_blocks: 4096,
        prefix_caching: sharing,
        ..EngineOptions::default()
    };
    let mut b = Batcher::new(
        Engine::with_contiguous_cache(model.clone(), &opts),
        step_tokens,
    );
    let outs = b.run_all(reqs).into_iter().map(|o| o.unwrap()).collect();
    (outs, b.engine().shared_layer_rows())
}

#[test]
fn plans_feeding_the_same_fresh_prompt_in_one_step_run_their_common_layers_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, [base, first4, drop2]) = model_and_plans(tmp.path(), 9);
    // Four prompts, each scored on the base, its first four layers and layer 2 dropped, and
    // generated from on the first four layers, all in one step (a budget for every prompt).
    let batch = || {
        let mut reqs = Vec::new();
        for p in 0..4 {
            let one = |plan: &Arc<LayerPlan>| requests(plan, 1, 600 + p).remove(0);
            for plan in [&base, &first4, &drop2] {
                reqs.push(GenRequest {
                    prompt_logprobs: Some(3),
                    ..one(plan)
                });
            }
            reqs.push(one(&first4));
        }
        reqs
    };
    let run_one = |sharing: bool| run_in_one_batch(&model, sharing, 4096, batch());
    let (alone, none) = run_one(false);
    let (shared, rows) = run_one(true);
    assert_eq!(none, 0);
    assert_same(&[alone], &[shared], "shared hidden states");
    // Per 73-token prompt: the first-four-layers scoring and generation requests take 4 layers
    // from the base's rows, the layer-2-dropped one 2 layers.
    assert_eq!(rows, 4 * 73 * (4 + 4 + 2));
}

#[test]
fn a_single_layer_sweep_forks_every_plan_from_the_one_sharing_most() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = model_and_plans(tmp.path(), 11);
    // `@drop=1` .. `@drop=5` of the 6-layer model score one prompt in one step.
    let plans: Vec<Arc<LayerPlan>> = (1..6)
        .map(|d| Arc::new(LayerPlan::new((0..6).filter(|&l| l != d).collect(), 6).unwrap()))
        .collect();
    let batch = || {
        plans
            .iter()
            .map(|plan| GenRequest {
                prompt_logprobs: Some(1),
                ..requests(plan, 1, 800).remove(0)
            })
            .collect::<Vec<_>>()
    };
    let (alone, _) = run_in_one_batch(&model, false, 4096, batch());
    let (shared, rows) = run_in_one_batch(&model, true, 4096, batch());
    assert_same(&[alone], &[shared], "the sweep's plans sharing");
    // `@drop=5` runs whole; `@drop=i` takes its first i layers from it: 4 + 3 + 2 + 1 per token
    // (one trunk for all, the most any single trunk gives).
    assert_eq!(rows, 73 * (4 + 3 + 2 + 1));
}

#[test]
fn a_prompt_and_its_twins_on_other_plans_are_scheduled_into_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, [base, first4, _]) = model_and_plans(tmp.path(), 10);
    // Pairs (base, first four layers) of 73-token prompts; a step budget of 160 tokens holds one
    // pair whole and would split the next one (a chunk of 14) if pairs were not kept together.
    let batch = || {
        (0..4)
            .flat_map(|p| {
                [&base, &first4].map(|plan| GenRequest {
                    prompt_logprobs: Some(1),
                    ..requests(plan, 1, 700 + p).remove(0)
                })
            })
            .collect::<Vec<_>>()
    };
    let run_one = |sharing: bool| run_in_one_batch(&model, sharing, 160, batch());
    let (alone, _) = run_one(false);
    let (shared, rows) = run_one(true);
    assert_same(&[alone], &[shared], "twins scheduled together");
    assert_eq!(rows, 4 * 73 * 4, "every pair met in one step");
}
