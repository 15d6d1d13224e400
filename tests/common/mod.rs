//! Shared test helpers: the real default model, tiny random checkpoints per family, the Python
//! reference implementations, and engine shortcuts.
#![allow(dead_code)]

pub mod server;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use candle_core::{DType, Device};
use pruneserve::checkpoint::random_init::init_random;
use pruneserve::checkpoint::ModelDir;
use pruneserve::engine::batch::{Batcher, GenOutput, GenRequest};
use pruneserve::engine::model::DecoderModel;
use pruneserve::engine::sample::sampler::SamplingParams;
use pruneserve::engine::{Engine, EngineOptions};
use pruneserve::plan::LayerPlan;
use serde_json::{json, Value};

/// The imported SmolLM2-135M-Instruct (`scripts/fetch-default-model.sh`; `.ci/run` makes it).
pub fn smollm2_dir() -> PathBuf {
    let dir = std::env::var("PRUNESERVE_DEFAULT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/pruneserve/SmolLM2-135M-Instruct")
        });
    assert!(
        dir.join("config.json").exists(),
        "default model missing at {}: run scripts/fetch-default-model.sh",
        dir.display()
    );
    dir
}

pub fn smollm2_gguf() -> PathBuf {
    let cache = std::env::var("PRUNESERVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/pruneserve")
        });
    let p = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} missing: run scripts/fetch-default-model.sh",
        p.display()
    );
    p
}

/// Runs a reference script with JSON on stdin; fails the test (never skips) if Python or its
/// packages are missing.
pub fn run_python(script: &str, input: &Value) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let python = std::env::var("PRUNESERVE_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A tiny config of each family, chosen so each family's peculiarities matter.
pub fn tiny_config(arch: &str) -> Value {
    let mut c = json!({
        "architectures": [arch], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "eos_token_id": 257, "bos_token_id": 256,
    });
    match arch {
        "LlamaForCausalLM" => {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        }
        "Qwen2ForCausalLM" => {
            c["tie_word_embeddings"] = json!(true);
            c["rope_theta"] = json!(1000000.0);
        }
        "MistralForCausalLM" => {
            c["num_key_value_heads"] = json!(1);
            c["sliding_window"] = json!(5);
        }
        "Gemma2ForCausalLM" => {
            c["head_dim"] = json!(32);
            c["query_pre_attn_scalar"] = json!(24);
            c["attn_logit_softcapping"] = json!(1.0);
            c["final_logit_softcapping"] = json!(2.0);
            c["sliding_window"] = json!(4);
            c["hidden_activation"] = json!("gelu_pytorch_tanh");
            c["tie_word_embeddings"] = json!(true);
        }
        _ => {}
    }
    c
}

pub const FAMILIES: [&str; 4] = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
];

/// Writes a tiny random checkpoint of `config` under `root/name`.
pub fn write_tiny(root: &Path, name: &str, config: Value, seed: u64) -> PathBuf {
    let dir = root.join(name);
    init_random(config, None, DType::F32, seed, &dir).unwrap();
    dir
}

pub fn load_cpu(dir: &Path) -> Arc<DecoderModel> {
    let md = ModelDir::open(dir).unwrap();
    Arc::new(DecoderModel::load(&md, &Device::Cpu, DType::F32).unwrap())
}

pub fn batcher(model: &Arc<DecoderModel>) -> Batcher {
    Batcher::new(
        Engine::with_contiguous_cache(model.clone(), &EngineOptions::default()),
        4096,
    )
}

pub fn score_request(plan: &Arc<LayerPlan>, prompt: Vec<u32>) -> GenRequest {
    GenRequest {
        plan: plan.clone(),
        prompt,
        max_tokens: 0,
        sampling: SamplingParams::greedy(),
        prompt_logprobs: Some(1),
        stop_token_ids: vec![],
        eos_token_ids: vec![],
        ignore_eos: false,
    }
}

pub fn gen_request(
    plan: &Arc<LayerPlan>,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    eos: &[u32],
) -> GenRequest {
    GenRequest {
        plan: plan.clone(),
        prompt,
        max_tokens,
        sampling,
        prompt_logprobs: None,
        stop_token_ids: vec![],
        eos_token_ids: eos.to_vec(),
        ignore_eos: false,
    }
}

/// Prompt logprobs of each prompt, scored together in one batch.
pub fn score_all(
    model: &Arc<DecoderModel>,
    plan: &Arc<LayerPlan>,
    prompts: &[Vec<u32>],
) -> Vec<Vec<f32>> {
    let outs = batcher(model).run_all(
        prompts
            .iter()
            .map(|p| score_request(plan, p.clone()))
            .collect(),
    );
    outs.into_iter()
        .map(|o: Result<GenOutput, _>| o.unwrap().prompt_scores.iter().map(|s| s.logprob).collect())
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Deterministic pseudo-random token ids below `vocab`.
pub fn pseudo_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 17) % vocab) as u32)
        .collect()
}
