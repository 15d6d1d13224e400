//! The precision rule of bf16 weights (the CUDA engine's path, computed on CPU with the same
//! rounding): steps with prompt rows carry f32 activations into every projection as two bf16
//! terms, so a one-step prefill scores like the f32 engine on the same (bf16-exact) weights;
//! decode-only steps round activations to bf16 once.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use pruneserve::checkpoint::random_init::init_random;
use pruneserve::checkpoint::ModelDir;
use pruneserve::engine::model::DecoderModel;
use pruneserve::engine::sample::sampler::SamplingParams;
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
