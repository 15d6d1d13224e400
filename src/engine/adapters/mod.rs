//! LoRA adapters over a base's weights (PEFT format, [`peft`]), many per batch: every row of a
//! step goes through the base projection once, then each adapter's rows through its shrink
//! (`x · Aᵀ`) and expand (`· Bᵀ`, scale folded in) — Punica's split, as grouped candle GEMMs.
//!
//! Contract:
//! - An adapter's tensors are indexed by **base** layer: one trained on a pruned checkpoint (its
//!   layers renumbered `0..N-1`) is mapped through that checkpoint's lineage sidecar, and serves
//!   only on the plan it was trained on; anything that cannot be mapped is refused.
//! - The q|k|v and gate|up projections are packed in the engine, so their adapters are packed
//!   too: `A` rows concatenated, `B` block-diagonal, one shrink and one expand per group.
//! - On every device the delta is computed as [`crate::engine::ops::gemm::linear_f32`] computes
//!   projections (f32 output), so an adapter's logprobs on CPU f32 equal those of the merged
//!   weights up to rounding.

#[cfg(feature = "cuda")]
pub mod cuda;
mod delta;
#[cfg(feature = "cuda")]
mod mma;
pub mod peft;
mod step;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::checkpoint::{Lineage, ModelConfig};
use crate::plan::{format_layer_list, LayerPlan};
use delta::pack;
pub use delta::{segment_word, Delta};
use peft::{parse_tensor_name, Module, PeftConfig, TensorKey, MODULES};
pub use step::{StepLora, StepSlots, MAX_GRAPH_RANK};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("{0}: missing")]
    Missing(PathBuf),
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: candle_core::Error,
    },
    #[error("adapter_config.json: {0}")]
    Config(#[source] serde_json::Error),
    #[error("adapter_config.json: `{field}`: {detail}")]
    Unsupported { field: &'static str, detail: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: &'static str },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{module} of layer {layer}: rank {tensor} in the weights, {config} in adapter_config.json"
    )]
    ConfigRank {
        module: Module,
        layer: usize,
        tensor: usize,
        config: usize,
    },
    #[error("{module} of layer {layer} is not named by target_modules")]
    NotTargeted { module: Module, layer: usize },
    #[error("{module} of layer {layer} has only one of lora_A and lora_B")]
    Unpaired { module: Module, layer: usize },
    #[error("rank {rank} is above --max-lora-rank {max}")]
    RankAboveMax { rank: usize, max: usize },
    #[error("layer {layer} is out of range: the adapter's model has {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("no LoRA tensors in {0}")]
    Empty(PathBuf),
    #[error("the adapter was trained on a {trained}-layer model ({path}) and no lineage sidecar maps it onto this {base}-layer base")]
    Unmapped {
        trained: usize,
        path: String,
        base: usize,
    },
    #[error("the adapter's lineage is over a {lineage}-layer base, this base has {base} layers")]
    LineageBase { lineage: usize, base: usize },
    #[error(
        "the adapter was trained on base layers {trained} ({n} layers) but the plan runs {plan}"
    )]
    PlanMismatch {
        trained: String,
        n: usize,
        plan: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Compute(#[from] candle_core::Error),
}

/// One layer's deltas, in the engine's packing.
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    pub qkv: Option<Delta>,
    pub o: Option<Delta>,
    pub gate_up: Option<Delta>,
    pub down: Option<Delta>,
}

/// The engine's packed projection groups, each with one delta per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Qkv = 0,
    O = 1,
    GateUp = 2,
    Down = 3,
}

pub const GROUPS: usize = 4;

impl Group {
    pub const ALL: [Group; GROUPS] = [Group::Qkv, Group::O, Group::GateUp, Group::Down];

    /// The phase name of the group's base projection (`PRUNESERVE_PHASE_TIMES`).
    pub fn gemm_phase(self) -> &'static str {
        match self {
            Group::Qkv => "qkv gemm",
            Group::O => "o gemm",
            Group::GateUp => "gate_up gemm",
            Group::Down => "down gemm",
        }
    }

    pub fn of(self, l: &LayerLora) -> Option<&Delta> {
        match self {
            Group::Qkv => l.qkv.as_ref(),
            Group::O => l.o.as_ref(),
            Group::GateUp => l.gate_up.as_ref(),
            Group::Down => l.down.as_ref(),
        }
    }
}

/// What `/v1/models` shows of an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub path: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<&'static str>,
    /// Base layers the adapter changes.
    pub layers: Vec<usize>,
    /// Base layers of the pruned checkpoint it was trained on, when it was.
    pub trained_on_layers: Option<Vec<usize>>,
    pub bytes: usize,
}

/// A loaded adapter, on the model's device in its dtype.
#[derive(Debug)]
pub struct LoraAdapter {
    pub info: AdapterInfo,
    /// Indexed by base layer.
    layers: Vec<Option<LayerLora>>,
    /// On CUDA: each layer's slot-table entries (device pointers into `layers`), per group.
    #[cfg(feature = "cuda")]
    cuda_entries: Vec<[cuda::Entry; GROUPS]>,
}

/// One module's tensors as read (f32, CPU) and its scale.
pub struct ModuleWeights {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
}

impl ModuleWeights {
    /// `scale · B · A`, `[out, in]`: what merging adds to the module's weight.
    pub fn merged_delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }
}

/// Which model an adapter's layer indices are applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onto {
    /// The base: an adapter trained on a pruned checkpoint is mapped through its lineage.
    Base,
    /// The very model it was trained on (layer `i` is layer `i`).
    SameModel,
}

/// An adapter as read from disk, its tensors by layer of the model it is applied to.
pub struct AdapterWeights {
    pub config: PeftConfig,
    /// The pruned checkpoint's lineage, when it was trained on one.
    pub lineage: Option<Lineage>,
    pub layers: Vec<std::collections::BTreeMap<Module, ModuleWeights>>,
}

impl AdapterWeights {
    /// Reads a PEFT adapter directory for a model of config `cfg`; ranks above `max_rank` are
    /// refused.
    pub fn read(
        dir: &Path,
        cfg: &ModelConfig,
        max_rank: usize,
        onto: Onto,
    ) -> Result<Self, AdapterError> {
        if !dir.is_dir() {
            return Err(AdapterError::NotADirectory(dir.to_path_buf()));
        }
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|_| AdapterError::Missing(config_path.clone()))?;
        let config: PeftConfig = serde_json::from_str(&text).map_err(AdapterError::Config)?;
        config.check()?;
        let layers = cfg.num_hidden_layers;
        let lineage = match onto {
            Onto::Base => layer_map(dir, &config, layers)?,
            Onto::SameModel => Lineage::read(dir)?,
        };
        let mapping = lineage.as_ref().filter(|_| onto == Onto::Base);
        if let Some(l) = mapping {
            if l.base_num_layers != layers {
                return Err(AdapterError::LineageBase {
                    lineage: l.base_num_layers,
                    base: layers,
                });
            }
        }
        let own_layers = mapping.map_or(layers, |l| l.kept_layers.len());
        let to_model = |i: usize| -> Result<usize, AdapterError> {
            let out_of_range = AdapterError::LayerOutOfRange {
                layer: i,
                layers: own_layers,
            };
            match mapping {
                Some(l) => l.kept_layers.get(i).copied().ok_or(out_of_range),
                None if i < layers => Ok(i),
                None => Err(out_of_range),
            }
        };
        let modules = read_modules(dir, &config, cfg, &to_model, max_rank)?;
        Ok(Self {
            config,
            lineage,
            layers: modules,
        })
    }
}

/// The output and input widths of a module.
fn module_dims(cfg: &ModelConfig, m: Module) -> (usize, usize) {
    let (h, hd, im) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    match m {
        Module::Q => (q, h),
        Module::K | Module::V => (kv, h),
        Module::O => (h, q),
        Module::Gate | Module::Up => (im, h),
        Module::Down => (h, im),
    }
}

/// Where the adapter's own layer `i` sits in the base: through a lineage sidecar (in the adapter
/// directory, or in the checkpoint named by `base_model_name_or_path`), else one to one.
fn layer_map(
    dir: &Path,
    config: &PeftConfig,
    base_layers: usize,
) -> Result<Option<Lineage>, AdapterError> {
    if let Some(l) = Lineage::read(dir)? {
        return Ok(Some(l));
    }
    let Some(trained) = config.base_model_name_or_path.as_deref() else {
        return Ok(None);
    };
    let trained_dir = Path::new(trained);
    if !trained_dir.join("config.json").is_file() {
        return Ok(None);
    }
    if let Some(l) = Lineage::read(trained_dir)? {
        return Ok(Some(l));
    }
    let cfg = crate::checkpoint::ModelDir::open(trained_dir)?.config;
    if cfg.num_hidden_layers != base_layers {
        return Err(AdapterError::Unmapped {
            trained: cfg.num_hidden_layers,
            path: trained.to_string(),
            base: base_layers,
        });
    }
    Ok(None)
}

/// Reads the adapter's tensors, checked against the config and the model's shapes, by layer of
/// the model they are applied to.
fn read_modules(
    dir: &Path,
    config: &PeftConfig,
    cfg: &ModelConfig,
    to_model: &dyn Fn(usize) -> Result<usize, AdapterError>,
    max_rank: usize,
) -> Result<Vec<std::collections::BTreeMap<Module, ModuleWeights>>, AdapterError> {
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        return Err(AdapterError::Missing(file));
    }
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|error| {
        AdapterError::Read {
            path: file.clone(),
            error,
        }
    })?;
    let mut pairs: std::collections::BTreeMap<(usize, Module), (Option<Tensor>, Option<Tensor>)> =
        Default::default();
    for (name, t) in tensors {
        let TensorKey {
            layer,
            module,
            is_a,
        } = parse_tensor_name(&name)?;
        if !config.targets(module, layer)? {
            return Err(AdapterError::NotTargeted { module, layer });
        }
        let t = t.to_dtype(DType::F32)?;
        let (out, inp) = module_dims(cfg, module);
        let r = t.dims().get(usize::from(!is_a)).copied().unwrap_or(0);
        let expected = if is_a { vec![r, inp] } else { vec![out, r] };
        if t.dims() != expected.as_slice() {
            return Err(AdapterError::Shape {
                name,
                got: t.dims().to_vec(),
                expected,
            });
        }
        if r > max_rank {
            return Err(AdapterError::RankAboveMax {
                rank: r,
                max: max_rank,
            });
        }
        let slot = pairs.entry((layer, module)).or_default();
        if is_a {
            slot.0 = Some(t);
        } else {
            slot.1 = Some(t);
        }
    }
    if pairs.is_empty() {
        return Err(AdapterError::Empty(file));
    }
    let mut layers: Vec<std::collections::BTreeMap<Module, ModuleWeights>> = (0..cfg
        .num_hidden_layers)
        .map(|_| Default::default())
        .collect();
    for ((layer, module), pair) in pairs {
        let (Some(a), Some(b)) = pair else {
            return Err(AdapterError::Unpaired { module, layer });
        };
        let (ra, rb) = (a.dim(0)?, b.dim(1)?);
        let (r, scale) = config.rank_and_scale(module, layer)?;
        if ra != r || rb != r {
            return Err(AdapterError::ConfigRank {
                module,
                layer,
                tensor: if ra != r { ra } else { rb },
                config: r,
            });
        }
        layers[to_model(layer)?].insert(module, ModuleWeights { a, b, scale });
    }
    Ok(layers)
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory for a model of config `cfg` (by base layer), placing it
    /// on `device` in `dtype`; ranks above `max_rank` are refused.
    pub fn load(
        dir: &Path,
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
        max_rank: usize,
    ) -> Result<Self, AdapterError> {
        let weights = AdapterWeights::read(dir, cfg, max_rank, Onto::Base)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (mut bytes, mut rank) = (0, 0);
        let mut targets = BTreeSet::new();
        let mut adapted = Vec::new();
        for (layer, ms) in weights.layers.iter().enumerate() {
            if ms.is_empty() {
                layers.push(None);
                continue;
            }
            adapted.push(layer);
            for (m, w) in ms {
                targets.insert(*m);
                rank = rank.max(w.a.dim(0)?);
            }
            let group = |mods: &[Module]| -> Vec<(Module, usize, Option<&ModuleWeights>)> {
                mods.iter()
                    .map(|m| (*m, module_dims(cfg, *m).0, ms.get(m)))
                    .collect()
            };
            let l = LayerLora {
                qkv: pack(&group(&[Module::Q, Module::K, Module::V]), dtype, device)?,
                o: pack(&group(&[Module::O]), dtype, device)?,
                gate_up: pack(&group(&[Module::Gate, Module::Up]), dtype, device)?,
                down: pack(&group(&[Module::Down]), dtype, device)?,
            };
            for d in [&l.qkv, &l.o, &l.gate_up, &l.down].into_iter().flatten() {
                bytes += (d.a.elem_count() + d.b.elem_count()) * dtype.size_in_bytes();
            }
            layers.push(Some(l));
        }
        // The slot-table kernels take bf16 weights; other dtypes run as GEMMs.
        #[cfg(feature = "cuda")]
        let cuda_entries = if device.is_cuda() && dtype == DType::BF16 {
            cuda::entries(&layers)?
        } else {
            Vec::new()
        };
        Ok(Self {
            #[cfg(feature = "cuda")]
            cuda_entries,
            info: AdapterInfo {
                path: dir.to_string_lossy().into_owned(),
                r: rank,
                lora_alpha: weights.config.lora_alpha,
                use_rslora: weights.config.use_rslora,
                target_modules: MODULES
                    .iter()
                    .filter(|m| targets.contains(m))
                    .map(|m| m.name())
                    .collect(),
                layers: adapted,
                trained_on_layers: weights.lineage.map(|l| l.kept_layers),
                bytes,
            },
            layers,
        })
    }

    /// The deltas of base layer `layer`, if the adapter changes it.
    pub fn layer(&self, layer: usize) -> Option<&LayerLora> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// An adapter trained on a pruned checkpoint serves only on the plan it was trained on.
    pub fn check_plan(&self, plan: &LayerPlan) -> Result<(), AdapterError> {
        match &self.info.trained_on_layers {
            Some(kept) if kept.as_slice() != plan.layers() => Err(AdapterError::PlanMismatch {
                trained: format_layer_list(kept),
                n: kept.len(),
                plan: format_layer_list(plan.layers()),
            }),
            _ => Ok(()),
        }
    }
}
