//! `config.json` of an HF decoder checkpoint: the keys the decoder reads, deserialized as HF writes
//! them ([`HfConfig`], as candle-transformers' model files do), then one [`ModelConfig`] with each
//! family's defaults applied that drives the shared decoder.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What is wrong with a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("missing `architectures`")]
    NoArchitecture,
    #[error("unknown architecture `{0}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM)")]
    UnknownArchitecture(String),
    #[error("num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})")]
    Heads { heads: usize, kv_heads: usize },
    #[error("head_dim {0} must be even and positive")]
    HeadDim(usize),
    #[error("unsupported activation `{0}`")]
    Activation(String),
    #[error("rope_scaling type `{0}` is not supported (supported: default, llama3)")]
    RopeScalingType(String),
    #[error("rope_scaling.{0} missing")]
    RopeScalingField(&'static str),
    #[error("layer_types has {given} entries for {layers} layers")]
    LayerTypes { given: usize, layers: usize },
    #[error("layer_types names sliding_attention but sliding_window is unset")]
    NoSlidingWindow,
    #[error("unknown layer type `{0}`")]
    LayerType(String),
}

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
    pub fn from_architecture(arch: &str) -> Result<Self, ConfigError> {
        match arch {
            "LlamaForCausalLM" => Ok(Family::Llama),
            "Qwen2ForCausalLM" => Ok(Family::Qwen2),
            "MistralForCausalLM" => Ok(Family::Mistral),
            "Gemma2ForCausalLM" => Ok(Family::Gemma2),
            other => Err(ConfigError::UnknownArchitecture(other.to_string())),
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
    fn parse(name: &str) -> Result<Self, ConfigError> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            other => Err(ConfigError::Activation(other.to_string())),
        }
    }
}

/// Attention kind of one layer: full causal, or causal within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    Full,
    Sliding(usize),
}

/// Token ids given either as one integer or a list of integers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` as HF writes it.
#[derive(Debug, Clone, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// `config.json` as HF writes it: the keys the four families use, each optional where some family
/// leaves it out.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
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

impl ModelConfig {
    /// Parses a `config.json` value.
    pub fn from_json(raw: Value) -> Result<Self, ConfigError> {
        let hf: HfConfig = serde_json::from_value(raw.clone())?;
        let family = Family::from_architecture(
            hf.architectures
                .first()
                .ok_or(ConfigError::NoArchitecture)?,
        )?;
        let heads = hf.num_attention_heads;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ConfigError::Heads { heads, kv_heads });
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::HeadDim(head_dim));
        }
        let gemma = family == Family::Gemma2;
        let default_theta = match family {
            Family::Llama | Family::Gemma2 => 10_000.0,
            Family::Qwen2 | Family::Mistral => 1_000_000.0,
        };
        let attention_scale = match (gemma, hf.query_pre_attn_scalar) {
            (true, Some(s)) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let activation = hf
            .hidden_activation
            .as_deref()
            .or(hf.hidden_act.as_deref())
            .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
        Ok(Self {
            family,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            activation: Activation::parse(activation)?,
            rope_theta: hf.rope_theta.unwrap_or(default_theta),
            rope_scaling: rope_scaling(hf.rope_scaling.as_ref())?,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(gemma),
            attention_bias: family == Family::Qwen2 || hf.attention_bias.unwrap_or(false),
            layer_attention: layer_attention(&hf, family)?,
            attention_scale,
            attn_logit_softcapping: hf.attn_logit_softcapping.filter(|_| gemma),
            final_logit_softcapping: hf.final_logit_softcapping.filter(|_| gemma),
            bos_token_id: hf
                .bos_token_id
                .as_ref()
                .and_then(|t| t.ids().first().copied()),
            eos_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(TokenIds::ids)
                .unwrap_or_default(),
            raw,
        })
    }
}

fn rope_scaling(v: Option<&HfRopeScaling>) -> Result<Option<Llama3RopeScaling>, ConfigError> {
    let Some(v) = v else {
        return Ok(None);
    };
    match v
        .rope_type
        .as_deref()
        .or(v.kind.as_deref())
        .unwrap_or("default")
    {
        "default" => Ok(None),
        "llama3" => {
            let need = |x: Option<f64>, name| x.ok_or(ConfigError::RopeScalingField(name));
            Ok(Some(Llama3RopeScaling {
                factor: need(v.factor, "factor")?,
                low_freq_factor: need(v.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(v.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: v.original_max_position_embeddings.ok_or(
                    ConfigError::RopeScalingField("original_max_position_embeddings"),
                )?,
            }))
        }
        other => Err(ConfigError::RopeScalingType(other.to_string())),
    }
}

/// Attention kind of each layer. An explicit `layer_types` list wins (written by `prune` so the
/// pattern follows the kept layers); otherwise each family's own rule applies.
fn layer_attention(hf: &HfConfig, family: Family) -> Result<Vec<LayerAttention>, ConfigError> {
    let layers = hf.num_hidden_layers;
    let window = hf.sliding_window;
    if let Some(types) = &hf.layer_types {
        if types.len() != layers {
            return Err(ConfigError::LayerTypes {
                given: types.len(),
                layers,
            });
        }
        return types
            .iter()
            .map(|t| match (t.as_str(), window) {
                ("full_attention", _) => Ok(LayerAttention::Full),
                ("sliding_attention", Some(w)) => Ok(LayerAttention::Sliding(w)),
                ("sliding_attention", None) => Err(ConfigError::NoSlidingWindow),
                _ => Err(ConfigError::LayerType(t.clone())),
            })
            .collect();
    }
    let max_window_layers = hf.max_window_layers.unwrap_or(layers);
    Ok((0..layers)
        .map(|i| match (family, window) {
            (Family::Gemma2, Some(w)) if i % 2 == 0 => LayerAttention::Sliding(w),
            (Family::Mistral, Some(w)) => LayerAttention::Sliding(w),
            (Family::Qwen2, Some(w))
                if hf.use_sliding_window == Some(true) && i >= max_window_layers =>
            {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_hf_configs_with_family_defaults() {
        let llama = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009],
            "bos_token_id": 128000, "sliding_window": null, "some_future_key": {"x": 1}});
        let c = ModelConfig::from_json(llama).unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads), (128, 8));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(
            c.rope_scaling.unwrap().original_max_position_embeddings,
            8192
        );
        assert_eq!(c.activation, Activation::Silu);
        assert!(c.layer_attention.iter().all(|a| *a == LayerAttention::Full));
        let gemma = json!({"architectures": ["Gemma2ForCausalLM"], "vocab_size": 256000,
            "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "sliding_window": 4096, "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0});
        let g = ModelConfig::from_json(gemma).unwrap();
        assert!(g.tie_word_embeddings);
        assert_eq!(g.activation, Activation::GeluTanh);
        assert_eq!(g.layer_attention[0], LayerAttention::Sliding(4096));
        assert_eq!(g.layer_attention[1], LayerAttention::Full);
        assert_eq!(g.final_logit_softcapping, Some(30.0));
    }

    #[test]
    fn names_what_is_wrong() {
        let base = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2});
        let with = |k: &str, v: Value| {
            let mut c = base.clone();
            c[k] = v;
            ModelConfig::from_json(c).unwrap_err().to_string()
        };
        assert!(with("hidden_size", json!(-1)).contains("invalid value"));
        assert!(with("num_key_value_heads", json!(3)).contains("multiple"));
        assert!(with("architectures", json!(["GPT2LMHeadModel"])).contains("unknown architecture"));
        assert!(with("hidden_act", json!("relu")).contains("unsupported activation"));
        assert!(with("rope_scaling", json!({"type": "yarn"})).contains("yarn"));
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("vocab_size");
        assert!(ModelConfig::from_json(missing)
            .unwrap_err()
            .to_string()
            .contains("vocab_size"));
    }
}
