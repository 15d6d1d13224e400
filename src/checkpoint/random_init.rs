//! `init-random`: random-weight checkpoints of any shape and family, for tests (tiny shapes) and GPU
//! benchmarks (full 8B shapes). Weights are seeded, so a (config, seed) pair always gives the same
//! model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::writer::CheckpointWriter;
use super::{CheckpointError, Family, ModelConfig};

/// Every tensor name and shape a checkpoint of `cfg` holds, in a stable order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, im) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        if cfg.family == Family::Gemma2 {
            add("pre_feedforward_layernorm.weight", vec![h]);
            add("post_feedforward_layernorm.weight", vec![h]);
        }
        add("self_attn.q_proj.weight", vec![nh * hd, h]);
        add("self_attn.k_proj.weight", vec![nkv * hd, h]);
        add("self_attn.v_proj.weight", vec![nkv * hd, h]);
        add("self_attn.o_proj.weight", vec![h, nh * hd]);
        if cfg.attention_bias {
            add("self_attn.q_proj.bias", vec![nh * hd]);
            add("self_attn.k_proj.bias", vec![nkv * hd]);
            add("self_attn.v_proj.bias", vec![nkv * hd]);
        }
        add("mlp.gate_proj.weight", vec![im, h]);
        add("mlp.up_proj.weight", vec![im, h]);
        add("mlp.down_proj.weight", vec![h, im]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// A byte-level BPE tokenizer with the 256 byte symbols and `<s>`, `</s>` (ids 256, 257) and no
/// merges: enough to drive random models whose vocabulary has no real tokenizer.
pub fn byte_tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, ch) in byte_alphabet().into_iter().enumerate() {
        vocab.insert(ch.to_string(), json!(i));
    }
    vocab.insert("<s>".into(), json!(256));
    vocab.insert("</s>".into(), json!(257));
    let special = |id: u32, c: &str| json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// GPT-2's printable stand-ins for the 256 byte values, in byte order.
fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).unwrap_or('?'))
        .collect()
}

/// Seeded values with standard deviation `std` (uniform, so generation stays fast at 8B).
fn random_values(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let half_width = std * 3f32.sqrt();
    (0..n)
        .map(|_| mean + rng.random_range(-half_width..half_width))
        .collect()
}

/// Writes a random checkpoint of `config` (a `config.json` value) to `out_dir`.
pub fn init_random(
    config: Value,
    tokenizer: Option<&Path>,
    dtype: DType,
    seed: u64,
    out_dir: &Path,
) -> Result<(), CheckpointError> {
    let cfg = ModelConfig::from_json(config.clone())?;
    let tokenizer_json = match tokenizer {
        Some(p) => std::fs::read(p).map_err(|e| CheckpointError::file(p, e))?,
        None => {
            if cfg.vocab_size < 258 {
                return Err(CheckpointError::Config(
                    "vocab_size must be >= 258 for the built-in byte tokenizer".into(),
                ));
            }
            serde_json::to_vec(&byte_tokenizer_json())
                .map_err(|e| CheckpointError::Config(e.to_string()))?
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut writer = CheckpointWriter::create(out_dir)?;
    for (name, shape) in expected_tensors(&cfg) {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let (mean, std) = match (is_norm, cfg.family) {
            // Gemma norms scale by (1 + w): keep w near 0, elsewhere near 1.
            (true, Family::Gemma2) => (0.0, 0.1),
            (true, _) => (1.0, 0.1),
            (false, _) if name.ends_with(".bias") => (0.0, 0.1),
            _ => (
                0.0,
                0.02f32.max(1.0 / (shape[shape.len() - 1] as f32).sqrt()),
            ),
        };
        let t = Tensor::from_vec(random_values(&mut rng, n, mean, std), shape, &Device::Cpu)?
            .to_dtype(dtype)?;
        writer.add(name, t)?;
    }
    let mut raw = config;
    raw["torch_dtype"] = json!(if dtype == DType::BF16 {
        "bfloat16"
    } else {
        "float32"
    });
    writer.add_json("config.json", &raw)?;
    writer.add_file("tokenizer.json", &tokenizer_json)?;
    if let Some(dir) = tokenizer.and_then(Path::parent) {
        writer.copy_if_exists(dir, "tokenizer_config.json")?;
    }
    writer.finish()?;
    Ok(())
}

/// What `init-lora` writes: a seeded random PEFT LoRA adapter for a model shape.
#[derive(Debug, Clone)]
pub struct AdapterInit<'a> {
    pub rank: usize,
    pub alpha: f64,
    /// HF module names (`q_proj` ... `down_proj`).
    pub targets: &'a [&'a str],
    /// Standard deviation of the entries of A and B.
    pub std: f32,
    pub dtype: DType,
    pub seed: u64,
}

/// Writes a random adapter for `cfg` in PEFT's layout (`adapter_config.json`,
/// `adapter_model.safetensors`) to `out_dir`, every layer adapted.
pub fn init_random_adapter(
    cfg: &ModelConfig,
    init: &AdapterInit<'_>,
    out_dir: &Path,
) -> Result<(), CheckpointError> {
    let (h, hd, im) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut rng = ChaCha8Rng::seed_from_u64(init.seed);
    let mut writer = CheckpointWriter::create(out_dir)?.weights_named("adapter_model");
    for layer in 0..cfg.num_hidden_layers {
        for &m in init.targets {
            let (group, out, inp) = match m {
                "q_proj" => ("self_attn", q, h),
                "k_proj" | "v_proj" => ("self_attn", kv, h),
                "o_proj" => ("self_attn", h, q),
                "gate_proj" | "up_proj" => ("mlp", im, h),
                "down_proj" => ("mlp", h, im),
                other => {
                    return Err(CheckpointError::Config(format!(
                        "`{other}` is not a projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    )))
                }
            };
            let prefix = format!("base_model.model.model.layers.{layer}.{group}.{m}");
            for (part, shape) in [("lora_A", (init.rank, inp)), ("lora_B", (out, init.rank))] {
                let values = random_values(&mut rng, shape.0 * shape.1, 0.0, init.std);
                let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(init.dtype)?;
                writer.add(format!("{prefix}.{part}.weight"), t)?;
            }
        }
    }
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": init.rank, "lora_alpha": init.alpha,
        "target_modules": init.targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": false,
        "use_dora": false, "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {},
    });
    writer.add_json("adapter_config.json", &config)?;
    writer.finish()?;
    Ok(())
}
