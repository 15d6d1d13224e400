//! What one step carries under `capping_prefill_while_decoding`, read from the step plan of a
//! tiny random Llama on the CPU: prompt tokens beside decoding rows stay within the cap, a step
//! without decoding rows takes the whole budget, a scored bf16 prompt that would otherwise wait
//! for an uncapped step runs whole as the step's first prompt, and capped runs finish with the
//! tokens of uncapped ones. Its tiny model, request and batcher helpers serve warm_up.rs's test too.

use std::sync::Arc;

use candle_core::{DType, Device};
use serde_json::json;

use super::{Batcher, GenRequest, StepItem};
use crate::checkpoint::random_init::init_random;
use crate::checkpoint::ModelDir;
use crate::engine::sample::sampler::SamplingParams;
use crate::engine::{DecoderModel, Engine, EngineOptions};
use crate::plan::LayerPlan;

pub(super) fn tiny(dtype: DType) -> (tempfile::TempDir, Arc<DecoderModel>) {
    let root = tempfile::tempdir().unwrap();
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    init_random(cfg, None, DType::BF16, 3, root.path()).unwrap();
    let dir = ModelDir::open(root.path()).unwrap();
    let model = Arc::new(DecoderModel::load(&dir, &Device::Cpu, dtype).unwrap());
    (root, model)
}

pub(super) fn request(
    model: &DecoderModel,
    len: usize,
    max_tokens: usize,
    scored: bool,
) -> GenRequest {
    GenRequest {
        plan: Arc::new(LayerPlan::full(model.config().num_hidden_layers)),
        overlay: None,
        lora: None,
        prompt: (0..len).map(|i| (i * 7 % 250) as u32).collect(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        prompt_logprobs: scored.then_some(0),
        stop_token_ids: vec![],
        eos_token_ids: vec![],
        ignore_eos: true,
    }
}

pub(super) fn batcher(model: &Arc<DecoderModel>, step: usize, cap: usize) -> Batcher {
    let engine = Engine::with_contiguous_cache(model.clone(), &EngineOptions::default());
    Batcher::new(engine, step).capping_prefill_while_decoding(cap)
}

/// (decode rows, prompt tokens) of the next step's plan.
fn next_plan(b: &mut Batcher) -> (usize, Vec<usize>) {
    b.admit_waiting(&mut Vec::new());
    let items: Vec<StepItem> = b.plan_step();
    let decode = items
        .iter()
        .filter(|it| it.tokens.len() == 1 && b.active[&it.seq].unfed() == 0)
        .count();
    let prompts = items
        .iter()
        .skip(decode)
        .map(|it| it.tokens.len())
        .collect();
    (decode, prompts)
}

#[test]
fn prompt_tokens_beside_decoding_rows_stay_within_the_cap() {
    let (_dir, model) = tiny(DType::F32);
    let mut b = batcher(&model, 256, 32);
    // Alone, a long prompt takes the whole step budget.
    b.submit(request(&model, 300, 4, false)).unwrap();
    assert_eq!(next_plan(&mut b), (0, vec![256]));
    b.step();
    b.step(); // the prompt's last 44 tokens and its first token
    b.submit(request(&model, 200, 2, false)).unwrap();
    assert_eq!(next_plan(&mut b), (1, vec![32]));
    // 0 leaves no cap.
    let mut open = batcher(&model, 256, 0);
    open.submit(request(&model, 20, 8, false)).unwrap();
    open.step();
    open.submit(request(&model, 200, 2, false)).unwrap();
    assert_eq!(next_plan(&mut open), (1, vec![200]));
}

#[test]
fn a_scored_bf16_prompt_runs_whole_over_the_cap_instead_of_waiting() {
    let (_dir, model) = tiny(DType::BF16);
    let mut b = batcher(&model, 256, 32);
    b.submit(request(&model, 20, 8, false)).unwrap();
    b.step();
    b.submit(request(&model, 100, 1, true)).unwrap();
    b.submit(request(&model, 50, 1, false)).unwrap();
    assert_eq!(next_plan(&mut b), (1, vec![100]));
}

#[test]
fn capped_runs_give_the_tokens_of_uncapped_ones() {
    let (_dir, model) = tiny(DType::F32);
    let reqs = || {
        [(20, 30), (150, 12), (90, 12), (40, 20)]
            .map(|(len, n)| request(&model, len, n, false))
            .to_vec()
    };
    let tokens = |cap: usize| -> Vec<Vec<u32>> {
        batcher(&model, 128, cap)
            .run_all(reqs())
            .into_iter()
            .map(|r| r.unwrap().tokens.iter().map(|s| s.token).collect())
            .collect()
    };
    let (open, capped) = (tokens(0), tokens(16));
    assert!(open.iter().all(|t| !t.is_empty()));
    assert_eq!(open, capped);
}
