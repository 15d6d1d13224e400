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
    let python = std::env::var("PRUNESERVE_PYTHON").unwrap_or_else(|_| "python3".into());
    run_python_in(&python, script, input)
}

/// The Python with torch, transformers and peft (`scripts/test.sh` makes it): the trainer's
/// and the peft reference's. Missing, the test fails naming it.
pub fn trainer_python() -> PathBuf {
    let p = std::env::var("PRUNESERVE_TRAINER_PYTHON").map_or_else(
        |_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
            Path::new(&home).join(".cache/pruneserve/trainer-venv/bin/python")
        },
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it installs tests/reference/trainer-requirements.txt)",
        p.display()
    );
    p
}

/// [`run_python`] with a chosen interpreter.
pub fn run_python_in(python: &str, script: &str, input: &Value) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let mut child = Command::new(python)
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

/// One family's tiny random checkpoint (its `tiny_config`, seeded by its index in
/// [`FAMILIES`]), loaded on the CPU, with its full plan.
pub struct TinyFamily {
    pub arch: &'static str,
    pub dir: PathBuf,
    pub model: Arc<DecoderModel>,
    pub full: Arc<LayerPlan>,
}

/// [`TinyFamily`] of each of the four families, written under `root/<arch>` as it is reached.
pub fn tiny_families(root: &Path) -> impl Iterator<Item = TinyFamily> + '_ {
    FAMILIES.iter().enumerate().map(move |(i, &arch)| {
        let dir = write_tiny(root, arch, tiny_config(arch), i as u64);
        let model = load_cpu(&dir);
        let full = Arc::new(LayerPlan::full(model.config().num_hidden_layers));
        TinyFamily {
            arch,
            dir,
            model,
            full,
        }
    })
}

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
        overlay: None,
        lora: None,
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
        overlay: None,
        lora: None,
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

/// Logprobs of the independent numpy forward (`tests/reference/hf_numpy_reference.py`) for a
/// request of its stdin form (`{"model", "prompts", ...}`).
pub fn numpy_logprobs(req: &Value) -> Vec<Vec<f64>> {
    let out = run_python("hf_numpy_reference.py", req);
    serde_json::from_value(out["logprobs"].clone()).unwrap()
}

/// Deterministic pseudo-random token ids below `vocab`.
pub fn pseudo_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 17) % vocab) as u32)
        .collect()
}

/// The output and input widths of a projection of a model config (HF module name).
pub fn module_dims(cfg: &Value, module: &str) -> (usize, usize) {
    let get = |k: &str| cfg[k].as_u64().map(|v| v as usize);
    let h = get("hidden_size").unwrap();
    let heads = get("num_attention_heads").unwrap();
    let kv = get("num_key_value_heads").unwrap_or(heads);
    let hd = get("head_dim").unwrap_or(h / heads);
    let im = get("intermediate_size").unwrap();
    match module {
        "q_proj" => (heads * hd, h),
        "k_proj" | "v_proj" => (kv * hd, h),
        "o_proj" => (h, heads * hd),
        "gate_proj" | "up_proj" => (im, h),
        "down_proj" => (h, im),
        other => panic!("no module {other}"),
    }
}

#[allow(unused_imports)]
pub use pruneserve::engine::adapters::peft::PROJECTION_NAMES as ALL_MODULES;

/// A random PEFT LoRA adapter to write: every layer of `layers`, the `targets` modules.
pub struct AdapterSpec<'a> {
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: &'a [&'a str],
    /// `(module name, rank)`: PEFT `rank_pattern` entries keyed by module name.
    pub rank_pattern: &'a [(&'a str, usize)],
    pub alpha_pattern: &'a [(&'a str, f64)],
    pub layers: usize,
    /// Entries of A and B are uniform in `[-scale, scale]`.
    pub scale: f32,
    pub base_model: Option<&'a Path>,
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` as PEFT's `save_pretrained` does.
pub fn write_adapter(dir: &Path, model_cfg: &Value, spec: &AdapterSpec, seed: u64) {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..spec.layers {
        for m in spec.targets {
            let r = spec
                .rank_pattern
                .iter()
                .find(|(k, _)| k == m)
                .map_or(spec.r, |(_, r)| *r);
            let (out, inp) = module_dims(model_cfg, m);
            let group = if ["gate_proj", "up_proj", "down_proj"].contains(m) {
                "mlp"
            } else {
                "self_attn"
            };
            let prefix = format!("base_model.model.model.layers.{layer}.{group}.{m}");
            let mut random = |rows: usize, cols: usize| {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-spec.scale..spec.scale))
                    .collect();
                candle_core::Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            tensors.insert(format!("{prefix}.lora_A.weight"), random(r, inp));
            tensors.insert(format!("{prefix}.lora_B.weight"), random(out, r));
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let ranks: serde_json::Map<String, Value> = spec
        .rank_pattern
        .iter()
        .map(|(k, r)| (k.to_string(), json!(r)))
        .collect();
    let alphas: serde_json::Map<String, Value> = spec
        .alpha_pattern
        .iter()
        .map(|(k, a)| (k.to_string(), json!(a)))
        .collect();
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora, "target_modules": spec.targets, "lora_dropout": 0.05,
        "bias": "none", "modules_to_save": null, "fan_in_fan_out": false, "use_dora": false,
        "rank_pattern": ranks, "alpha_pattern": alphas,
        "base_model_name_or_path": spec.base_model.map(|p| p.to_string_lossy().into_owned()),
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

/// Prompt logprobs of each prompt under `spec` (a plan with an adapter and/or overlay).
pub fn score_spec(
    model: &Arc<DecoderModel>,
    spec: &pruneserve::engine::RunSpec,
    prompts: &[Vec<u32>],
) -> Vec<Vec<f32>> {
    let outs = batcher(model).run_all(
        prompts
            .iter()
            .map(|p| GenRequest {
                overlay: spec.overlay.clone(),
                lora: spec.lora.clone(),
                ..score_request(&spec.plan, p.clone())
            })
            .collect(),
    );
    outs.into_iter()
        .map(|o| o.unwrap().prompt_scores.iter().map(|s| s.logprob).collect())
        .collect()
}

/// The workspace's `pruneval` binary, next to this test's deps directory.
pub fn pruneval_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("pruneval");
    assert!(
        bin.exists(),
        "{} is not built (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// SmolLM2's config.json.
pub fn smollm2_config() -> Value {
    serde_json::from_str(&std::fs::read_to_string(smollm2_dir().join("config.json")).unwrap())
        .unwrap()
}

/// A random PEFT adapter of rank `r` on `targets` of all 30 SmolLM2 layers.
pub fn write_smollm2_adapter(dir: &Path, r: usize, targets: &[&str], seed: u64) {
    let spec = AdapterSpec {
        r,
        alpha: 16.0,
        rslora: false,
        targets,
        rank_pattern: &[],
        alpha_pattern: &[],
        layers: 30,
        scale: 0.05,
        base_model: None,
    };
    write_adapter(dir, &smollm2_config(), &spec, seed);
}
