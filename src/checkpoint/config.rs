//! `config.json` of an HF decoder checkpoint, parsed into one struct that drives the shared decoder.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::CheckpointError;

/// The decoder families the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
    Gemma2,
}

impl Family {
    /// Maps an HF `architectures[0]` string to a family.
    pub fn from_architecture(arch: &str) -> Result<Self, CheckpointError> {
        match arch {
            "LlamaForCausalLM" => Ok(Family::Llama),
            "Qwen2ForCausalLM" => Ok(Family::Qwen2),
            "MistralForCausalLM" => Ok(Family::Mistral),
            "Gemma2ForCausalLM" => Ok(Family::Gemma2),
            other => Err(CheckpointError::UnknownArchitecture(other.to_string())),
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
        }
    }
}

/// Llama-3 style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// MLP gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, CheckpointError> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            other => Err(CheckpointError::Config(format!(
                "unsupported activation `{other}`"
            ))),
        }
    }
}

/// Attention kind of one layer: full causal, or causal within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    Full,
    Sliding(usize),
}

/// Everything the decoder needs from `config.json`, with family defaults applied.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Per-layer attention kind, indexed by the checkpoint's own layer index.
    pub layer_attention: Vec<LayerAttention>,
    /// Gemma2: attention scores scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub attention_scale: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON, kept so writers (prune, init-random) can round-trip unknown keys.
    pub raw: Value,
}

fn get_usize(raw: &Value, key: &str) -> Result<usize, CheckpointError> {
    opt_usize(raw, key)?.ok_or_else(|| CheckpointError::Config(format!("missing `{key}`")))
}

fn opt_usize(raw: &Value, key: &str) -> Result<Option<usize>, CheckpointError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
            CheckpointError::Config(format!("`{key}` must be a non-negative integer"))
        }),
    }
}

fn opt_f64(raw: &Value, key: &str) -> Result<Option<f64>, CheckpointError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| CheckpointError::Config(format!("`{key}` must be a number"))),
    }
}

/// Token ids given either as one integer or a list of integers.
pub fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses a `config.json` value.
    pub fn from_json(raw: Value) -> Result<Self, CheckpointError> {
        let arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .ok_or_else(|| CheckpointError::Config("missing `architectures`".into()))?;
        let family = Family::from_architecture(arch)?;
        let hidden_size = get_usize(&raw, "hidden_size")?;
        let num_attention_heads = get_usize(&raw, "num_attention_heads")?;
        let num_hidden_layers = get_usize(&raw, "num_hidden_layers")?;
        let num_key_value_heads =
            opt_usize(&raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(CheckpointError::Config(format!(
                "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = opt_usize(&raw, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(CheckpointError::Config(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        let default_theta = match family {
            Family::Llama | Family::Gemma2 => 10_000.0,
            Family::Qwen2 | Family::Mistral => 1_000_000.0,
        };
        let rope_scaling = parse_rope_scaling(raw.get("rope_scaling"))?;
        let sliding_window = opt_usize(&raw, "sliding_window")?;
        let layer_attention = layer_attention(&raw, family, num_hidden_layers, sliding_window)?;
        let attention_scale = match (family, opt_f64(&raw, "query_pre_attn_scalar")?) {
            (Family::Gemma2, Some(s)) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let (attn_cap, final_cap) = if family == Family::Gemma2 {
            (
                opt_f64(&raw, "attn_logit_softcapping")?,
                opt_f64(&raw, "final_logit_softcapping")?,
            )
        } else {
            (None, None)
        };
        let tie_default = family == Family::Gemma2;
        Ok(Self {
            family,
            vocab_size: get_usize(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(&raw, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            activation: Activation::parse(
                raw.get("hidden_activation")
                    .or_else(|| raw.get("hidden_act"))
                    .and_then(|v| v.as_str())
                    .unwrap_or(if family == Family::Gemma2 {
                        "gelu_pytorch_tanh"
                    } else {
                        "silu"
                    }),
            )?,
            rope_theta: opt_f64(&raw, "rope_theta")?.unwrap_or(default_theta),
            rope_scaling,
            max_position_embeddings: opt_usize(&raw, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(tie_default),
            attention_bias: family == Family::Qwen2
                || raw
                    .get("attention_bias")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            layer_attention,
            attention_scale,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            bos_token_id: id_list(raw.get("bos_token_id")).first().copied(),
            eos_token_ids: id_list(raw.get("eos_token_id")),
            raw,
        })
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<Option<Llama3RopeScaling>, CheckpointError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| CheckpointError::Config(format!("rope_scaling.{k} missing")))
            };
            Ok(Some(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(CheckpointError::Config(format!(
            "rope_scaling type `{other}` is not supported (supported: default, llama3)"
        ))),
    }
}

/// Attention kind of each layer. An explicit `layer_types` list wins (written by `prune` so the
/// pattern follows the kept layers); otherwise each family's own rule applies.
fn layer_attention(
    raw: &Value,
    family: Family,
    layers: usize,
    sliding_window: Option<usize>,
) -> Result<Vec<LayerAttention>, CheckpointError> {
    if let Some(types) = raw.get("layer_types").and_then(|v| v.as_array()) {
        if types.len() != layers {
            return Err(CheckpointError::Config(format!(
                "layer_types has {} entries for {layers} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match (t.as_str(), sliding_window) {
                (Some("full_attention"), _) => Ok(LayerAttention::Full),
                (Some("sliding_attention"), Some(w)) => Ok(LayerAttention::Sliding(w)),
                (Some("sliding_attention"), None) => Err(CheckpointError::Config(
                    "layer_types names sliding_attention but sliding_window is unset".into(),
                )),
                _ => Err(CheckpointError::Config(format!("unknown layer type {t}"))),
            })
            .collect();
    }
    let use_sliding = raw.get("use_sliding_window").and_then(|v| v.as_bool());
    let max_window_layers = opt_usize(raw, "max_window_layers")?.unwrap_or(layers);
    Ok((0..layers)
        .map(|i| match (family, sliding_window) {
            (Family::Gemma2, Some(w)) if i % 2 == 0 => LayerAttention::Sliding(w),
            (Family::Mistral, Some(w)) => LayerAttention::Sliding(w),
            (Family::Qwen2, Some(w)) if use_sliding == Some(true) && i >= max_window_layers => {
                LayerAttention::Sliding(w)
            }
            _ => LayerAttention::Full,
        })
        .collect())
}

/// The `layer_types` strings HF writes for a list of layer kinds.
pub fn layer_type_names(kinds: &[LayerAttention]) -> Vec<&'static str> {
    kinds
        .iter()
        .map(|k| match k {
            LayerAttention::Full => "full_attention",
            LayerAttention::Sliding(_) => "sliding_attention",
        })
        .collect()
}
