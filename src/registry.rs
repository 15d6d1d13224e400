//! The served names: base models (weights loaded once, one engine loop each) and their variants
//! (layer plans over a base, or separate checkpoints). Plan variants can be added and removed at
//! runtime, and any request may name an ad-hoc plan as `<base>@drop=<list>` or `<base>@keep=<list>`.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::checkpoint::Lineage;
use crate::loaded::LoadedModel;
use crate::plan::{parse_layer_list, LayerPlan, PlanSpec};
use crate::scheduler::SchedulerHandle;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("model `{0}` does not exist")]
    UnknownModel(String),
    #[error("model `{0}` already exists")]
    Exists(String),
    #[error("`{0}` is a base model and cannot be removed")]
    IsBase(String),
    #[error("invalid layer plan for `{model}`: {message}")]
    Plan { model: String, message: String },
    #[error("invalid model name `{0}`: use letters, digits, '.', '_', '-' and no '@'")]
    BadName(String),
}

/// A loaded base model and the engine loop that serves it and all its plan variants.
pub struct Base {
    pub name: String,
    pub source: String,
    pub model: LoadedModel,
    pub scheduler: SchedulerHandle,
}

/// A served name that is not a base.
#[derive(Debug, Clone)]
pub struct VariantEntry {
    pub name: String,
    /// Name of the base whose weights and engine it uses.
    pub base: String,
    pub plan: Arc<LayerPlan>,
    pub adapter: Option<String>,
    pub runtime: bool,
}

/// What a request's `model` resolves to.
pub struct Resolved {
    pub base: Arc<Base>,
    pub plan: Arc<LayerPlan>,
}

/// One row of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    pub base_num_layers: usize,
    pub kept_layers: Vec<usize>,
    pub dropped_layers: Vec<usize>,
    pub adapter: Option<String>,
    /// Where a checkpoint on disk came from (the `prune` sidecar), if it did.
    pub lineage: Option<Lineage>,
    pub created_at_runtime: bool,
}

pub struct Registry {
    bases: Vec<Arc<Base>>,
    variants: RwLock<Vec<VariantEntry>>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
}

impl Registry {
    pub fn new(bases: Vec<Arc<Base>>) -> Self {
        Self {
            bases,
            variants: RwLock::new(Vec::new()),
        }
    }

    pub fn bases(&self) -> &[Arc<Base>] {
        &self.bases
    }

    fn base(&self, name: &str) -> Option<&Arc<Base>> {
        self.bases.iter().find(|b| b.name == name)
    }

    fn read_variants(&self) -> std::sync::RwLockReadGuard<'_, Vec<VariantEntry>> {
        self.variants.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a plan variant of `base` (startup or `POST /v1/variants`).
    pub fn add_variant(
        &self,
        base: &str,
        name: &str,
        spec: &PlanSpec,
        adapter: Option<String>,
        runtime: bool,
    ) -> Result<ModelCard, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_string()));
        }
        let b = self
            .base(base)
            .ok_or_else(|| RegistryError::UnknownModel(base.to_string()))?;
        let layers = b.model.dir.config.num_hidden_layers;
        let plan = spec.resolve(layers).map_err(|e| RegistryError::Plan {
            model: name.to_string(),
            message: e.0,
        })?;
        let mut variants = self.variants.write().unwrap_or_else(|e| e.into_inner());
        if self.base(name).is_some() || variants.iter().any(|v| v.name == name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let entry = VariantEntry {
            name: name.to_string(),
            base: base.to_string(),
            plan: Arc::new(plan),
            adapter,
            runtime,
        };
        let card = self.card_of_variant(b, &entry);
        variants.push(entry);
        Ok(card)
    }

    /// Removes a variant; bases stay.
    pub fn remove_variant(&self, name: &str) -> Result<(), RegistryError> {
        if self.base(name).is_some() {
            return Err(RegistryError::IsBase(name.to_string()));
        }
        let mut variants = self.variants.write().unwrap_or_else(|e| e.into_inner());
        let before = variants.len();
        variants.retain(|v| v.name != name);
        if variants.len() == before {
            return Err(RegistryError::UnknownModel(name.to_string()));
        }
        Ok(())
    }

    /// Resolves a request's `model`: a base, a variant, or `<base-or-variant>@drop=..|@keep=..`.
    pub fn resolve(&self, model: &str) -> Result<Resolved, RegistryError> {
        if let Some((name, plan_text)) = model.split_once('@') {
            let (kind, list) = plan_text
                .split_once('=')
                .ok_or_else(|| RegistryError::Plan {
                    model: model.into(),
                    message: "expected @drop=<list> or @keep=<list>".into(),
                })?;
            let layers = parse_layer_list(list).map_err(|e| RegistryError::Plan {
                model: model.into(),
                message: e.0,
            })?;
            let base = self.resolve(name)?.base;
            let spec = match kind {
                "drop" => PlanSpec::Drop(layers),
                "keep" => PlanSpec::Keep(layers),
                other => {
                    return Err(RegistryError::Plan {
                        model: model.into(),
                        message: format!("unknown plan kind `{other}`"),
                    })
                }
            };
            let plan = spec
                .resolve(base.model.dir.config.num_hidden_layers)
                .map_err(|e| RegistryError::Plan {
                    model: model.into(),
                    message: e.0,
                })?;
            return Ok(Resolved {
                base,
                plan: Arc::new(plan),
            });
        }
        if let Some(b) = self.base(model) {
            let plan = Arc::new(LayerPlan::full(b.model.dir.config.num_hidden_layers));
            return Ok(Resolved {
                base: b.clone(),
                plan,
            });
        }
        let variants = self.read_variants();
        let v = variants
            .iter()
            .find(|v| v.name == model)
            .ok_or_else(|| RegistryError::UnknownModel(model.to_string()))?;
        let base = self
            .base(&v.base)
            .ok_or_else(|| RegistryError::UnknownModel(v.base.clone()))?;
        Ok(Resolved {
            base: base.clone(),
            plan: v.plan.clone(),
        })
    }

    fn card_of_variant(&self, b: &Base, v: &VariantEntry) -> ModelCard {
        ModelCard {
            id: v.name.clone(),
            parent: Some(b.name.clone()),
            kept_layers: v.plan.layers().to_vec(),
            dropped_layers: v.plan.dropped(),
            adapter: v.adapter.clone(),
            created_at_runtime: v.runtime,
            ..self.card_of_base(b)
        }
    }

    fn card_of_base(&self, b: &Base) -> ModelCard {
        let cfg = &b.model.dir.config;
        let lineage = b.model.dir.lineage.clone();
        ModelCard {
            id: b.name.clone(),
            object: "model",
            owned_by: "pruneserve",
            root: b.source.clone(),
            parent: lineage.as_ref().map(|l| l.base_model.clone()),
            max_model_len: cfg.max_position_embeddings,
            base_num_layers: cfg.num_hidden_layers,
            kept_layers: (0..cfg.num_hidden_layers).collect(),
            dropped_layers: Vec::new(),
            adapter: None,
            lineage,
            created_at_runtime: false,
        }
    }

    /// Every served name, bases first, each followed by its variants.
    pub fn cards(&self) -> Vec<ModelCard> {
        let variants = self.read_variants();
        let mut out = Vec::new();
        for b in &self.bases {
            out.push(self.card_of_base(b));
            out.extend(
                variants
                    .iter()
                    .filter(|v| v.base == b.name)
                    .map(|v| self.card_of_variant(b, v)),
            );
        }
        out
    }
}
