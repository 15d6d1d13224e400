//! Layer plans over shared weights against pruned checkpoints on disk, and the layer taps.

mod common;

use std::sync::Arc;

use common::*;
use pruneserve::checkpoint::prune::prune_checkpoint;
use pruneserve::checkpoint::ModelDir;
use pruneserve::engine::instrument::taps::{BlockInfluence, LayerTap};
use pruneserve::engine::{Engine, EngineOptions, StepItem};
use pruneserve::plan::{LayerPlan, PlanSpec};
use serde_json::json;

/// Last-position logits of `prompt` under `plan`.
fn last_logits(
    model: &Arc<pruneserve::engine::model::DecoderModel>,
    plan: LayerPlan,
    prompt: &[u32],
) -> Vec<f32> {
    let mut engine = Engine::with_contiguous_cache(model.clone(), &EngineOptions::default());
    engine.add_sequence(1, Arc::new(plan)).unwrap();
    let item = StepItem {
        seq: 1,
        tokens: prompt.to_vec(),
        score: None,
        want_logits: true,
        greedy_top: None,
        draw: None,
    };
    engine.step(&[item]).pop().unwrap().unwrap().logits.unwrap()
}

#[test]
fn a_plan_equals_the_pruned_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["LlamaForCausalLM", "Gemma2ForCausalLM"] {
        let base_dir = write_tiny(tmp.path(), arch, tiny_config(arch), 3);
        let base = ModelDir::open(&base_dir).unwrap();
        // Dropping layer 1 keeps Gemma2 layers 0,2,3,4,5: sliding, sliding, full, sliding, full,
        // not the first-5 pattern, so the checkpoint must carry `layer_types`.
        let spec = PlanSpec::Drop(vec![1].into());
        let out = tmp.path().join(format!("{arch}-pruned"));
        let kept = prune_checkpoint(&base, "tiny-base", &spec, &out).unwrap();
        assert_eq!(kept, vec![0, 2, 3, 4, 5]);
        let pruned = ModelDir::open(&out).unwrap();
        assert_eq!(pruned.config.num_hidden_layers, 5);
        let lineage = pruned.lineage.clone().unwrap();
        assert_eq!(
            (lineage.kept_layers, lineage.dropped_layers),
            (vec![0, 2, 3, 4, 5], vec![1])
        );
        let kinds_base: Vec<_> = kept
            .iter()
            .map(|&i| base.config.layer_attention[i])
            .collect();
        assert_eq!(
            pruned.config.layer_attention, kinds_base,
            "{arch}: attention kinds follow the kept layers"
        );

        let prompt = pseudo_tokens(24, 300, 7);
        let via_plan = last_logits(&load_cpu(&base_dir), spec.resolve(6).unwrap(), &prompt);
        let via_disk = last_logits(&load_cpu(&out), LayerPlan::full(5), &prompt);
        assert_eq!(
            via_plan, via_disk,
            "{arch}: plan and pruned checkpoint differ"
        );
        let full = last_logits(&load_cpu(&base_dir), LayerPlan::full(6), &prompt);
        assert_ne!(full, via_plan, "{arch}: dropping layers changed nothing");
    }
}

#[test]
fn gemma2_prune_writes_layer_types_of_kept_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = write_tiny(tmp.path(), "g", tiny_config("Gemma2ForCausalLM"), 1);
    let base = ModelDir::open(&base_dir).unwrap();
    let out = tmp.path().join("g-pruned");
    prune_checkpoint(&base, "g", &PlanSpec::Keep(vec![1, 2, 3].into()), &out).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["layer_types"],
        json!(["full_attention", "sliding_attention", "full_attention"])
    );
}

/// Records which base layers ran and checks that each layer's input is the previous output.
struct Recorder {
    order: Vec<usize>,
    last_output: Option<Vec<f32>>,
}

impl LayerTap for Recorder {
    fn observe(
        &mut self,
        layer: usize,
        input: &candle_core::Tensor,
        output: &candle_core::Tensor,
    ) -> candle_core::Result<()> {
        let input: Vec<f32> = input.flatten_all()?.to_vec1()?;
        if let Some(prev) = &self.last_output {
            assert_eq!(prev, &input);
        }
        self.last_output = Some(output.flatten_all()?.to_vec1()?);
        self.order.push(layer);
        Ok(())
    }
}

#[test]
fn taps_see_the_plan_in_order_and_block_influence_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = load_cpu(&write_tiny(
        tmp.path(),
        "l",
        tiny_config("LlamaForCausalLM"),
        2,
    ));
    let mut engine = Engine::with_contiguous_cache(model.clone(), &EngineOptions::default());
    let plan = Arc::new(LayerPlan::new(vec![5, 0, 3], 6).unwrap());
    engine.add_sequence(1, plan).unwrap();
    let item = StepItem {
        seq: 1,
        tokens: pseudo_tokens(10, 300, 1),
        score: None,
        want_logits: false,
        greedy_top: None,
        draw: None,
    };
    let mut rec = Recorder {
        order: vec![],
        last_output: None,
    };
    engine
        .step_with_tap(std::slice::from_ref(&item), Some(&mut rec))
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(rec.order, vec![5, 0, 3]);

    let mut engine = Engine::with_contiguous_cache(model, &EngineOptions::default());
    engine
        .add_sequence(1, Arc::new(LayerPlan::full(6)))
        .unwrap();
    let mut bi = BlockInfluence::new(6);
    engine
        .step_with_tap(&[item], Some(&mut bi))
        .pop()
        .unwrap()
        .unwrap();
    bi.end_prompt();
    for s in bi.scores() {
        let s = s.unwrap();
        assert!(s > 0.0 && s < 2.0, "BI {s}");
    }
}
