//! `prune`: writes a pruned checkpoint the way mergekit passthrough does (kept layers renumbered
//! 0..N-1, `num_hidden_layers = N`), with per-layer attention kinds following the kept layers and a
//! lineage sidecar recording where they came from.

use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::Device;
use serde_json::json;

use super::config::layer_type_names;
use super::lineage::{Lineage, LINEAGE_FILE};
use super::writer::CheckpointWriter;
use super::{CheckpointError, ModelDir};
use crate::plan::PlanSpec;

/// Files copied verbatim from the base directory.
const SIDE_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Writes the pruned model of `base` under `spec` to `out_dir`; returns the kept base layers.
pub fn prune_checkpoint(
    base: &ModelDir,
    base_id: &str,
    spec: &PlanSpec,
    out_dir: &Path,
) -> Result<Vec<usize>, CheckpointError> {
    let cfg = &base.config;
    let plan = spec
        .resolve(cfg.num_hidden_layers)
        .map_err(CheckpointError::LayerList)?;
    let kept = plan.layers().to_vec();
    // SAFETY: read-only mapping of the base weights for the duration of the copy.
    let st = unsafe { MmapedSafetensors::multi(&base.weight_files)? };
    let mut writer = CheckpointWriter::create(out_dir)?;
    let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    names.sort();
    for name in names {
        let new_name = match name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        {
            Some((idx, rest)) => {
                let idx: usize = idx.parse().map_err(|_| {
                    CheckpointError::Config(format!("unexpected tensor name `{name}`"))
                })?;
                match kept.iter().position(|&k| k == idx) {
                    Some(new_idx) => format!("model.layers.{new_idx}.{rest}"),
                    None => continue,
                }
            }
            None => name.clone(),
        };
        writer.add(new_name, st.load(&name, &Device::Cpu)?)?;
    }
    let mut raw = cfg.raw.clone();
    raw["num_hidden_layers"] = json!(kept.len());
    let kinds: Vec<_> = kept.iter().map(|&i| cfg.layer_attention[i]).collect();
    let uniform = kinds.windows(2).all(|w| w[0] == w[1]);
    if raw.get("layer_types").is_some() || !uniform {
        raw["layer_types"] = json!(layer_type_names(&kinds));
    }
    writer.add_json("config.json", &raw)?;
    for f in SIDE_FILES {
        writer.copy_if_exists(&base.path, f)?;
    }
    let lineage = Lineage {
        base_model: base_id.to_string(),
        base_num_layers: cfg.num_hidden_layers,
        dropped_layers: plan.dropped(),
        kept_layers: kept.clone(),
    };
    writer.add_json(
        LINEAGE_FILE,
        &serde_json::to_value(&lineage).map_err(|e| CheckpointError::Config(e.to_string()))?,
    )?;
    writer.finish()?;
    Ok(kept)
}
