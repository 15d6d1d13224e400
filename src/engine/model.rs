//! One decoder for Llama, Qwen2, Mistral and Gemma2, driven by [`ModelConfig`]: a config, the
//! weights, and a plain packed forward over a [`LayerPlan`]. Rows of many sequences are packed
//! into one `[T, hidden]` matrix for the projections; attention runs per sequence via the cache.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::attention::{split_heads, AttnParams};
use super::kv_cache::{ChunkRef, KvCache};
use super::rope::RopeTables;
use super::taps::LayerTap;
use crate::checkpoint::config::Activation;
use crate::checkpoint::{CheckpointError, Family, LayerAttention, ModelConfig, ModelDir};
use crate::plan::LayerPlan;

/// RMSNorm with its effective scale (Gemma's `1 + w` folded in at load time), computed in f32:
/// it takes any dtype and returns f32.
struct RmsNorm {
    alpha: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.alpha, self.eps)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    params: AttnParams,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate.forward(x)?;
        let gate = match self.act {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
        };
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

struct DecoderLayer {
    attn_in_norm: RmsNorm,
    /// Gemma2 only: norm of the attention output before the residual add.
    attn_out_norm: Option<RmsNorm>,
    mlp_in_norm: RmsNorm,
    /// Gemma2 only: norm of the MLP output before the residual add.
    mlp_out_norm: Option<RmsNorm>,
    attn: Attention,
    mlp: Mlp,
}

/// The weights of one base model, loaded once and shared by every plan over it.
pub struct DecoderModel {
    cfg: ModelConfig,
    embed: Tensor,
    embed_scale: Option<f64>,
    layers: Vec<DecoderLayer>,
    final_norm: RmsNorm,
    lm_head: Tensor,
    rope: RopeTables,
    device: Device,
    dtype: DType,
}

/// Fetches a tensor, naming it when absent.
fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor, CheckpointError> {
    if !vb.contains_tensor(name) {
        return Err(CheckpointError::MissingTensor(name.to_string()));
    }
    Ok(vb.get(shape, name)?)
}

fn linear(
    vb: &VarBuilder,
    out: usize,
    inp: usize,
    name: &str,
    bias: bool,
) -> Result<Linear, CheckpointError> {
    let w = get(vb, &[out, inp], &format!("{name}.weight"))?;
    let b = if bias {
        Some(get(vb, &[out], &format!("{name}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

fn norm(vb: &VarBuilder, cfg: &ModelConfig, name: &str) -> Result<RmsNorm, CheckpointError> {
    let w = get(vb, &[cfg.hidden_size], &format!("{name}.weight"))?.to_dtype(DType::F32)?;
    let alpha = if cfg.family == Family::Gemma2 {
        (w + 1.0)?
    } else {
        w
    };
    Ok(RmsNorm {
        alpha,
        eps: cfg.rms_norm_eps as f32,
    })
}

impl DecoderLayer {
    fn load(vb: &VarBuilder, cfg: &ModelConfig, i: usize) -> Result<Self, CheckpointError> {
        let p = format!("model.layers.{i}");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        let gemma = cfg.family == Family::Gemma2;
        let attn = Attention {
            q: linear(vb, nh * hd, h, &format!("{p}.self_attn.q_proj"), bias)?,
            k: linear(vb, nkv * hd, h, &format!("{p}.self_attn.k_proj"), bias)?,
            v: linear(vb, nkv * hd, h, &format!("{p}.self_attn.v_proj"), bias)?,
            o: linear(vb, h, nh * hd, &format!("{p}.self_attn.o_proj"), false)?,
            params: AttnParams {
                scale: cfg.attention_scale,
                softcap: cfg.attn_logit_softcapping,
                window: match cfg.layer_attention[i] {
                    LayerAttention::Full => None,
                    LayerAttention::Sliding(w) => Some(w),
                },
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            },
        };
        let im = cfg.intermediate_size;
        let mlp = Mlp {
            gate: linear(vb, im, h, &format!("{p}.mlp.gate_proj"), false)?,
            up: linear(vb, im, h, &format!("{p}.mlp.up_proj"), false)?,
            down: linear(vb, h, im, &format!("{p}.mlp.down_proj"), false)?,
            act: cfg.activation,
        };
        let n = |name: &str| norm(vb, cfg, &format!("{p}.{name}"));
        Ok(Self {
            attn_in_norm: n("input_layernorm")?,
            attn_out_norm: if gemma {
                Some(n("post_attention_layernorm")?)
            } else {
                None
            },
            mlp_in_norm: if gemma {
                n("pre_feedforward_layernorm")?
            } else {
                n("post_attention_layernorm")?
            },
            mlp_out_norm: if gemma {
                Some(n("post_feedforward_layernorm")?)
            } else {
                None
            },
            attn,
            mlp,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        plan_pos: usize,
    ) -> candle_core::Result<Tensor> {
        // The residual stream `x`, norms and rotary embedding are f32; projections run in the
        // weights' dtype. On CPU f32 every conversion is a no-op.
        let p = &self.attn.params;
        let dt = self.attn.q.weight().dtype();
        let t = x.dim(0)?;
        let h = self.attn_in_norm.forward(x)?.to_dtype(dt)?;
        let rope = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let y = y
                .to_dtype(DType::F32)?
                .reshape((1, t, heads, p.head_dim))?
                .contiguous()?;
            candle_nn::rotary_emb::rope_thd(&y, cos, sin)?
                .squeeze(0)?
                .to_dtype(dt)
        };
        let q = rope(self.attn.q.forward(&h)?, p.num_heads)?;
        let k = rope(self.attn.k.forward(&h)?, p.num_kv_heads)?;
        let v = split_heads(&self.attn.v.forward(&h)?, p.num_kv_heads, p.head_dim)?;
        let a = cache.attend(plan_pos, chunks, &q, &k, &v, p)?;
        let a = self.attn.o.forward(&a)?;
        let a = match &self.attn_out_norm {
            Some(n) => n.forward(&a)?,
            None => a.to_dtype(DType::F32)?,
        };
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.mlp_in_norm.forward(&x)?.to_dtype(dt)?)?;
        let m = match &self.mlp_out_norm {
            Some(n) => n.forward(&m)?,
            None => m.to_dtype(DType::F32)?,
        };
        x + m
    }
}

impl DecoderModel {
    /// Loads every layer of a checkpoint (mmapped safetensors) onto `device` in `dtype`.
    pub fn load(dir: &ModelDir, device: &Device, dtype: DType) -> Result<Self, CheckpointError> {
        // SAFETY: the weight files are opened read-only and must not be modified while served.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&dir.weight_files, dtype, device)? };
        Self::from_varbuilder(&vb, dir.config.clone(), device, dtype)
    }

    pub fn from_varbuilder(
        vb: &VarBuilder,
        cfg: ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, CheckpointError> {
        let embed = get(
            vb,
            &[cfg.vocab_size, cfg.hidden_size],
            "model.embed_tokens.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb, &cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        // The final norm and the LM head run in f32 whatever the weights' dtype: bf16 logits
        // would round a logit of 20 to steps of 0.125 nats and flip near-tied argmaxes.
        let final_norm = norm(vb, &cfg, "model.norm")?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed.clone()
        } else {
            get(vb, &[cfg.vocab_size, cfg.hidden_size], "lm_head.weight")?
        }
        .to_dtype(DType::F32)?;
        let embed_scale = (cfg.family == Family::Gemma2).then(|| {
            // HF rounds the normalizer to the activation dtype.
            let s = (cfg.hidden_size as f64).sqrt();
            if dtype == DType::BF16 {
                f64::from(half::bf16::from_f64(s))
            } else {
                s
            }
        });
        let rope = RopeTables::new(&cfg, device)?;
        Ok(Self {
            embed,
            embed_scale,
            layers,
            final_norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype,
            cfg,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `plan` over the packed rows of `chunks` (tokens concatenated in chunk order) and
    /// returns the final-normed hidden states `[T, hidden]` in f32.
    pub fn forward_hidden<'t>(
        &self,
        plan: &LayerPlan,
        tokens: &[u32],
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        mut tap: Option<&mut (dyn LayerTap + 't)>,
    ) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| (c.start..c.start + c.len).map(|p| p as u32))
            .collect();
        let (cos, sin) = self.rope.gather(&positions)?;
        let mut x = self.embed.embedding(&ids)?.to_dtype(DType::F32)?;
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        cache.begin_step(chunks, plan.layers().len())?;
        for (plan_pos, &layer) in plan.layers().iter().enumerate() {
            let y = self.layers[layer].forward(&x, &cos, &sin, chunks, cache, plan_pos)?;
            if let Some(tap) = tap.as_deref_mut() {
                tap.observe(layer, &x, &y)?;
            }
            x = y;
        }
        self.final_norm.forward(&x)
    }

    /// Logits `[rows, vocab]` in f32 for final-normed hidden rows.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = hidden.to_dtype(DType::F32)?.matmul(&self.lm_head.t()?)?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}
