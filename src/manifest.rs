//! Model manifests (`models/*.toml`): base models and their named variants.
//!
//! ```toml
//! [[model]]
//! name = "smollm2-135m"
//! source = "@default"          # a directory, a hub id, or @default (the imported SmolLM2)
//! layers = 30                  # optional: checked against every variant's layer list
//!
//! [[model.variant]]
//! name = "rev25"
//! reverse = 0.25               # or drop = "22-29", or keep = "0-21"
//! adapter = "path/to/peft"     # optional PEFT LoRA adapter on the plan (or on the base alone)
//! overlay = "path/to/tensors"  # optional replacement tensors (safetensors, HF names)
//!
//! [[model.variant]]
//! name = "pruned-on-disk"
//! checkpoint = "path/to/dir"   # a separate (pruned) checkpoint
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::plan::{parse_layer_list, PlanError, PlanSpec};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("variant `{variant}`: {message}")]
    Variant { variant: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "model", default)]
    pub models: Vec<BaseEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseEntry {
    pub name: String,
    pub source: String,
    pub layers: Option<usize>,
    #[serde(rename = "variant", default)]
    pub variants: Vec<VariantEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantEntry {
    pub name: String,
    pub drop: Option<String>,
    pub keep: Option<String>,
    pub reverse: Option<f64>,
    pub adapter: Option<String>,
    pub overlay: Option<String>,
    pub checkpoint: Option<String>,
}

/// What a variant is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum VariantKind {
    /// A layer plan over the base weights, optionally with a LoRA adapter and an overlay.
    Plan {
        spec: PlanSpec,
        adapter: Option<String>,
        overlay: Option<String>,
    },
    /// A separate checkpoint directory (e.g. written by `prune`).
    Checkpoint(String),
}

impl VariantEntry {
    pub fn kind(&self) -> Result<VariantKind, ManifestError> {
        let err = |message: String| ManifestError::Variant {
            variant: self.name.clone(),
            message,
        };
        let plan_given = [
            self.drop.is_some(),
            self.keep.is_some(),
            self.reverse.is_some(),
        ];
        let n = plan_given.iter().filter(|x| **x).count();
        match (&self.checkpoint, n) {
            (Some(c), 0) if self.adapter.is_none() && self.overlay.is_none() => {
                Ok(VariantKind::Checkpoint(c.clone()))
            }
            (Some(_), _) => Err(err(
                "`checkpoint` cannot be combined with drop/keep/reverse/adapter/overlay".into(),
            )),
            (None, 1) => {
                let spec = match (&self.drop, &self.keep, self.reverse) {
                    (Some(d), _, _) => PlanSpec::Drop(
                        parse_layer_list(d).map_err(|e: PlanError| err(e.to_string()))?,
                    ),
                    (_, Some(k), _) => PlanSpec::Keep(
                        parse_layer_list(k).map_err(|e: PlanError| err(e.to_string()))?,
                    ),
                    (_, _, Some(r)) => PlanSpec::Reverse(r),
                    _ => return Err(err("give exactly one of drop, keep, reverse".into())),
                };
                Ok(VariantKind::Plan {
                    spec,
                    adapter: self.adapter.clone(),
                    overlay: self.overlay.clone(),
                })
            }
            (None, 0) if self.adapter.is_some() || self.overlay.is_some() => {
                Ok(VariantKind::Plan {
                    spec: PlanSpec::Drop(Vec::new().into()),
                    adapter: self.adapter.clone(),
                    overlay: self.overlay.clone(),
                })
            }
            _ => Err(err(
                "give exactly one of drop, keep, reverse (or checkpoint)".into(),
            )),
        }
    }
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Self, ManifestError> {
        let file = |message: String| ManifestError::File {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        let m: Manifest =
            toml::from_str(&text).map_err(|e| file(e.to_string().replace('\n', " ")))?;
        if m.models.is_empty() {
            return Err(file("no [[model]] entries".into()));
        }
        for base in &m.models {
            for v in &base.variants {
                let kind = v.kind()?;
                if let (Some(layers), VariantKind::Plan { spec, .. }) = (base.layers, &kind) {
                    spec.resolve(layers).map_err(|e| ManifestError::Variant {
                        variant: v.name.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
        }
        Ok(m)
    }
}
