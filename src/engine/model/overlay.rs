//! Overlays: replacement tensors for some of a base's tensors (HF names: `lm_head.weight`,
//! `model.norm.weight`, `model.embed_tokens.weight`, `model.layers.{i}.…`), e.g. the last kept
//! layers and the LM head fully finetuned after pruning. Every tensor the overlay does not name is
//! the base's own (shared, not copied); a layer with any of q/k/v (or gate/up) replaced holds its
//! own packed q|k|v (gate|up) weight, since the engine runs those as one GEMM.
//!
//! An overlay written against a pruned checkpoint (layers renumbered, a lineage sidecar beside
//! it) is mapped onto base layers through that lineage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{DecoderLayer, DecoderModel, RmsNorm};
use crate::checkpoint::{Family, Lineage};

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("{0}: no *.safetensors files")]
    Empty(PathBuf),
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: candle_core::Error,
    },
    #[error("tensor `{0}` is not a tensor of this model")]
    Unknown(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}`: layer {layer} is out of range ({layers} layers)")]
    LayerOutOfRange {
        name: String,
        layer: usize,
        layers: usize,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
}

/// What `/v1/models` shows of an overlay.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayInfo {
    pub path: String,
    /// The tensors it replaces, by base name.
    pub tensors: Vec<String>,
    /// Memory it holds of its own (replaced tensors and re-packed projections).
    pub bytes: usize,
}

/// A loaded overlay, on the model's device in its dtype.
pub struct ModelOverlay {
    pub info: OverlayInfo,
    /// Indexed by base layer.
    layers: Vec<Option<DecoderLayer>>,
    pub(super) embed: Option<Tensor>,
    pub(super) final_norm: Option<RmsNorm>,
    pub(super) lm_head: Option<Tensor>,
}

impl std::fmt::Debug for ModelOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelOverlay")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl ModelOverlay {
    pub(super) fn layer(&self, layer: usize) -> Option<&DecoderLayer> {
        self.layers.get(layer).and_then(Option::as_ref)
    }
}

/// Checks a tensor's shape and puts it on the model's device in a dtype.
type Place<'a> = dyn Fn(&str, &Tensor, &[usize], DType) -> Result<Tensor, OverlayError> + 'a;

/// Replaces rows `at..at + t.rows` of a packed weight (or bias) with `t`.
fn repack(packed: &Tensor, parts: &[(usize, Option<Tensor>)]) -> candle_core::Result<Tensor> {
    let mut at = 0;
    let mut pieces = Vec::with_capacity(parts.len());
    for (rows, replacement) in parts {
        pieces.push(match replacement {
            Some(t) => t.clone(),
            None => packed.narrow(0, at, *rows)?,
        });
        at += rows;
    }
    Tensor::cat(&pieces, 0)
}

impl DecoderModel {
    /// Reads an overlay directory (every `*.safetensors` in it), checked against this model.
    pub fn load_overlay(&self, dir: &Path) -> Result<ModelOverlay, OverlayError> {
        if !dir.is_dir() {
            return Err(OverlayError::NotADirectory(dir.to_path_buf()));
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| OverlayError::Read {
                path: dir.to_path_buf(),
                error: e.into(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(OverlayError::Empty(dir.to_path_buf()));
        }
        let lineage = Lineage::read(dir)?;
        let mut tensors = BTreeMap::new();
        for f in &files {
            let read = candle_core::safetensors::load(f, &Device::Cpu).map_err(|error| {
                OverlayError::Read {
                    path: f.clone(),
                    error,
                }
            })?;
            for (name, t) in read {
                tensors.insert(self.base_name(&name, lineage.as_ref())?, t);
            }
        }
        self.overlay_from(dir, tensors)
    }

    /// A tensor's name in the base: layer indices of a pruned checkpoint mapped through its
    /// lineage.
    fn base_name(&self, name: &str, lineage: Option<&Lineage>) -> Result<String, OverlayError> {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            return Ok(name.to_string());
        };
        let (idx, tail) = rest
            .split_once('.')
            .ok_or_else(|| OverlayError::Unknown(name.to_string()))?;
        let i: usize = idx
            .parse()
            .map_err(|_| OverlayError::Unknown(name.to_string()))?;
        let layers = lineage.map_or(self.cfg.num_hidden_layers, |l| l.kept_layers.len());
        let base = match lineage {
            Some(l) => l.kept_layers.get(i).copied(),
            None => (i < layers).then_some(i),
        }
        .ok_or(OverlayError::LayerOutOfRange {
            name: name.to_string(),
            layer: i,
            layers,
        })?;
        Ok(format!("model.layers.{base}.{tail}"))
    }

    fn overlay_from(
        &self,
        dir: &Path,
        tensors: BTreeMap<String, Tensor>,
    ) -> Result<ModelOverlay, OverlayError> {
        let cfg = &self.cfg;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let place = |name: &str,
                     t: &Tensor,
                     shape: &[usize],
                     dtype: DType|
         -> Result<Tensor, OverlayError> {
            if t.dims() != shape {
                return Err(OverlayError::Shape {
                    name: name.to_string(),
                    got: t.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
        };
        let mut out = ModelOverlay {
            info: OverlayInfo {
                path: dir.to_string_lossy().into_owned(),
                tensors: tensors.keys().cloned().collect(),
                bytes: 0,
            },
            layers: vec![None; cfg.num_hidden_layers],
            embed: None,
            final_norm: None,
            lm_head: None,
        };
        let mut per_layer: BTreeMap<usize, BTreeMap<String, Tensor>> = BTreeMap::new();
        for (name, t) in &tensors {
            match name.as_str() {
                "model.embed_tokens.weight" => {
                    out.embed = Some(place(name, t, &[v, h], self.dtype)?)
                }
                "lm_head.weight" => out.lm_head = Some(place(name, t, &[v, h], self.dtype)?),
                "model.norm.weight" => {
                    out.final_norm = Some(self.norm_of(&place(name, t, &[h], DType::F32)?)?)
                }
                _ => {
                    let rest = name
                        .strip_prefix("model.layers.")
                        .and_then(|r| r.split_once('.'))
                        .ok_or_else(|| OverlayError::Unknown(name.clone()))?;
                    let layer: usize = rest
                        .0
                        .parse()
                        .map_err(|_| OverlayError::Unknown(name.clone()))?;
                    per_layer
                        .entry(layer)
                        .or_default()
                        .insert(rest.1.to_string(), t.clone());
                }
            }
        }
        // A tied LM head follows a replaced embedding.
        if out.lm_head.is_none() && cfg.tie_word_embeddings {
            out.lm_head = out.embed.clone();
        }
        for (layer, parts) in per_layer {
            out.layers[layer] = Some(self.overlaid_layer(layer, parts, &place)?);
        }
        out.info.bytes = self.overlay_bytes(&out);
        Ok(out)
    }

    fn norm_of(&self, w: &Tensor) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm {
            alpha: if self.cfg.family == Family::Gemma2 {
                (w + 1.0)?
            } else {
                w.clone()
            },
            eps: self.cfg.rms_norm_eps as f32,
        })
    }

    /// Base layer `layer` with `parts` (names relative to the layer) replaced.
    fn overlaid_layer(
        &self,
        layer: usize,
        mut parts: BTreeMap<String, Tensor>,
        place: &Place<'_>,
    ) -> Result<DecoderLayer, OverlayError> {
        let cfg = &self.cfg;
        let (h, hd, im) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut l = self.layers[layer].clone();
        let mut take = |tail: &str, shape: &[usize], dtype: DType| {
            let name = format!("model.layers.{layer}.{tail}");
            parts
                .remove(tail)
                .map(|t| place(&name, &t, shape, dtype))
                .transpose()
        };
        let (wq, wk, wv) = (
            take("self_attn.q_proj.weight", &[q, h], self.dtype)?,
            take("self_attn.k_proj.weight", &[kv, h], self.dtype)?,
            take("self_attn.v_proj.weight", &[kv, h], self.dtype)?,
        );
        if wq.is_some() || wk.is_some() || wv.is_some() {
            l.attn.qkv = repack(&l.attn.qkv, &[(q, wq), (kv, wk), (kv, wv)])?;
        }
        let (bq, bk, bv) = (
            take("self_attn.q_proj.bias", &[q], DType::F32)?,
            take("self_attn.k_proj.bias", &[kv], DType::F32)?,
            take("self_attn.v_proj.bias", &[kv], DType::F32)?,
        );
        if let (Some(b), true) = (
            &l.attn.qkv_bias,
            bq.is_some() || bk.is_some() || bv.is_some(),
        ) {
            l.attn.qkv_bias = Some(repack(b, &[(q, bq), (kv, bk), (kv, bv)])?);
        }
        if let Some(o) = take("self_attn.o_proj.weight", &[h, q], self.dtype)? {
            l.attn.o = o;
        }
        let (wg, wu) = (
            take("mlp.gate_proj.weight", &[im, h], self.dtype)?,
            take("mlp.up_proj.weight", &[im, h], self.dtype)?,
        );
        if wg.is_some() || wu.is_some() {
            l.mlp.gate_up = repack(&l.mlp.gate_up, &[(im, wg), (im, wu)])?;
        }
        if let Some(d) = take("mlp.down_proj.weight", &[h, im], self.dtype)? {
            l.mlp.down = d;
        }
        let gemma = cfg.family == Family::Gemma2;
        let mut norm = |tail: &str| -> Result<Option<RmsNorm>, OverlayError> {
            take(&format!("{tail}.weight"), &[h], DType::F32)?
                .map(|w| self.norm_of(&w).map_err(OverlayError::from))
                .transpose()
        };
        if let Some(n) = norm("input_layernorm")? {
            l.attn_in_norm = n;
        }
        if let Some(n) = norm("post_attention_layernorm")? {
            if gemma {
                l.attn_out_norm = Some(n);
            } else {
                l.mlp_in_norm = n;
            }
        }
        if gemma {
            if let Some(n) = norm("pre_feedforward_layernorm")? {
                l.mlp_in_norm = n;
            }
            if let Some(n) = norm("post_feedforward_layernorm")? {
                l.mlp_out_norm = Some(n);
            }
        }
        if let Some(tail) = parts.keys().next() {
            return Err(OverlayError::Unknown(format!(
                "model.layers.{layer}.{tail}"
            )));
        }
        Ok(l)
    }

    /// Bytes of the tensors an overlay holds that the base does not share.
    fn overlay_bytes(&self, o: &ModelOverlay) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut bytes = [&o.embed, &o.lm_head]
            .into_iter()
            .flatten()
            .map(size)
            .sum::<usize>();
        if o.lm_head.is_some() && o.embed.is_some() && self.cfg.tie_word_embeddings {
            bytes -= o.embed.as_ref().map_or(0, size);
        }
        for (mine, base) in o.layers.iter().zip(&self.layers) {
            let Some(l) = mine else { continue };
            let pairs = [
                (&l.attn.qkv, &base.attn.qkv),
                (&l.attn.o, &base.attn.o),
                (&l.mlp.gate_up, &base.mlp.gate_up),
                (&l.mlp.down, &base.mlp.down),
            ];
            bytes += pairs
                .into_iter()
                .filter(|(a, b)| a.id() != b.id())
                .map(|(a, _)| size(a))
                .sum::<usize>();
        }
        bytes
    }
}
