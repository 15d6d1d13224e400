//! The served names: base models (weights loaded once, one engine loop each) and their variants
//! (layer plans over a base). Plan variants can be added and removed at runtime, and any request
//! may name an ad-hoc plan over a served name as `<name>@drop=<list>` or `<name>@keep=<list>`.
//!
//! Contract:
//! - Names are `[A-Za-z0-9._:-]{1,128}`, not `.` or `..` (base names may also hold `/`, as hub ids
//!   do); no name contains `@`.
//! - A variant name is unique per base and never a base's name. Two bases may each have a variant
//!   of the same name: `<base>/<variant>` always names one; the bare name names it only when one
//!   base has it (otherwise the request is refused, naming both qualified forms).
//! - An ad-hoc plan composes with the plan it is written on (`rev25@drop=3` drops layer 3 from
//!   rev25's plan; indices are always base-layer indices, and each must be in that plan), and
//!   every spelling of one plan resolves to one canonical name (sorted, compact layer list).
//! - A recovered variant is a plan plus a LoRA adapter and/or an overlay over the base's weights;
//!   only their own tensors take memory. At most `max_loras` adapters are loaded per base; one
//!   that is removed keeps serving the requests that already hold it.

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::checkpoint::Lineage;
use crate::engine::adapters::{AdapterError, AdapterInfo, LoraAdapter};
use crate::engine::model::overlay::{ModelOverlay, OverlayError, OverlayInfo};
use crate::limits::{Limits, MAX_NAME_CHARS};
use crate::loaded::LoadedModel;
use crate::plan::{LayerList, LayerPlan, PlanError, PlanSpec};
use crate::scheduler::Replicas;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model `{0}` does not exist")]
    UnknownModel(String),
    #[error("model `{0}` already exists")]
    Exists(String),
    #[error("`{0}` is a base model and cannot be removed")]
    IsBase(String),
    #[error("invalid layer plan for `{model}`: {error}")]
    Plan { model: String, error: PlanError },
    #[error("`{model}`: a plan suffix is `@drop=<list>` or `@keep=<list>`, e.g. `@drop=3,22-29`")]
    PlanSuffix { model: String },
    #[error("invalid model name `{name}`: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("`{name}` is a variant of several bases: name one of {}", .candidates.join(", "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
    #[error("adapter `{name}`: {error}")]
    Adapter {
        name: String,
        error: Box<AdapterError>,
    },
    #[error("overlay `{name}`: {error}")]
    Overlay {
        name: String,
        error: Box<OverlayError>,
    },
    #[error("`{base}` already holds {max} LoRA adapters (--max-loras); unload one first")]
    TooManyAdapters { base: String, max: usize },
    #[error("`{0}` is not a LoRA adapter")]
    NotAnAdapter(String),
}

/// A loaded base model, the engine loops that serve it and all its plan variants (one, or one per
/// device with `--data-parallel`), and the limits every request to it is held to.
pub struct Base {
    pub name: String,
    pub source: String,
    /// The weights of engine 0 (and the tokenizer and template every engine shares).
    pub model: LoadedModel,
    pub scheduler: Replicas,
    pub limits: Limits,
}

/// What a variant adds to its plan.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    pub lora: Option<Arc<LoraAdapter>>,
    pub overlay: Option<Arc<ModelOverlay>>,
}

/// Where a variant's adapter and overlay are read from.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtraDirs<'a> {
    pub adapter: Option<&'a Path>,
    pub overlay: Option<&'a Path>,
}

/// A served name that is not a base.
#[derive(Debug, Clone)]
pub struct VariantEntry {
    pub name: String,
    /// Name of the base whose weights and engine it uses.
    pub base: String,
    /// The served name it was made from (its base, or a plan variant for an adapter).
    pub parent: String,
    pub plan: Arc<LayerPlan>,
    pub extras: Extras,
    pub runtime: bool,
    /// The fine-tuning job that produced its adapter (job id, training file, hyperparameters).
    pub fine_tuning: Option<serde_json::Value>,
}

/// What a request's `model` resolves to.
pub struct Resolved {
    pub base: Arc<Base>,
    pub plan: Arc<LayerPlan>,
    pub lora: Option<Arc<LoraAdapter>>,
    pub overlay: Option<Arc<ModelOverlay>>,
    /// The one spelling of what was asked for: a served id, or `<id>@drop=<sorted list>`.
    pub name: String,
    /// An ad-hoc plan suffix changed the plan of the served name it was written on.
    pub ad_hoc: bool,
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
    /// A LoRA adapter's rank, alpha, targets, layers and memory.
    pub adapter: Option<AdapterInfo>,
    /// An overlay's replaced tensors and memory.
    pub overlay: Option<OverlayInfo>,
    /// Where a checkpoint on disk came from (the `prune` sidecar), if it did.
    pub lineage: Option<Lineage>,
    /// The fine-tuning job behind a `ft:` variant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fine_tuning: Option<serde_json::Value>,
    pub created_at_runtime: bool,
}

pub struct Registry {
    bases: Vec<Arc<Base>>,
    variants: RwLock<Vec<VariantEntry>>,
}

/// Checks a served name; `slash` allows `/` (base names, which may be hub ids).
pub fn check_name(name: &str, slash: bool) -> Result<(), RegistryError> {
    let bad = |reason| {
        Err(RegistryError::BadName {
            name: name.chars().take(MAX_NAME_CHARS).collect(),
            reason,
        })
    };
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return bad("names are 1 to 128 characters");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not names");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._:-".contains(c) || (slash && c == '/');
    if !name.chars().all(allowed) {
        return bad(if slash {
            "use letters, digits, '.', '_', ':', '-' and '/'"
        } else {
            "use letters, digits, '.', '_', ':' and '-'"
        });
    }
    Ok(())
}

impl Registry {
    /// A registry of `bases`, whose names must be valid and distinct.
    pub fn new(bases: Vec<Arc<Base>>) -> Result<Self, RegistryError> {
        for (i, b) in bases.iter().enumerate() {
            check_name(&b.name, true)?;
            if bases[..i].iter().any(|o| o.name == b.name) {
                return Err(RegistryError::Exists(b.name.clone()));
            }
        }
        Ok(Self {
            bases,
            variants: RwLock::new(Vec::new()),
        })
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

    /// Adds a variant of `base` running `spec`, with a LoRA adapter and/or an overlay read from
    /// `dirs` (startup, `POST /v1/variants`; blocking when it reads files).
    pub fn add_variant(
        &self,
        base: &str,
        name: &str,
        spec: &PlanSpec,
        dirs: ExtraDirs<'_>,
        runtime: bool,
    ) -> Result<ModelCard, RegistryError> {
        let b = self
            .base(base)
            .ok_or_else(|| RegistryError::UnknownModel(base.to_string()))?;
        let plan = spec
            .resolve(b.model.dir.config.num_hidden_layers)
            .map_err(|error| RegistryError::Plan {
                model: name.to_string(),
                error,
            })?;
        let target = Resolved {
            base: b.clone(),
            plan: Arc::new(plan),
            lora: None,
            overlay: None,
            name: base.to_string(),
            ad_hoc: false,
        };
        self.attach(name, target, dirs, runtime, None)
    }

    /// Adds a recovered variant: what `on` names (a base, a variant or an ad-hoc plan) with the
    /// LoRA adapter and/or overlay of `dirs` (`POST /v1/load_lora_adapter`; blocking).
    pub fn add_recovered(
        &self,
        name: &str,
        on: &str,
        dirs: ExtraDirs<'_>,
        runtime: bool,
    ) -> Result<ModelCard, RegistryError> {
        check_name(name, false)?;
        let target = self.resolve(on)?;
        self.attach(name, target, dirs, runtime, None)
    }

    /// Serves the adapter a fine-tuning job wrote as `name` on `on`, recording the job (blocking).
    pub fn add_fine_tuned(
        &self,
        name: &str,
        on: &str,
        adapter: &Path,
        job: serde_json::Value,
    ) -> Result<ModelCard, RegistryError> {
        check_name(name, false)?;
        let target = self.resolve(on)?;
        let dirs = ExtraDirs {
            adapter: Some(adapter),
            overlay: None,
        };
        self.attach(name, target, dirs, true, Some(job))
    }

    /// Loads the extras of `dirs` onto `target` and registers the result as `name`.
    fn attach(
        &self,
        name: &str,
        target: Resolved,
        dirs: ExtraDirs<'_>,
        runtime: bool,
        fine_tuning: Option<serde_json::Value>,
    ) -> Result<ModelCard, RegistryError> {
        check_name(name, false)?;
        let model = &target.base.model.model;
        let overlay = match dirs.overlay {
            Some(dir) => Some(Arc::new(model.load_overlay(dir).map_err(|error| {
                RegistryError::Overlay {
                    name: name.to_string(),
                    error: Box::new(error),
                }
            })?)),
            None => target.overlay.clone(),
        };
        let lora = match dirs.adapter {
            Some(dir) => {
                let adapter_err = |error| RegistryError::Adapter {
                    name: name.to_string(),
                    error: Box::new(error),
                };
                let lora = LoraAdapter::load(
                    dir,
                    model.config(),
                    model.device(),
                    model.dtype(),
                    target.base.limits.max_lora_rank,
                )
                .map_err(adapter_err)?;
                lora.check_plan(&target.plan).map_err(adapter_err)?;
                Some(Arc::new(lora))
            }
            None => target.lora.clone(),
        };
        self.insert(VariantEntry {
            name: name.to_string(),
            base: target.base.name.clone(),
            parent: target.name,
            plan: target.plan,
            extras: Extras { lora, overlay },
            runtime,
            fine_tuning,
        })
    }

    /// Registers a variant whose name is checked here and free on its base.
    fn insert(&self, entry: VariantEntry) -> Result<ModelCard, RegistryError> {
        check_name(&entry.name, false)?;
        let b = self
            .base(&entry.base)
            .ok_or_else(|| RegistryError::UnknownModel(entry.base.clone()))?;
        let qualified = format!("{}/{}", entry.base, entry.name);
        let mut variants = self.variants.write().unwrap_or_else(|e| e.into_inner());
        if self.base(&entry.name).is_some()
            || self.base(&qualified).is_some()
            || variants
                .iter()
                .any(|v| v.name == entry.name && v.base == entry.base)
        {
            return Err(RegistryError::Exists(entry.name));
        }
        if entry.extras.lora.is_some() {
            let loaded = variants
                .iter()
                .filter(|v| v.base == entry.base && v.extras.lora.is_some())
                .count();
            if loaded >= b.limits.max_loras {
                return Err(RegistryError::TooManyAdapters {
                    base: entry.base,
                    max: b.limits.max_loras,
                });
            }
        }
        variants.push(entry);
        let entry = &variants[variants.len() - 1];
        Ok(self.card_of_variant(b, entry, &variants))
    }

    /// Removes a variant (bare or `<base>/<variant>`); bases stay. With `adapters_only`, only a
    /// variant holding a LoRA adapter is removed. Requests already holding it finish on it.
    pub fn remove_variant(&self, name: &str, adapters_only: bool) -> Result<(), RegistryError> {
        if self.base(name).is_some() {
            return Err(RegistryError::IsBase(name.to_string()));
        }
        let mut variants = self.variants.write().unwrap_or_else(|e| e.into_inner());
        let i = find_variant(&variants, name)?;
        if adapters_only && variants[i].extras.lora.is_none() {
            return Err(RegistryError::NotAnAdapter(name.to_string()));
        }
        variants.remove(i);
        Ok(())
    }

    /// The cards of every variant holding a LoRA adapter.
    pub fn adapter_cards(&self) -> Vec<ModelCard> {
        self.cards()
            .into_iter()
            .filter(|c| c.adapter.is_some())
            .collect()
    }

    /// Resolves a request's `model`: a base, a variant, or `<served name>@drop=..|@keep=..`.
    pub fn resolve(&self, model: &str) -> Result<Resolved, RegistryError> {
        let Some((name, suffix)) = model.split_once('@') else {
            return self.resolve_served(model);
        };
        let parent = self.resolve_served(name)?;
        let spec = parse_plan_suffix(model, suffix)?;
        let plan = spec
            .resolve_on(&parent.plan, &parent.name)
            .map_err(|error| RegistryError::Plan {
                model: model.to_string(),
                error,
            })?;
        if plan == *parent.plan {
            return Ok(parent);
        }
        if let Some(lora) = &parent.lora {
            lora.check_plan(&plan)
                .map_err(|error| RegistryError::Adapter {
                    name: parent.name.clone(),
                    error: Box::new(error),
                })?;
        }
        Ok(Resolved {
            name: format!("{}@{}", parent.name, plan.canonical_suffix(&parent.plan)),
            base: parent.base,
            plan: Arc::new(plan),
            lora: parent.lora,
            overlay: parent.overlay,
            ad_hoc: true,
        })
    }

    /// A base or a variant by its served name (bare or qualified).
    fn resolve_served(&self, name: &str) -> Result<Resolved, RegistryError> {
        if let Some(b) = self.base(name) {
            return Ok(Resolved {
                base: b.clone(),
                plan: Arc::new(LayerPlan::full(b.model.dir.config.num_hidden_layers)),
                lora: None,
                overlay: None,
                name: b.name.clone(),
                ad_hoc: false,
            });
        }
        let variants = self.read_variants();
        let v = &variants[find_variant(&variants, name)?];
        let base = self
            .base(&v.base)
            .ok_or_else(|| RegistryError::UnknownModel(v.base.clone()))?;
        Ok(Resolved {
            base: base.clone(),
            plan: v.plan.clone(),
            lora: v.extras.lora.clone(),
            overlay: v.extras.overlay.clone(),
            name: display_id(v, &variants),
            ad_hoc: false,
        })
    }

    fn card_of_variant(&self, b: &Base, v: &VariantEntry, all: &[VariantEntry]) -> ModelCard {
        let lora = v.extras.lora.as_ref().map(|l| l.info.clone());
        let base_card = self.card_of_base(b);
        ModelCard {
            id: display_id(v, all),
            // vLLM's convention: an adapter's root is its path, its parent what it was loaded on.
            root: lora
                .as_ref()
                .map_or(base_card.root.clone(), |l| l.path.clone()),
            parent: Some(v.parent.clone()),
            kept_layers: v.plan.layers().to_vec(),
            dropped_layers: v.plan.dropped(),
            adapter: lora,
            overlay: v.extras.overlay.as_ref().map(|o| o.info.clone()),
            fine_tuning: v.fine_tuning.clone(),
            created_at_runtime: v.runtime,
            ..base_card
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
            max_model_len: b.limits.max_model_len,
            base_num_layers: cfg.num_hidden_layers,
            kept_layers: (0..cfg.num_hidden_layers).collect(),
            dropped_layers: Vec::new(),
            adapter: None,
            overlay: None,
            lineage,
            fine_tuning: None,
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
                    .map(|v| self.card_of_variant(b, v, &variants)),
            );
        }
        out
    }
}

/// The id a variant is listed and reported under: its bare name when no other base has a variant
/// of that name, else `<base>/<name>`.
fn display_id(v: &VariantEntry, all: &[VariantEntry]) -> String {
    if all.iter().any(|o| o.name == v.name && o.base != v.base) {
        format!("{}/{}", v.base, v.name)
    } else {
        v.name.clone()
    }
}

/// The index of the variant a bare or qualified name denotes.
fn find_variant(variants: &[VariantEntry], name: &str) -> Result<usize, RegistryError> {
    let bare: Vec<usize> = (0..variants.len())
        .filter(|&i| variants[i].name == name)
        .collect();
    match bare.as_slice() {
        [i] => return Ok(*i),
        [] => {}
        many => {
            return Err(RegistryError::Ambiguous {
                name: name.to_string(),
                candidates: many
                    .iter()
                    .map(|&i| format!("{}/{}", variants[i].base, name))
                    .collect(),
            })
        }
    }
    name.rsplit_once('/')
        .and_then(|(base, v)| variants.iter().position(|e| e.base == base && e.name == v))
        .ok_or_else(|| RegistryError::UnknownModel(name.to_string()))
}

/// `drop=<list>` or `keep=<list>` after a model's `@`.
fn parse_plan_suffix(model: &str, suffix: &str) -> Result<PlanSpec, RegistryError> {
    let (kind, list) = suffix
        .split_once('=')
        .ok_or_else(|| RegistryError::PlanSuffix {
            model: model.to_string(),
        })?;
    let list: LayerList = list.parse().map_err(|error| RegistryError::Plan {
        model: model.to_string(),
        error,
    })?;
    match kind {
        "drop" => Ok(PlanSpec::Drop(list)),
        "keep" => Ok(PlanSpec::Keep(list)),
        _ => Err(RegistryError::PlanSuffix {
            model: model.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in [
            "rev25",
            "a.b_c:d-e",
            "ft:smollm2:x:ftjob-1",
            &"x".repeat(128),
        ] {
            assert!(check_name(ok, false).is_ok(), "{ok}");
        }
        for bad in [".", "..", "a/b", "", "a b", "a@b", &"x".repeat(129), "é"] {
            assert!(check_name(bad, false).is_err(), "{bad:?}");
        }
        assert!(check_name("HuggingFaceTB/SmolLM2", true).is_ok());
    }

    fn entry(base: &str, name: &str) -> VariantEntry {
        VariantEntry {
            name: name.into(),
            base: base.into(),
            parent: base.into(),
            plan: Arc::new(LayerPlan::full(4)),
            extras: Extras::default(),
            runtime: false,
            fine_tuning: None,
        }
    }

    #[test]
    fn shared_variant_names_are_qualified_by_base() {
        let all = vec![
            entry("llama", "bi"),
            entry("qwen", "bi"),
            entry("qwen", "x"),
        ];
        assert!(matches!(
            find_variant(&all, "bi"),
            Err(RegistryError::Ambiguous { .. })
        ));
        assert_eq!(find_variant(&all, "qwen/bi").unwrap(), 1);
        assert_eq!(find_variant(&all, "llama/bi").unwrap(), 0);
        assert_eq!(find_variant(&all, "x").unwrap(), 2);
        assert_eq!(find_variant(&all, "qwen/x").unwrap(), 2);
        assert!(find_variant(&all, "llama/x").is_err());
        assert_eq!(display_id(&all[0], &all), "llama/bi");
        assert_eq!(display_id(&all[2], &all), "x");
    }
}
