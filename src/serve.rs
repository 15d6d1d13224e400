//! Builds what `pruneserve serve` runs: base models from a manifest or flags, each with its engine
//! loop, and their variants in one [`Registry`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::CheckpointError;
use crate::engine::batch::Batcher;
use crate::engine::kv::fp8::{KvCacheDtype, UnsupportedKvDtype};
use crate::engine::model::DecoderModel;
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::limits::Limits;
use crate::loaded::{ComputeDtype, DeviceKind, LoadedModel, SamplerPlace, UnsupportedDtype};
use crate::manifest::{BaseEntry, Manifest, ManifestError, VariantEntry, VariantKind};
use crate::registry::{Base, ExtraDirs, Registry, RegistryError};
use crate::scheduler::{
    BatchLoop, EngineFactory, Replica, Replicas, RestartPolicy, SchedulerHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("base `{name}`: {error}")]
    Engine { name: String, error: EngineError },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Dtype(#[from] UnsupportedDtype),
    #[error(transparent)]
    KvDtype(#[from] UnsupportedKvDtype),
}

/// Engine settings shared by every base.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub device: DeviceKind,
    /// Precision of weights and activations (`--dtype`).
    pub dtype: ComputeDtype,
    pub kv_blocks: usize,
    pub max_step_tokens: usize,
    /// Most prompt tokens of a step that also decodes (`--max-prefill-while-decoding`; 0: no cap).
    pub max_prefill_while_decoding: usize,
    pub max_in_flight: usize,
    pub max_model_len: Option<usize>,
    /// CUDA: GiB of the paged KV pool per base (default: `kv_blocks` at full depth).
    pub kv_cache_gb: Option<f64>,
    /// What the KV cache holds (`--kv-cache-dtype`).
    pub kv_cache_dtype: KvCacheDtype,
    /// When a failing engine loop gives up.
    pub restart_policy: RestartPolicy,
    /// LoRA adapters loaded at once per base, and the highest rank accepted.
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// Keep finished sequences' prompt KV for reuse (CPU engine).
    pub prefix_caching: bool,
    /// Engine loops per base (`--data-parallel`): on CUDA one per GPU (`cuda:0..N-1`), each with
    /// its own weights; on the CPU N loops over one copy of the weights.
    pub data_parallel: usize,
    /// Admit a request only when KV for its prompt and all of `max_tokens` fits (no preemption).
    pub reserve_max_tokens: bool,
    /// Where sampled tokens are drawn (`--sampler`).
    pub sampler: SamplerPlace,
    /// CUDA: the largest decode step replayed from a captured graph; 0 with `--enforce-eager`.
    pub cuda_graph_max_batch: usize,
}

/// Wraps each engine a base's loop builds (tests inject faults through it).
pub type EngineWrapper = Arc<dyn Fn(Box<dyn BatchLoop>) -> Box<dyn BatchLoop> + Send + Sync>;

/// Where `scripts/fetch-default-model.sh` puts the imported SmolLM2-135M-Instruct.
pub fn default_model_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PRUNESERVE_DEFAULT_MODEL") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/pruneserve/SmolLM2-135M-Instruct")
}

/// A manifest `source`: `@default`, `~/...`, a directory or a hub id.
pub fn resolve_source(source: &str) -> Result<String, ServeError> {
    if source == "@default" {
        let d = default_model_dir();
        if !d.join("config.json").exists() {
            return Err(ServeError::Usage(format!(
                "the default model is missing at {}: run scripts/fetch-default-model.sh",
                d.display()
            )));
        }
        return Ok(d.to_string_lossy().into_owned());
    }
    if let (Some(rest), Ok(home)) = (source.strip_prefix("~/"), std::env::var("HOME")) {
        return Ok(format!("{home}/{rest}"));
    }
    Ok(source.to_string())
}

/// `NAME=drop:22-29`, `NAME=keep:0-21`, `NAME=reverse:0.25` or `NAME=checkpoint:DIR`, where a
/// plan (or nothing: the base) may be followed by `+adapter:DIR` and/or `+overlay:DIR`
/// (`NAME=reverse:0.25+adapter:DIR`, `NAME=adapter:DIR`).
pub fn parse_variant_flag(text: &str) -> Result<VariantEntry, ServeError> {
    let usage = || {
        ServeError::Usage(format!(
            "variant `{text}` must look like NAME=drop:22-29 (drop, keep, reverse or checkpoint), optionally followed by +adapter:DIR and +overlay:DIR"
        ))
    };
    let (name, spec) = text.split_once('=').ok_or_else(usage)?;
    let mut v = VariantEntry {
        name: name.into(),
        drop: None,
        keep: None,
        reverse: None,
        adapter: None,
        overlay: None,
        checkpoint: None,
    };
    for part in spec.split('+') {
        let (kind, arg) = part.split_once(':').ok_or_else(usage)?;
        let slot = match kind {
            "drop" => &mut v.drop,
            "keep" => &mut v.keep,
            "checkpoint" => &mut v.checkpoint,
            "adapter" => &mut v.adapter,
            "overlay" => &mut v.overlay,
            "reverse" => {
                v.reverse = Some(arg.parse().map_err(|_| usage())?);
                continue;
            }
            _ => return Err(usage()),
        };
        *slot = Some(arg.into());
    }
    v.kind()?;
    Ok(v)
}

fn start_base(name: &str, source: &str, s: &EngineSettings) -> Result<Arc<Base>, ServeError> {
    s.sampler
        .on_device(s.device)
        .map_err(|e| ServeError::Usage(e.into()))?;
    let path = resolve_source(source)?;
    let dtype = s.dtype.on(s.device)?;
    let (device, _) = s.device.open()?;
    let model = LoadedModel::load(&path, &device, dtype)?;
    tracing::info!(model = name, source = %path, "weights loaded");
    start_loaded(name, source, model, s, None)
}

/// Starts the engine loops of a loaded model (one per `--data-parallel` engine) and fixes its
/// limits.
pub fn start_loaded(
    name: &str,
    source: &str,
    model: LoadedModel,
    s: &EngineSettings,
    wrap: Option<EngineWrapper>,
) -> Result<Arc<Base>, ServeError> {
    let cfg = &model.dir.config;
    s.kv_cache_dtype.check(s.device, model.model.dtype())?;
    let max_model_len = Limits::context_length(s.max_model_len, cfg.max_position_embeddings);
    let opts = EngineOptions {
        kv_blocks: s.kv_blocks,
        max_model_len: Some(max_model_len),
        kv_cache_bytes: s.kv_cache_gb.map(gib_to_bytes),
        prefix_caching: s.prefix_caching,
        // Checked by `start_base`.
        device_sampling: s.sampler.on_device(s.device).unwrap_or(false),
        cuda_graph_max_batch: s.cuda_graph_max_batch,
        kv_cache_dtype: s.kv_cache_dtype,
        ..EngineOptions::default()
    };
    let engine_err = |error| ServeError::Engine {
        name: name.to_string(),
        error,
    };
    let mut engines = Vec::new();
    for (i, decoder) in engine_weights(&model, s)?.into_iter().enumerate() {
        let factory = engine_factory(decoder.clone(), opts, s, wrap.clone());
        let scheduler = SchedulerHandle::spawn(
            factory,
            model.tokenizer.clone(),
            s.max_in_flight,
            s.restart_policy,
        )
        .map_err(engine_err)?;
        engines.push(Replica::new(
            format!("{}:{i}", s.device.name()),
            scheduler,
            decoder,
        ));
    }
    let scheduler = Replicas::new(engines);
    let limits = Limits {
        max_model_len,
        max_sequences: s.max_in_flight,
        vocab_size: cfg.vocab_size,
        max_token_bytes: model.max_token_bytes(),
        kv: scheduler.capacity(),
        max_loras: s.max_loras,
        max_lora_rank: s.max_lora_rank,
    };
    tracing::info!(
        model = name,
        engines = scheduler.len(),
        ?limits,
        "base serving"
    );
    Ok(Arc::new(Base {
        name: name.to_string(),
        source: source.to_string(),
        model,
        scheduler,
        limits,
    }))
}

/// The weights of each engine: `model`'s for engine 0; on CUDA a fresh copy on GPU `i` for engine
/// `i`, on the CPU the same copy again.
fn engine_weights(
    model: &LoadedModel,
    s: &EngineSettings,
) -> Result<Vec<Arc<DecoderModel>>, ServeError> {
    let mut weights = vec![model.model.clone()];
    for i in 1..s.data_parallel.max(1) {
        weights.push(match s.device {
            DeviceKind::Cpu => model.model.clone(),
            DeviceKind::Cuda => {
                let (device, _) = s.device.open_at(i)?;
                let copy = DecoderModel::load(&model.dir, &device, model.model.dtype())?;
                tracing::info!(engine = i, "weights loaded on cuda:{i}");
                Arc::new(copy)
            }
        });
    }
    Ok(weights)
}

/// Builds a fresh engine over `decoder`, at start and after a failure.
fn engine_factory(
    decoder: Arc<DecoderModel>,
    opts: EngineOptions,
    s: &EngineSettings,
    wrap: Option<EngineWrapper>,
) -> EngineFactory {
    let (step_tokens, reserve) = (s.max_step_tokens, s.reserve_max_tokens);
    let prefill_cap = s.max_prefill_while_decoding;
    Box::new(move || {
        let engine = Engine::for_device(decoder.clone(), &opts)?;
        let mut batcher = Batcher::new(engine, step_tokens)
            .reserving_max_tokens(reserve)
            .capping_prefill_while_decoding(prefill_cap);
        match batcher.warm_up() {
            Ok(t) if !t.is_zero() => tracing::info!(seconds = t.as_secs_f64(), "engine warmed up"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "engine warm-up failed; serving anyway"),
        }
        let batcher: Box<dyn BatchLoop> = Box::new(batcher);
        Ok(match &wrap {
            Some(w) => w(batcher),
            None => batcher,
        })
    })
}

/// Serves `router` on `listener` until Ctrl-C (blocking; builds its own runtime).
pub fn run_http(listener: std::net::TcpListener, router: axum::Router) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!("serving on http://{}", listener.local_addr()?);
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}

/// Loads every base (and checkpoint variant) and registers the plan, adapter and overlay
/// variants.
pub fn build_registry(entries: &[BaseEntry], s: &EngineSettings) -> Result<Registry, ServeError> {
    let mut bases = Vec::new();
    let mut plans = Vec::new();
    for entry in entries {
        bases.push(start_base(&entry.name, &entry.source, s)?);
        for v in &entry.variants {
            match v.kind()? {
                VariantKind::Checkpoint(dir) => bases.push(start_base(&v.name, &dir, s)?),
                VariantKind::Plan {
                    spec,
                    adapter,
                    overlay,
                } => plans.push((entry.name.clone(), v.name.clone(), spec, adapter, overlay)),
            }
        }
    }
    let registry = Registry::new(bases)?;
    for (base, name, spec, adapter, overlay) in plans {
        let (adapter, overlay) = (
            adapter.map(|a| resolve_source(&a)).transpose()?,
            overlay.map(|o| resolve_source(&o)).transpose()?,
        );
        let dirs = ExtraDirs {
            adapter: adapter.as_deref().map(Path::new),
            overlay: overlay.as_deref().map(Path::new),
        };
        registry.add_variant(&base, &name, &spec, dirs, false)?;
    }
    Ok(registry)
}

/// Base entries from `--manifest` files, or one from `--model` and `--variant` flags.
pub fn entries_from_args(
    manifests: &[PathBuf],
    model: Option<String>,
    name: Option<String>,
    variants: &[String],
) -> Result<Vec<BaseEntry>, ServeError> {
    if !manifests.is_empty() {
        if model.is_some() || !variants.is_empty() {
            return Err(ServeError::Usage(
                "give either --manifest or --model/--variant, not both".into(),
            ));
        }
        let mut out = Vec::new();
        for m in manifests {
            out.extend(Manifest::read(m)?.models);
        }
        return Ok(out);
    }
    let source = model.unwrap_or_else(|| "@default".into());
    let name = name.unwrap_or_else(|| match source.as_str() {
        "@default" => "smollm2-135m".into(),
        s => PathBuf::from(s)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.to_string()),
    });
    let variants = variants
        .iter()
        .map(|v| parse_variant_flag(v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![BaseEntry {
        name,
        source,
        layers: None,
        variants,
    }])
}

/// `--kv-cache-gb` in bytes (`serve`, `bench`).
pub fn gib_to_bytes(gb: f64) -> usize {
    (gb * f64::from(1u32 << 30)) as usize
}
