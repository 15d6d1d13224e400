//! The precision rule of bf16 weights (the CUDA engine's path, computed on CPU with the same
//! rounding): the rows of scored prompts (prompt logprobs asked) carry f32 activations into
//! every projection as two bf16 terms, so a one-step prefill scores like the f32 engine on the
//! same (bf16-exact) weights; generation prompts and decode steps round activations to bf16
//! once (one GEMM per projection), whatever else shares their step.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use pruneserve::checkpoint::random_init::init_random;
use pruneserve::checkpoint::ModelDir;
use pruneserve::engine::batch::Batcher;
use pruneserve::engine::model::DecoderModel;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::{Engine, EngineOptions};
use pruneserve::plan::LayerPlan;

#[test]
fn bf16_weights_prefill_like_f32_and_decode_rounds_activations() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in FAMILIES {
        let dir = tmp.path().join(arch);
        // bf16 weights: the f32 engine loads exactly the same values.
        init_random(tiny_config(arch), None, DType::BF16, 3, &dir).unwrap();
        let md = ModelDir::open(&dir).unwrap();
        let load = |dt| Arc::new(DecoderModel::load(&md, &Device::Cpu, dt).unwrap());
        let (f32m, bf16m) = (load(DType::F32), load(DType::BF16));
        let plan = Arc::new(LayerPlan::full(6));
        let prompts: Vec<Vec<u32>> = (0..3).map(|s| pseudo_tokens(20 + 15 * s, 300, s)).collect();
        let (want, got) = (
            score_all(&f32m, &plan, &prompts),
            score_all(&bf16m, &plan, &prompts),
        );
        let prefill = want
            .iter()
            .zip(&got)
            .map(|(w, g)| max_abs_diff(g, &w.iter().map(|&x| x as f64).collect::<Vec<_>>()))
            .fold(0.0, f64::max);
        // Generated tokens come from decode-only steps: bf16 activations.
        let generated = |m: &Arc<DecoderModel>| {
            let req = gen_request(&plan, prompts[2].clone(), 8, SamplingParams::greedy(), &[]);
            let out = batcher(m).run_all(vec![req]).remove(0).unwrap();
            out.tokens.iter().map(|t| t.logprob).collect::<Vec<f32>>()
        };
        let (gw, gb) = (generated(&f32m), generated(&bf16m));
        let decode = gw
            .iter()
            .zip(&gb)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{arch}: prompt {prefill:.2e}, generated {decode:.2e}");
        assert!(prefill < 2e-4, "{arch}: prefill differs by {prefill}");
        assert!(
            decode > 10.0 * prefill as f32 && decode < 0.1,
            "{arch}: decode differs by {decode}"
        );
    }
}

/// Exactness is paid for only where it is asked: a generation prompt's rows take rounded inputs
/// (its first token's logprob moves away from the f32 engine's, as a decode step's does) while
/// a scored prompt stays within 2e-4 of f32; and each request gets the same numbers alone as in
/// one step with a request of the other kind.
#[test]
fn bf16_weights_compensate_scored_prompts_only_whatever_shares_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [FAMILIES[0], FAMILIES[3]] {
        let dir = tmp.path().join(arch);
        init_random(tiny_config(arch), None, DType::BF16, 5, &dir).unwrap();
        let md = ModelDir::open(&dir).unwrap();
        let load = |dt| Arc::new(DecoderModel::load(&md, &Device::Cpu, dt).unwrap());
        let (f32m, bf16m) = (load(DType::F32), load(DType::BF16));
        let plan = Arc::new(LayerPlan::full(6));
        let generation = gen_request(
            &plan,
            pseudo_tokens(40, 300, 1),
            6,
            SamplingParams::greedy(),
            &[],
        );
        let scored = score_request(&plan, pseudo_tokens(50, 300, 2));
        let run = |m: &Arc<DecoderModel>, reqs: Vec<_>| -> Vec<_> {
            batcher(m)
                .run_all(reqs)
                .into_iter()
                .map(|r| r.unwrap())
                .collect()
        };
        let gen_logprobs = |o: &pruneserve::engine::batch::GenOutput| {
            o.tokens.iter().map(|t| t.logprob).collect::<Vec<f32>>()
        };
        let score_logprobs = |o: &pruneserve::engine::batch::GenOutput| {
            o.prompt_scores
                .iter()
                .map(|t| t.logprob)
                .collect::<Vec<f32>>()
        };
        let gen_alone = run(&bf16m, vec![generation.clone()]).remove(0);
        let scored_alone = run(&bf16m, vec![scored.clone()]).remove(0);
        let together = run(&bf16m, vec![generation.clone(), scored.clone()]);
        assert!(together[0].tokens.len() == 6 && gen_alone.tokens.len() == 6);
        let same = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let tok = |o: &pruneserve::engine::batch::GenOutput| {
            o.tokens.iter().map(|t| t.token).collect::<Vec<u32>>()
        };
        assert_eq!(tok(&together[0]), tok(&gen_alone), "{arch}: tokens");
        let d_gen = same(&gen_logprobs(&together[0]), &gen_logprobs(&gen_alone));
        let d_scored = same(
            &score_logprobs(&together[1]),
            &score_logprobs(&scored_alone),
        );
        // The f32 engine on the same weights: the reference of the precision contract.
        let reference = run(&f32m, vec![generation, scored]);
        let scored_err = same(
            &score_logprobs(&together[1]),
            &score_logprobs(&reference[1]),
        );
        let first_token_err =
            (together[0].tokens[0].logprob - reference[0].tokens[0].logprob).abs();
        println!(
            "{arch}: alone vs together gen {d_gen:.1e} scored {d_scored:.1e}; vs f32 scored \
             {scored_err:.1e}, generation prompt {first_token_err:.1e}"
        );
        assert!(
            d_gen < 1e-5 && d_scored < 1e-5,
            "{arch}: batch composition moved results"
        );
        assert!(
            scored_err < 2e-4,
            "{arch}: scored prompt off f32 by {scored_err}"
        );
        assert!(
            first_token_err > 10.0 * scored_err && first_token_err < 0.1,
            "{arch}: the generation prompt should be rounded: {first_token_err:e}"
        );
    }
}

/// A scored prompt that a step could run whole is not split to fill another step (its rest
/// would attend to the bf16 cache instead of its own f32 keys): beside a generation prompt that
/// leaves too little room, it waits a step and scores exactly as alone.
#[test]
fn bf16_weights_scored_prompts_that_fit_a_step_are_not_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init_random(tiny_config(FAMILIES[0]), None, DType::BF16, 9, &dir).unwrap();
    let md = ModelDir::open(&dir).unwrap();
    let model = Arc::new(DecoderModel::load(&md, &Device::Cpu, DType::BF16).unwrap());
    let plan = Arc::new(LayerPlan::full(6));
    let scored = score_request(&plan, pseudo_tokens(100, 300, 4));
    let generation = gen_request(
        &plan,
        pseudo_tokens(60, 300, 5),
        4,
        SamplingParams::greedy(),
        &[],
    );
    let logprobs = |reqs: Vec<_>, budget: usize| -> Vec<f32> {
        let engine = Engine::with_contiguous_cache(model.clone(), &EngineOptions::default());
        let outs = Batcher::new(engine, budget).run_all(reqs);
        let scored = outs.into_iter().last().unwrap().unwrap();
        scored.prompt_scores.iter().map(|s| s.logprob).collect()
    };
    let alone = logprobs(vec![scored.clone()], 4096);
    // 60 generation tokens first leave 68 of 128: the 100-token prompt waits for the next step.
    let beside = logprobs(vec![generation, scored.clone()], 128);
    let d = alone
        .iter()
        .zip(&beside)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(alone.len(), 99);
    assert!(d < 1e-6, "the scored prompt was split: {d:e}");
    // A prompt longer than a step is still split, and then differs by the bf16 history.
    let split = logprobs(vec![scored], 64);
    let d_split = alone
        .iter()
        .zip(&split)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("beside a generation prompt {d:.1e}, split in 64-token chunks {d_split:.1e}");
    assert!(
        d_split > 1e-4,
        "a split prompt should attend to the rounded history"
    );
}
