//! One decoder for Llama, Qwen2, Mistral and Gemma2, driven by [`ModelConfig`]: a config, the
//! weights, and a plain packed forward over a [`LayerPlan`]. Rows of many sequences are packed
//! into one `[T, hidden]` matrix for the projections; attention runs per sequence via the cache.

pub mod config;
pub mod overlay;
pub mod precision;
pub mod rope;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{CheckpointError, Family, LayerAttention, ModelConfig, ModelDir};
use crate::engine::adapters::{Group, StepLora};
use crate::engine::attention::AttnParams;
use crate::engine::instrument::phase_times::{self, phase};
use crate::engine::instrument::taps::LayerTap;
use crate::engine::kv::{ChunkRef, KvCache};
use crate::engine::model::rope::RopeTables;
use crate::engine::ops::fused::{act_mul, rms_norm_to, rope_heads};
use crate::engine::ops::gemm::{linear_rows, linear_rows_accumulate, ExactRows};
use crate::engine::ops::rows::{add_row_bias, gather_rows};
use crate::plan::LayerPlan;
use config::Activation;
pub use precision::{activation_dtype, exact_rows};
use precision::{decode_only, gemm_input_dtype};

/// RMSNorm of f32 rows with its effective scale (Gemma's `1 + w` folded in at load time),
/// computed in f32 and written in the dtype asked for.
#[derive(Clone)]
struct RmsNorm {
    alpha: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, out: DType) -> candle_core::Result<Tensor> {
        rms_norm_to(x, &self.alpha, self.eps, out)
    }
}

/// Attention projections; q, k and v packed into one `[(heads + 2 kv_heads) * head_dim, hidden]`
/// weight so that one GEMM serves all three.
#[derive(Clone)]
struct Attention {
    qkv: Tensor,
    /// Qwen2's q|k|v biases, f32.
    qkv_bias: Option<Tensor>,
    o: Tensor,
    params: AttnParams,
}

/// The MLP; gate and up packed into one `[2 * intermediate, hidden]` weight.
#[derive(Clone)]
struct Mlp {
    gate_up: Tensor,
    down: Tensor,
    act: Activation,
}

impl Mlp {
    /// Normed rows `x` in (`at.gemm_in` dtype), f32 rows out; the activation product is written
    /// in `at.gemm_in`. With `residual`, the down projection accumulates into those rows in
    /// place and they are returned (`residual + mlp(x)`, see [`LayerAt::in_place`]).
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<Tensor>,
        at: LayerAt<'_>,
    ) -> candle_core::Result<Tensor> {
        let dev = x.device();
        let gate_up = at.project(x, (&self.gate_up, None), None, Group::GateUp)?;
        let m = phase(dev, "act_mul", || act_mul(&gate_up, self.act, at.gemm_in))?;
        at.project(&m, (&self.down, None), residual, Group::Down)
    }
}

#[derive(Clone)]
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

/// Tensor `part` (`weight` `[rows, ..tail]` or `bias` `[rows]`) of the projections `names`,
/// stacked along the output dimension.
fn stacked(
    vb: &VarBuilder,
    names: &[(String, usize)],
    part: &str,
    tail: &[usize],
) -> Result<Tensor, CheckpointError> {
    let parts = names
        .iter()
        .map(|(name, rows)| {
            let shape: Vec<usize> = std::iter::once(*rows).chain(tail.iter().copied()).collect();
            get(vb, &shape, &format!("{name}.{part}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(&parts, 0)?)
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
        let qkv_names = [
            (format!("{p}.self_attn.q_proj"), nh * hd),
            (format!("{p}.self_attn.k_proj"), nkv * hd),
            (format!("{p}.self_attn.v_proj"), nkv * hd),
        ];
        let attn = Attention {
            qkv: stacked(vb, &qkv_names, "weight", &[h])?,
            qkv_bias: if bias {
                Some(stacked(vb, &qkv_names, "bias", &[])?.to_dtype(DType::F32)?)
            } else {
                None
            },
            o: get(vb, &[h, nh * hd], &format!("{p}.self_attn.o_proj.weight"))?,
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
        let gate_up = [
            (format!("{p}.mlp.gate_proj"), im),
            (format!("{p}.mlp.up_proj"), im),
        ];
        let mlp = Mlp {
            gate_up: stacked(vb, &gate_up, "weight", &[h])?,
            down: get(vb, &[h, im], &format!("{p}.mlp.down_proj.weight"))?,
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

    /// One layer over the residual rows `x` (f32) whose activations (norm outputs, q/k/v,
    /// attention output, MLP product) are written in `act` (see [`activation_dtype`]), those
    /// that only feed projections in `gemm_in` ([`gemm_input_dtype`]). With
    /// `at.in_place` the residual adds accumulate into `x` itself (the projections' GEMMs add
    /// their products to it), so `x` must be held by nothing else.
    fn forward(
        &self,
        x: Tensor,
        rope: (&Tensor, &Tensor),
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        at: LayerAt<'_>,
    ) -> candle_core::Result<Tensor> {
        let LayerAt {
            plan_pos,
            act,
            gemm_in,
            in_place,
            ..
        } = at;
        let p = &self.attn.params;
        let (nh, nkv, hd) = (p.num_heads, p.num_kv_heads, p.head_dim);
        let dev = x.device().clone();
        let dev = &dev;
        let h = phase(dev, "norms", || self.attn_in_norm.forward(&x, gemm_in))?;
        let qkv = at.project(
            &h,
            (&self.attn.qkv, self.attn.qkv_bias.as_ref()),
            None,
            Group::Qkv,
        )?;
        // Decode steps on the paged cache rotate and store in one launch; otherwise a fresh
        // prompt attends to its own keys in `act` and the cache rounds what it stores.
        let a = match phase(dev, "attention", || {
            cache.attend_packed(plan_pos, &qkv, rope, p)
        })? {
            Some(a) => a,
            None => {
                let (q, k, v) = phase(dev, "rope", || {
                    Ok((
                        rope_heads(&qkv, rope, (0, nh, hd), true, act)?,
                        rope_heads(&qkv, rope, (nh * hd, nkv, hd), true, act)?,
                        rope_heads(&qkv, rope, ((nh + nkv) * hd, nkv, hd), false, act)?,
                    ))
                })?;
                phase(dev, "attention", || {
                    cache.attend(plan_pos, chunks, &q, &k, &v, p)
                })?
            }
        };
        // Rounded once for the o projection and its adapter alike (a no-op unless `gemm_in`
        // differs from `act`).
        let a = phase(dev, "attention", || a.to_dtype(gemm_in))?;
        let x = match (&self.attn_out_norm, in_place) {
            (None, true) => at.project(&a, (&self.attn.o, None), Some(x), Group::O)?,
            (norm, _) => {
                let o = at.project(&a, (&self.attn.o, None), None, Group::O)?;
                phase(dev, "norms", || match norm {
                    Some(n) => x + n.forward(&o, DType::F32)?,
                    None => x + o,
                })?
            }
        };
        let h = phase(dev, "norms", || self.mlp_in_norm.forward(&x, gemm_in))?;
        match (&self.mlp_out_norm, in_place) {
            (None, true) => self.mlp.forward(&h, Some(x), at),
            (norm, _) => {
                let m = self.mlp.forward(&h, None, at)?;
                phase(dev, "norms", || match norm {
                    Some(n) => x + n.forward(&m, DType::F32)?,
                    None => x + m,
                })
            }
        }
    }
}

/// Where a layer runs in a forward: its position in the plan (the KV cache's index), its base
/// index, the step's activation and projection-input dtypes and exact rows, the step's adapters,
/// and whether the residual rows may be updated in place (rows the forward owns, no taps, no
/// scored rows).
#[derive(Clone, Copy)]
struct LayerAt<'a> {
    plan_pos: usize,
    layer: usize,
    act: DType,
    /// The dtype of activations that only feed projections ([`gemm_input_dtype`]).
    gemm_in: DType,
    exact: &'a ExactRows,
    lora: &'a StepLora,
    /// The residual adds accumulate into the residual rows (the projections' GEMMs add their
    /// products to them): rows the forward owns, in steps without scored rows.
    in_place: bool,
}

impl LayerAt<'_> {
    /// The projection of `group` for rows `x`: `x · wᵀ (+ bias)` with the step's adapters'
    /// deltas added, accumulated into `into` (the residual rows, in place) when given. The
    /// adapters' part runs before the GEMM where the base projection can accumulate into it
    /// ([`StepLora::fresh_delta`]), else around it (a side-stream shrink started before, the
    /// expand after).
    fn project(
        &self,
        x: &Tensor,
        (w, bias): (&Tensor, Option<&Tensor>),
        into: Option<Tensor>,
        group: Group,
    ) -> candle_core::Result<Tensor> {
        let (dev, at, exact) = (x.device(), (self.layer, group), self.exact);
        let name = group.gemm_phase();
        let fresh = match into {
            None => phase(dev, "lora", || self.lora.fresh_delta(x, at, exact))?,
            Some(_) => None,
        };
        if let Some(delta) = fresh {
            let y = phase(dev, name, || linear_rows_accumulate(delta, x, w, exact))?;
            return match bias {
                Some(b) => add_row_bias(y, b),
                None => Ok(y),
            };
        }
        phase(dev, "lora", || self.lora.prefetch(x, at, w.dim(0)?))?;
        let y = phase(dev, name, || match into {
            Some(r) => linear_rows_accumulate(r, x, w, exact),
            None => linear_rows(x, w, bias, exact),
        })?;
        phase(dev, "lora", || self.lora.add(y, x, at, exact))
    }
}

/// The residual rows a forward starts from, after the plan's first `skip` positions; `owned`
/// when nothing else holds them (fresh embeddings), so steps may update them in place
/// ([`LayerAt::in_place`]).
struct Residual {
    skip: usize,
    rows: Tensor,
    owned: bool,
}

impl Residual {
    fn embedded(rows: Tensor) -> Self {
        Self {
            skip: 0,
            rows,
            owned: true,
        }
    }
}

/// What one packed forward runs beyond its plan: an overlay's replacement tensors, and the LoRA
/// adapters of its rows.
#[derive(Default)]
pub struct Extras<'a> {
    pub overlay: Option<&'a overlay::ModelOverlay>,
    pub lora: StepLora,
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
        // The LM head returns f32 logits whatever the weights' dtype (bf16 logits would round
        // a logit of 20 to steps of 0.125 nats and flip near-tied argmaxes); on CUDA bf16 it
        // reads the bf16 weights once (GemmEx, f32 accumulation and output).
        let final_norm = norm(vb, &cfg, "model.norm")?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed.clone()
        } else {
            get(vb, &[cfg.vocab_size, cfg.hidden_size], "lm_head.weight")?
        };
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
    /// returns the final-normed hidden states `[T, hidden]` in the step's activation dtype. With
    /// `start = (depth, x)` the rows begin as `x`, the residual stream after the plan's first
    /// `depth` positions (whose keys and values the cache already holds), and run the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_hidden<'t>(
        &self,
        plan: &LayerPlan,
        tokens: &[u32],
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        extras: &Extras<'_>,
        tap: Option<&mut (dyn LayerTap + 't)>,
        start: Option<(usize, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let overlay = extras.overlay;
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| (c.start..c.start + c.len).map(|p| p as u32))
            .collect();
        let rope = self
            .rope
            .gather(&Tensor::new(positions.as_slice(), &self.device)?)?;
        let residual = match start {
            Some((skip, x)) => Residual {
                skip,
                rows: x.clone(),
                owned: false,
            },
            None => {
                let ids = Tensor::new(tokens, &self.device)?;
                Residual::embedded(self.embed_rows(&ids, overlay)?)
            }
        };
        phase(&self.device, "begin_step", || {
            cache.begin_step(chunks, plan.layers().len())
        })?;
        self.run_layers(plan, residual, &rope, chunks, cache, extras, tap)
    }

    /// The layers of a decode-only step whose inputs are already on the device: token ids and
    /// positions `[rows]` u32, and a cache whose step was begun
    /// ([`KvCache::begin_padded_decode`](crate::engine::kv::KvCache)). No host data is read, so
    /// the launches can be captured into a CUDA graph and replayed with new inputs.
    pub fn decode_hidden(
        &self,
        plan: &LayerPlan,
        (ids, positions): (&Tensor, &Tensor),
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        lora: StepLora,
    ) -> candle_core::Result<Tensor> {
        let rope = self.rope.gather(positions)?;
        let x = Residual::embedded(self.embed_rows(ids, None)?);
        let extras = Extras {
            overlay: None,
            lora,
        };
        self.run_layers(plan, x, &rope, chunks, cache, &extras, None)
    }

    /// Runs the plan's layers from the residual's position on and returns the final-normed
    /// hidden states in the step's activation dtype.
    #[allow(clippy::too_many_arguments)]
    fn run_layers<'t>(
        &self,
        plan: &LayerPlan,
        residual: Residual,
        (cos, sin): &(Tensor, Tensor),
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
        extras: &Extras<'_>,
        mut tap: Option<&mut (dyn LayerTap + 't)>,
    ) -> candle_core::Result<Tensor> {
        let overlay = extras.overlay;
        let act = activation_dtype(self.dtype, chunks);
        let exact = exact_rows(chunks);
        let gemm_in = gemm_input_dtype(self.dtype, act, &exact);
        phase_times::set_step_kind(if decode_only(chunks) {
            "decode"
        } else {
            "prefill"
        });
        let Residual {
            skip,
            rows: mut x,
            owned,
        } = residual;
        // Rows this loop owns are updated in place, unless a tap reads each layer's input
        // afterwards or scored rows take their residual adds compensated (the lo term's GEMM
        // adds after the hi term's: kept as the sum of both, as before).
        let in_place = owned && tap.is_none() && (decode_only(chunks) || exact.runs().is_empty());
        for (plan_pos, &layer) in plan.layers().iter().enumerate().skip(skip) {
            let at = LayerAt {
                plan_pos,
                layer,
                act,
                gemm_in,
                exact: &exact,
                lora: &extras.lora,
                in_place,
            };
            let weights = overlay
                .and_then(|o| o.layer(layer))
                .unwrap_or(&self.layers[layer]);
            x = match tap.as_deref_mut() {
                Some(tap) => {
                    let y = weights.forward(x.clone(), (cos, sin), chunks, cache, at)?;
                    tap.observe(layer, &x, &y)?;
                    y
                }
                None => weights.forward(x, (cos, sin), chunks, cache, at)?,
            };
        }
        let final_norm = overlay
            .and_then(|o| o.final_norm.as_ref())
            .unwrap_or(&self.final_norm);
        phase(&self.device, "norms", || final_norm.forward(&x, act))
    }

    /// The residual stream's first rows: the tokens' embeddings in f32 (scaled for Gemma2).
    fn embed_rows(
        &self,
        ids: &Tensor,
        overlay: Option<&overlay::ModelOverlay>,
    ) -> candle_core::Result<Tensor> {
        let embed = overlay
            .and_then(|o| o.embed.as_ref())
            .unwrap_or(&self.embed);
        let x = gather_rows(embed, ids)?;
        match self.embed_scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }

    /// Logits `[rows, vocab]` in f32 for final-normed hidden rows (bf16 rows in one GEMM, f32
    /// rows compensated where `exact`, see [`linear_rows`]), through the overlay's LM head when
    /// it has one.
    pub fn logits(
        &self,
        hidden: &Tensor,
        overlay: Option<&overlay::ModelOverlay>,
        exact: &ExactRows,
    ) -> candle_core::Result<Tensor> {
        let head = overlay
            .and_then(|o| o.lm_head.as_ref())
            .unwrap_or(&self.lm_head);
        let logits = phase(&self.device, "lm_head gemm", || {
            linear_rows(hidden, head, None, exact)
        })?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}
