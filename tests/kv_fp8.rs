//! `--kv-cache-dtype fp8` on the CPU engine (the reference the CUDA pool is checked against by
//! `selftest --device cuda`): scores of all four families against the numpy reference with its
//! keys and values rounded to E4M3 by its own code, and the property that makes the rounding
//! invisible to everything but precision: a prompt prefilled in one step, in chunks that read
//! their history from the cache, or reused from the prefix cache, and the tokens decoded from
//! it, all see the same rounded keys and values.

mod common;

use std::sync::Arc;

use common::*;
use pruneserve::engine::batch::{Batcher, GenOutput};
use pruneserve::engine::kv::fp8::KvCacheDtype;
use pruneserve::engine::model::DecoderModel;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::{Engine, EngineOptions};
use pruneserve::plan::LayerPlan;
use serde_json::json;

fn reference(dir: &std::path::Path, prompts: &[Vec<u32>], kv_fp8: bool) -> Vec<Vec<f64>> {
    numpy_logprobs(&json!({"model": dir, "prompts": prompts, "kv_fp8": kv_fp8}))
}

fn fp8_batcher(model: &Arc<DecoderModel>, step_tokens: usize, prefix_caching: bool) -> Batcher {
    let opts = EngineOptions {
        kv_cache_dtype: KvCacheDtype::Fp8,
        prefix_caching,
        ..EngineOptions::default()
    };
    Batcher::new(
        Engine::with_contiguous_cache(model.clone(), &opts),
        step_tokens,
    )
}

fn prompt_logprobs(outs: Vec<Result<GenOutput, impl std::fmt::Debug>>) -> Vec<Vec<f32>> {
    outs.into_iter()
        .map(|o| o.unwrap().prompt_scores.iter().map(|s| s.logprob).collect())
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn every_family_matches_the_reference_with_fp8_keys_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = vec![pseudo_tokens(40, 300, 1), pseudo_tokens(17, 300, 2)];
    for family in tiny_families(tmp.path()) {
        let (arch, dir, model, plan) = (family.arch, family.dir, family.model, family.full);
        let reqs = prompts
            .iter()
            .map(|p| score_request(&plan, p.clone()))
            .collect();
        let ours = prompt_logprobs(fp8_batcher(&model, 4096, false).run_all(reqs));
        let (want, unrounded) = (
            reference(&dir, &prompts, true),
            reference(&dir, &prompts, false),
        );
        let (mut d, mut rounding) = (0f64, 0f64);
        for ((o, w), u) in ours.iter().zip(&want).zip(&unrounded) {
            d = d.max(max_abs_diff(o, w));
            rounding = rounding.max(max_abs_diff(o, u));
        }
        assert!(
            d < 1e-4,
            "{arch}: max abs logprob diff {d} from the fp8 reference"
        );
        // The rounding must show against the unrounded reference, or the agreement above
        // would not prove it is applied.
        assert!(
            rounding > 1e3 * d.max(1e-7) && rounding > 1e-4,
            "{arch}: fp8 moves logprobs by only {rounding} (agreement {d})"
        );
    }
}

#[test]
fn chunks_prefix_hits_and_decoding_see_the_same_rounded_values() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = "LlamaForCausalLM";
    let dir = write_tiny(tmp.path(), "llama", tiny_config(arch), 5);
    let model = load_cpu(&dir);
    let plan = Arc::new(LayerPlan::full(model.config().num_hidden_layers));
    let prompts = vec![pseudo_tokens(70, 300, 3), pseudo_tokens(45, 300, 4)];
    let score = |b: &mut Batcher, prompts: &[Vec<u32>]| {
        let reqs = prompts
            .iter()
            .map(|p| score_request(&plan, p.clone()))
            .collect();
        prompt_logprobs(b.run_all(reqs))
    };
    let one_step = score(&mut fp8_batcher(&model, 4096, false), &prompts);
    // 16-token steps: every chunk after the first attends to rounded keys read from the cache.
    let chunked = score(&mut fp8_batcher(&model, 16, false), &prompts);
    let d = max_diff(&one_step, &chunked);
    assert!(d < 1e-5, "chunked prefill differs by {d}");
    // The same prompts again on a prefix-caching engine: the second pass reuses the first's KV.
    let mut caching = fp8_batcher(&model, 4096, true);
    let _ = score(&mut caching, &prompts);
    let longer: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| [p.as_slice(), &[7, 8, 9]].concat())
        .collect();
    let hit = score(&mut caching, &longer);
    let (_, hits) = caching.engine().prefix_counts();
    assert!(
        hits >= 96,
        "the longer prompts must reuse the cached blocks ({hits} tokens hit)"
    );
    let miss = score(&mut fp8_batcher(&model, 4096, false), &longer);
    let d = max_diff(&hit, &miss);
    assert!(d < 1e-5, "prefix-cache hit differs by {d}");

    // Greedy decoding, then the prompt and its answer scored in one step: each generated
    // token's logprob equals its score (decode steps read the keys the scoring step rounds).
    let reqs = prompts
        .iter()
        .map(|p| gen_request(&plan, p.clone(), 12, SamplingParams::greedy(), &[]))
        .collect();
    let outs: Vec<GenOutput> = fp8_batcher(&model, 4096, false)
        .run_all(reqs)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (p, o) in prompts.iter().zip(&outs) {
        assert_eq!(o.tokens.len(), 12);
        let full: Vec<u32> = p
            .iter()
            .copied()
            .chain(o.tokens.iter().map(|t| t.token))
            .collect();
        let scored = &score(&mut fp8_batcher(&model, 4096, false), &[full])[0][p.len() - 1..];
        let decoded: Vec<f32> = o.tokens.iter().map(|t| t.logprob).collect();
        let d = max_diff(&[decoded], &[scored.to_vec()]);
        assert!(d < 1e-4, "decoded logprobs differ from scoring by {d}");
    }
}

#[test]
fn the_server_serves_an_fp8_cache_and_refuses_other_fp8_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(tmp.path(), "llama", tiny_config("LlamaForCausalLM"), 6);
    let model = load_cpu(&dir);
    let plan = Arc::new(LayerPlan::full(model.config().num_hidden_layers));
    let prompt = pseudo_tokens(30, 300, 7);
    let want = prompt_logprobs(
        fp8_batcher(&model, 4096, false).run_all(vec![score_request(&plan, prompt.clone())]),
    );
    let plain = score_all(&model, &plan, std::slice::from_ref(&prompt));
    let model_dir = dir.to_str().unwrap();
    let server = common::server::ServerProc::start(&[
        "--model",
        model_dir,
        "--served-model-name",
        "tiny",
        "--kv-cache-dtype",
        "fp8",
    ]);
    let got = server.echo_logprobs("tiny", &prompt);
    assert!(
        max_diff(std::slice::from_ref(&got), &want) < 1e-5,
        "{got:?} vs {want:?}"
    );
    assert!(
        max_diff(&[got], &plain) > 1e-4,
        "the server did not round its cache"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args([
            "serve",
            "--model",
            model_dir,
            "--kv-cache-dtype",
            "fp8_e5m2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fp8_e5m2") && err.contains("possible values: auto, fp8"),
        "{err}"
    );
}
