//! LoRA adapters and overlays against an independent reference: the numpy forward of
//! tests/reference with the adapter merged as PEFT's `merge_and_unload` does (or the overlay's
//! tensors put in place), for tiny random checkpoints of all four families and for SmolLM2; mixed
//! adapters in one batch; adapters trained on pruned checkpoints; `pruneserve merge`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use pruneserve::checkpoint::prune::prune_checkpoint;
use pruneserve::checkpoint::ModelDir;
use pruneserve::engine::adapters::LoraAdapter;
use pruneserve::engine::batch::GenRequest;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::RunSpec;
use pruneserve::plan::{LayerPlan, PlanSpec};
use serde_json::{json, Value};

fn reference(req: Value) -> Vec<Vec<f64>> {
    numpy_logprobs(&req)
}

fn load_adapter(dir: &Path, model: &pruneserve::engine::model::DecoderModel) -> Arc<LoraAdapter> {
    Arc::new(LoraAdapter::load(dir, model.config(), model.device(), model.dtype(), 64).unwrap())
}

fn spec(plan: &Arc<LayerPlan>, lora: Option<Arc<LoraAdapter>>) -> RunSpec {
    RunSpec {
        plan: plan.clone(),
        overlay: None,
        lora,
    }
}

fn worst(ours: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    ours.iter()
        .zip(want)
        .map(|(o, w)| max_abs_diff(o, w))
        .fold(0.0, f64::max)
}

#[test]
fn adapters_on_bases_and_plans_match_merged_weights_for_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = vec![pseudo_tokens(30, 300, 1), pseudo_tokens(12, 300, 2)];
    for (i, arch) in FAMILIES.iter().enumerate() {
        let cfg = tiny_config(arch);
        let dir = write_tiny(tmp.path(), arch, cfg.clone(), i as u64);
        let model = load_cpu(&dir);
        let adapter_dir = tmp.path().join(format!("{arch}-lora"));
        let adapter = AdapterSpec {
            r: 4,
            alpha: 8.0,
            rslora: i == 3,
            targets: &ALL_MODULES,
            rank_pattern: &[("k_proj", 2), ("down_proj", 6)],
            alpha_pattern: &[("o_proj", 3.0)],
            layers: 6,
            scale: 0.3,
            base_model: None,
        };
        write_adapter(&adapter_dir, &cfg, &adapter, 7 + i as u64);
        let lora = load_adapter(&adapter_dir, &model);
        assert_eq!(lora.info.r, 6);
        assert_eq!(lora.info.target_modules.len(), 7);

        let full = Arc::new(LayerPlan::full(6));
        let plain = score_all(&model, &full, &prompts);
        let ours = score_spec(&model, &spec(&full, Some(lora.clone())), &prompts);
        let want = reference(json!({"model": dir, "prompts": prompts, "adapter": adapter_dir}));
        assert!(
            worst(&ours, &want) < 1e-4,
            "{arch} base+adapter: {}",
            worst(&ours, &want)
        );
        let moved = worst(&plain, &want);
        assert!(
            moved > 1e-2,
            "{arch}: the adapter changes logprobs by only {moved}"
        );

        // The same adapter on a plan: only the layers the plan runs are adapted.
        let plan = Arc::new(PlanSpec::Drop(vec![1, 3].into()).resolve(6).unwrap());
        let ours = score_spec(&model, &spec(&plan, Some(lora)), &prompts);
        let want = reference(
            json!({"model": dir, "prompts": prompts, "adapter": adapter_dir,
                                    "layers": [0, 2, 4, 5]}),
        );
        assert!(
            worst(&ours, &want) < 1e-4,
            "{arch} plan+adapter: {}",
            worst(&ours, &want)
        );
    }
}

#[test]
fn an_adapter_trained_on_a_pruned_checkpoint_maps_through_its_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = "Qwen2ForCausalLM";
    let cfg = tiny_config(arch);
    let base = write_tiny(tmp.path(), "base", cfg.clone(), 5);
    let pruned = tmp.path().join("pruned");
    let spec_drop = PlanSpec::Drop(vec![1, 3].into());
    let kept =
        prune_checkpoint(&ModelDir::open(&base).unwrap(), "base", &spec_drop, &pruned).unwrap();
    assert_eq!(kept, vec![0, 2, 4, 5]);
    let adapter_dir = tmp.path().join("lora");
    let adapter = AdapterSpec {
        r: 8,
        alpha: 16.0,
        rslora: false,
        targets: &["q_proj", "v_proj", "down_proj"],
        rank_pattern: &[],
        alpha_pattern: &[],
        layers: 4,
        scale: 0.3,
        base_model: Some(&pruned),
    };
    write_adapter(&adapter_dir, &cfg, &adapter, 3);
    let model = load_cpu(&base);
    let lora = load_adapter(&adapter_dir, &model);
    assert_eq!(lora.info.trained_on_layers, Some(vec![0, 2, 4, 5]));
    assert_eq!(lora.info.layers, vec![0, 2, 4, 5]);
    let plan = Arc::new(spec_drop.resolve(6).unwrap());
    let prompts = vec![pseudo_tokens(25, 300, 4)];
    let ours = score_spec(&model, &spec(&plan, Some(lora.clone())), &prompts);
    // The reference runs the pruned checkpoint itself with the adapter's own layer numbers.
    let want = reference(json!({"model": pruned, "prompts": prompts, "adapter": adapter_dir}));
    assert!(worst(&ours, &want) < 1e-4, "{}", worst(&ours, &want));
    let other = PlanSpec::Drop(vec![4, 5].into()).resolve(6).unwrap();
    let err = lora.check_plan(&other).unwrap_err().to_string();
    assert!(err.contains("0,2,4-5") && err.contains("0-3"), "{err}");

    // `merge` into the pruned checkpoint gives the same numbers from plain weights.
    let merged = tmp.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args(["merge", "--model", pruned.to_str().unwrap(), "--adapter"])
        .args([adapter_dir.to_str().unwrap(), merged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("12 weights merged"));
    let m = load_cpu(&merged);
    let from_merged = score_all(&m, &Arc::new(LayerPlan::full(4)), &prompts);
    assert!(worst(&from_merged, &want) < 1e-4);
    assert!(ModelDir::open(&merged).unwrap().lineage.is_some());
}

#[test]
fn smollm2_with_a_rank_64_adapter_on_all_seven_projections_matches_numpy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = smollm2_dir();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let adapter_dir = tmp.path().join("lora64");
    let adapter = AdapterSpec {
        r: 64,
        alpha: 16.0,
        rslora: false,
        targets: &ALL_MODULES,
        rank_pattern: &[],
        alpha_pattern: &[],
        layers: 30,
        scale: 0.02,
        base_model: None,
    };
    write_adapter(&adapter_dir, &cfg, &adapter, 64);
    let model = load_cpu(&dir);
    let lora = load_adapter(&adapter_dir, &model);
    let prompts = vec![pseudo_tokens(20, 49152, 3), pseudo_tokens(9, 49152, 5)];
    let full = Arc::new(LayerPlan::full(30));
    let ours = score_spec(&model, &spec(&full, Some(lora.clone())), &prompts);
    let want = reference(json!({"model": dir, "prompts": prompts, "adapter": adapter_dir}));
    let d = worst(&ours, &want);
    println!("SmolLM2 + rank-64 adapter vs numpy merged: max |dlogprob| {d:.2e}");
    assert!(d < 1e-3, "{d}");
    let plain = score_all(&model, &full, &prompts);
    assert!(
        worst(&plain, &want) > 1e-2,
        "the adapter should change logprobs"
    );
    let rev = Arc::new(PlanSpec::Reverse(0.25).resolve(30).unwrap());
    let ours = score_spec(&model, &spec(&rev, Some(lora)), &prompts);
    let want = reference(
        json!({"model": dir, "prompts": prompts, "adapter": adapter_dir,
                                "layers": (0..22).collect::<Vec<_>>()}),
    );
    assert!(worst(&ours, &want) < 1e-3, "{}", worst(&ours, &want));
}

#[test]
fn an_overlay_equals_the_checkpoint_with_those_tensors_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, arch) in ["LlamaForCausalLM", "Gemma2ForCausalLM"].iter().enumerate() {
        let cfg = tiny_config(arch);
        let dir = write_tiny(tmp.path(), arch, cfg.clone(), 11 + i as u64);
        let donor = write_tiny(tmp.path(), &format!("{arch}-donor"), cfg.clone(), 99);
        // Tensors of layers 4 and 5, the final norm and (untied Llama) the LM head, taken from
        // another random checkpoint.
        let all =
            candle_core::safetensors::load(donor.join("model.safetensors"), &Device::Cpu).unwrap();
        let picked: std::collections::HashMap<String, Tensor> = all
            .into_iter()
            .filter(|(n, _)| {
                n.starts_with("model.layers.4.self_attn.q_proj")
                    || n.starts_with("model.layers.5.")
                    || n == "model.norm.weight"
                    || n == "lm_head.weight"
            })
            .collect();
        assert!(picked.len() >= 9, "{arch}: {:?}", picked.keys());
        let overlay_dir = tmp.path().join(format!("{arch}-overlay"));
        std::fs::create_dir_all(&overlay_dir).unwrap();
        candle_core::safetensors::save(&picked, overlay_dir.join("overlay.safetensors")).unwrap();

        let model = load_cpu(&dir);
        let overlay = Arc::new(model.load_overlay(&overlay_dir).unwrap());
        assert_eq!(overlay.info.tensors.len(), picked.len());
        let prompts = vec![pseudo_tokens(21, 300, 8)];
        let full = Arc::new(LayerPlan::full(6));
        let run = RunSpec {
            plan: full.clone(),
            overlay: Some(overlay),
            lora: None,
        };
        let ours = score_spec(&model, &run, &prompts);
        let want = reference(json!({"model": dir, "prompts": prompts, "overlay": overlay_dir}));
        assert!(
            worst(&ours, &want) < 1e-4,
            "{arch}: {}",
            worst(&ours, &want)
        );
        let plain = score_all(&model, &full, &prompts);
        assert!(
            worst(&plain, &want) > 1e-2,
            "{arch}: the overlay should change logprobs"
        );
    }
}

#[test]
fn mixed_adapters_in_one_batch_give_each_request_what_it_gets_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config("LlamaForCausalLM");
    let dir = write_tiny(tmp.path(), "m", cfg.clone(), 2);
    let model = load_cpu(&dir);
    let adapters: Vec<Arc<LoraAdapter>> = (0..3)
        .map(|k| {
            let d = tmp.path().join(format!("a{k}"));
            let targets: &[&str] = [&ALL_MODULES[..], &["q_proj", "o_proj"], &["up_proj"]][k];
            let spec = AdapterSpec {
                r: 2 + 2 * k,
                alpha: 8.0,
                rslora: false,
                targets,
                rank_pattern: &[],
                alpha_pattern: &[],
                layers: 6,
                scale: 0.4,
                base_model: None,
            };
            write_adapter(&d, &cfg, &spec, 20 + k as u64);
            load_adapter(&d, &model)
        })
        .collect();
    let full = Arc::new(LayerPlan::full(6));
    let request = |i: usize| GenRequest {
        lora: (i % 4 < 3).then(|| adapters[i % 4].clone()),
        prompt_logprobs: Some(1),
        ..gen_request(
            &full,
            pseudo_tokens(10 + 3 * i, 300, i),
            8,
            SamplingParams::greedy(),
            &[],
        )
    };
    let alone: Vec<_> = (0..8)
        .map(|i| batcher(&model).run_all(vec![request(i)]).remove(0).unwrap())
        .collect();
    let together = batcher(&model).run_all((0..8).map(request).collect());
    let mut distinct = std::collections::BTreeSet::new();
    for (i, (a, t)) in alone.iter().zip(together).enumerate() {
        let t = t.unwrap();
        let ids = |o: &pruneserve::engine::batch::GenOutput| {
            o.tokens.iter().map(|s| s.token).collect::<Vec<_>>()
        };
        assert_eq!(ids(a), ids(&t), "request {i}: greedy tokens");
        distinct.insert(ids(a));
        for (x, y) in a.prompt_scores.iter().zip(&t.prompt_scores) {
            assert!(
                (x.logprob - y.logprob).abs() < 1e-5,
                "request {i}: {} vs {}",
                x.logprob,
                y.logprob
            );
        }
        for (x, y) in a.tokens.iter().zip(&t.tokens) {
            assert!((x.logprob - y.logprob).abs() < 1e-5, "request {i}");
        }
    }
    // The adapters matter: the same prompt under each adapter gives different logprobs.
    let p = pseudo_tokens(16, 300, 77);
    let scores: Vec<Vec<f32>> = (0..4)
        .map(|k| {
            let s = spec(&full, adapters.get(k).cloned());
            score_spec(&model, &s, std::slice::from_ref(&p)).remove(0)
        })
        .collect();
    for a in 0..4 {
        for b in a + 1..4 {
            assert_ne!(scores[a], scores[b], "adapters {a} and {b}");
        }
    }
}
