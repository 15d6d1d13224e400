//! `merge`: writes a checkpoint with a PEFT LoRA adapter merged into its weights,
//! `W + scale · B · A` (in f32, stored in the checkpoint's own dtype), everything else copied;
//! the form the paper evaluated. A pruned checkpoint keeps its lineage sidecar.
//!
//! Which layers: merged into the model the adapter was trained on (a pruned checkpoint, by its own
//! layer numbers), or into the base of that pruned checkpoint through the adapter's lineage.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use super::lineage::{Lineage, LINEAGE_FILE};
use super::writer::CheckpointWriter;
use super::{CheckpointError, ModelDir};
use crate::engine::adapters::{AdapterError, AdapterWeights, Onto};

/// Files copied verbatim from the model directory.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    LINEAGE_FILE,
];

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the adapter was trained on base layers {adapter:?}, the model is a pruned checkpoint of base layers {model:?}")]
    Lineage {
        adapter: Vec<usize>,
        model: Vec<usize>,
    },
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
}

/// Writes `model` with the adapter of `adapter_dir` merged to `out_dir`; returns the number of
/// weights changed.
pub fn merge_adapter(
    model: &ModelDir,
    adapter_dir: &Path,
    out_dir: &Path,
) -> Result<usize, MergeError> {
    let cfg = &model.config;
    let onto = match &model.lineage {
        Some(pruned) => {
            if let Some(trained) = Lineage::read(adapter_dir)? {
                if trained.kept_layers != pruned.kept_layers {
                    return Err(MergeError::Lineage {
                        adapter: trained.kept_layers,
                        model: pruned.kept_layers.clone(),
                    });
                }
            }
            Onto::SameModel
        }
        None => Onto::Base,
    };
    let weights = AdapterWeights::read(adapter_dir, cfg, usize::MAX, onto)?;
    // SAFETY: read-only mapping of the model's weights for the duration of the copy.
    let st = unsafe { MmapedSafetensors::multi(&model.weight_files)? };
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    let mut writer = CheckpointWriter::create(out_dir)?;
    let mut merged = 0;
    for name in names {
        let mut t = st.load(&name, &Device::Cpu)?;
        if let Some(w) = delta_for(&weights, &name) {
            let dtype = t.dtype();
            t = (t.to_dtype(DType::F32)? + w.merged_delta()?)?.to_dtype(dtype)?;
            merged += 1;
        }
        writer.add(name, t)?;
    }
    writer.add_json("config.json", &cfg.raw)?;
    for f in SIDE_FILES {
        writer.copy_if_exists(&model.path, f)?;
    }
    writer.finish()?;
    Ok(merged)
}

/// The adapter's module for a weight named like `model.layers.3.self_attn.q_proj.weight`.
fn delta_for<'a>(
    weights: &'a AdapterWeights,
    name: &str,
) -> Option<&'a crate::engine::adapters::ModuleWeights> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = tail.strip_suffix(".weight")?.rsplit('.').next()?;
    weights
        .layers
        .get(layer)?
        .iter()
        .find(|(m, _)| m.name() == module)
        .map(|(_, w)| w)
}
