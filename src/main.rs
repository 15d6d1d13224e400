//! `pruneserve` command line: serve, import-gguf, prune, merge, init-random, init-lora, selftest,
//! influence, bench.

mod cli_args;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use pruneserve::api::validation::Validator;
use pruneserve::api::{self, AppState};
use pruneserve::checkpoint::{self, ModelDir};
use pruneserve::engine::adapters::peft::PROJECTION_NAMES;
use pruneserve::engine::adapters::LoraAdapter;
use pruneserve::finetune::{FineTuning, FinetuneArgs};
use pruneserve::importance::{self, Metric};
use pruneserve::loaded::{ComputeDtype, DeviceKind, LoadedModel, SamplerPlace};
use pruneserve::metrics::Metrics;
use pruneserve::plan::{parse_layer_list, LayerPlan, PlanSpec};
use pruneserve::serve;

#[derive(Parser)]
#[command(
    name = "pruneserve",
    version,
    about = "OpenAI-compatible server for layer-pruned LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightDtype {
    F32,
    Bf16,
}

impl From<WeightDtype> for DType {
    fn from(d: WeightDtype) -> Self {
        match d {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct LayerSelection {
    /// Layers to drop, e.g. `22-29` or `3,5,7-9`.
    #[arg(long)]
    drop: Option<String>,
    /// Layers to keep, in order.
    #[arg(long)]
    keep: Option<String>,
    /// Drop the last fraction of layers (round(f * layers)).
    #[arg(long)]
    reverse: Option<f64>,
}

impl LayerSelection {
    fn spec(&self) -> Result<PlanSpec> {
        Ok(match (&self.drop, &self.keep, self.reverse) {
            (Some(d), _, _) => PlanSpec::Drop(parse_layer_list(d)?),
            (_, Some(k), _) => PlanSpec::Keep(parse_layer_list(k)?),
            (_, _, Some(r)) => PlanSpec::Reverse(r),
            _ => bail!("give one of --drop, --keep, --reverse"),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve base models and their variants over the OpenAI API.
    Serve {
        /// Model directory or hub id (default: the imported SmolLM2-135M-Instruct).
        #[arg(long)]
        model: Option<String>,
        /// Name the base is served under (default: the directory name).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Variants: `NAME=drop:22-29`, `NAME=keep:0-21`, `NAME=reverse:0.25`, `NAME=checkpoint:DIR`;
        /// a plan (or none) may be followed by `+adapter:DIR` (PEFT LoRA) and `+overlay:DIR`.
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// Model manifests (TOML, see models/); instead of --model/--variant.
        #[arg(long = "manifest")]
        manifests: Vec<PathBuf>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
        /// Precision of weights and activations: auto (bf16 on CUDA, f32 on the CPU), bf16, f32
        /// (f16 is refused: the kernels are built for bf16 and f32).
        #[arg(long, value_enum, default_value_t = ComputeDtype::Auto)]
        dtype: ComputeDtype,
        /// Token budget of one engine step (decode tokens + prefill chunk).
        #[arg(long, default_value_t = 2048)]
        max_step_tokens: usize,
        /// Most prompt tokens a step carries beside decoding sequences, so a long prompt delays
        /// their next token by a bounded step (0: up to --max-step-tokens). Steps without decoding
        /// sequences take up to --max-step-tokens.
        #[arg(long, default_value_t = 2048)]
        max_prefill_while_decoding: usize,
        /// KV cache capacity per base, in blocks of 16 tokens.
        #[arg(long, default_value_t = 4096)]
        kv_blocks: usize,
        /// CUDA: GiB of GPU memory for each base's paged KV pool (shared by its plan variants).
        #[arg(long)]
        kv_cache_gb: Option<f64>,
        /// Longest sequence accepted (default: the model's max_position_embeddings).
        #[arg(long)]
        max_model_len: Option<usize>,
        /// Sequences (prompts × n) accepted per base at once; beyond it requests get 503 +
        /// Retry-After, and one request needing more gets 400.
        #[arg(long, default_value_t = 1024)]
        max_in_flight: usize,
        /// LoRA adapters loaded at once per base (a batch may mix all of them).
        #[arg(long, default_value_t = 16)]
        max_loras: usize,
        /// Highest LoRA rank accepted (1 to 512, as vLLM's choices: the CUDA kernels hold a
        /// packed q|k|v rank of up to 1,536 in shared memory).
        #[arg(long, default_value_t = 64,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
        max_lora_rank: usize,
        /// Compute shared work once (CPU engine): keep finished sequences' KV and prompt logprobs
        /// and reuse them for prompts that start the same way (KV on any plan that runs the same
        /// layers first, logprobs on the same plan), and run the common leading layers of plans
        /// fed the same fresh prompt in one step once.
        #[arg(long)]
        enable_prefix_caching: bool,
        /// Engine loops per base, each with its own KV pool and requests routed to the least
        /// loaded: on CUDA one per GPU (cuda:0..N-1, each holding its own copy of the weights),
        /// on the CPU N loops sharing one copy. --max-in-flight and the KV flags are per engine.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        data_parallel: u16,
        /// Admit a request only when KV for its prompt and all of its max_tokens fits, as engines
        /// without KV on demand do: nothing is ever preempted (recomputed), but far fewer
        /// sequences run at once when max_tokens is large.
        #[arg(long)]
        reserve_max_tokens: bool,
        /// Where sampled tokens (temperature > 0) are drawn: auto (the GPU with CUDA, the host on
        /// the CPU), host (every sampled row's logits copied off the GPU), or device (CUDA; rows
        /// with penalties or top logprobs still go to the host). Both give a seeded request the
        /// same tokens (`selftest --device cuda` checks it).
        #[arg(long, value_enum, default_value_t = SamplerPlace::Auto)]
        sampler: SamplerPlace,
        /// CUDA: run every decode step launch by launch instead of replaying captured CUDA graphs
        /// (as vLLM's flag).
        #[arg(long)]
        enforce_eager: bool,
        /// CUDA: the largest decode step (rows) replayed from a captured graph; larger steps run
        /// eagerly. Graphs are captured per plan, rows bucket (1, 2, 4, 8, multiples of 8 to 64,
        /// then of 32) and context bucket (powers of two from 256) on their second use.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1024))]
        max_cudagraph_batch: u16,
        #[arg(long, default_value_t = 32 << 20)]
        max_body_bytes: usize,
        /// Require `Authorization: Bearer KEY` on /v1/*.
        #[arg(long, env = "PRUNESERVE_API_KEY")]
        api_key: Option<String>,
        #[command(flatten)]
        finetune: FinetuneArgs,
    },
    /// Write an HF model directory from a GGUF file.
    ImportGguf {
        file: PathBuf,
        out_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
        dtype: WeightDtype,
    },
    /// Write a pruned checkpoint (layers renumbered, lineage recorded).
    Prune {
        #[arg(long)]
        model: String,
        #[command(flatten)]
        layers: LayerSelection,
        out_dir: PathBuf,
    },
    /// Write a checkpoint with a PEFT LoRA adapter merged into its weights (W + scale·B·A).
    Merge {
        /// The model the adapter was trained on (a pruned checkpoint), or its base.
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: PathBuf,
        out_dir: PathBuf,
    },
    /// Write a random-weight checkpoint shaped like a config.json, with overrides.
    InitRandom {
        #[arg(long)]
        like: PathBuf,
        out_dir: PathBuf,
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        hidden: Option<usize>,
        #[arg(long)]
        intermediate: Option<usize>,
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long)]
        kv_heads: Option<usize>,
        #[arg(long)]
        head_dim: Option<usize>,
        #[arg(long)]
        vocab: Option<usize>,
        /// tokenizer.json to ship (its tokenizer_config.json is copied too); default: a byte tokenizer.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
        dtype: WeightDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a seeded random PEFT LoRA adapter shaped for a model (tests and GPU benchmarks).
    InitLora {
        /// The model directory (or hub id) whose shapes the adapter takes.
        #[arg(long)]
        like: String,
        out_dir: PathBuf,
        #[arg(long, default_value_t = 64)]
        rank: usize,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Comma-separated projections, or `all` (the seven).
        #[arg(long, default_value = "all")]
        targets: String,
        /// Standard deviation of the entries of A and B.
        #[arg(long, default_value_t = 0.02)]
        std: f32,
        #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
        dtype: WeightDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check the CUDA engine on this machine against the CPU one (tiny random models and SmolLM2).
    Selftest {
        #[arg(long, value_enum, default_value_t = DeviceKind::Cuda)]
        device: DeviceKind,
        /// The SmolLM2 directory (default: the imported default model).
        #[arg(long)]
        model: Option<String>,
        /// Run only the tiny-model checks; the SmolLM2 checks are reported as skipped.
        #[arg(long, conflicts_with = "model")]
        skip_smollm2: bool,
        /// Keep the tiny models and their prompts here (e.g. for bench/hf_bf16_error.py).
        #[arg(long)]
        keep_dir: Option<PathBuf>,
    },
    /// Score layers for pruning (Block Influence, angular distance) over a calibration set and
    /// suggest a drop set; the server offers the same as POST /v1/layer_importance.
    Influence {
        #[arg(long)]
        model: Option<String>,
        /// Score a plan of the model instead of all its layers: `drop=LIST` or `keep=LIST`.
        #[arg(long)]
        plan: Option<String>,
        /// `gsm8k-cot` (the first 100 GSM8K test items as chain-of-thought text) or a JSONL
        /// file of {"text"} or {"question", "answer"} rows.
        #[arg(long, default_value = importance::calibration::GSM8K_COT)]
        calibration: String,
        /// Use only the first N calibration prompts.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value_t = Metric::Bi)]
        metric: Metric,
        /// Layers to drop, K (the block size for --metric angular); default a quarter.
        #[arg(long)]
        drop: Option<usize>,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Engine throughput without HTTP: prefill and decode tok/s at several batch sizes, full vs
    /// reverse-pruned plan (CPU f32, or CUDA bf16 with the paged cache). With
    /// PRUNESERVE_PHASE_TIMES=1 each figure is followed by where the step time went.
    Bench {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
        /// Most tokens one engine step runs (prefill chunks and decode rows).
        #[arg(long, default_value_t = 4096)]
        step_tokens: usize,
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8])]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        gen: usize,
        #[arg(long, default_value_t = 0.25)]
        reverse: f64,
        /// Also measure the pruned plan with this PEFT LoRA adapter on every request.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// CUDA: launch every decode step's kernels (no CUDA graphs), as `serve --enforce-eager`.
        #[arg(long)]
        enforce_eager: bool,
    },
}

/// `drop=LIST` or `keep=LIST`, as after a model name's `@`.
fn plan_argument(text: &str) -> Result<PlanSpec> {
    match text.split_once('=') {
        Some(("drop", list)) => Ok(PlanSpec::Drop(parse_layer_list(list)?)),
        Some(("keep", list)) => Ok(PlanSpec::Keep(parse_layer_list(list)?)),
        _ => bail!("--plan must be drop=LIST or keep=LIST, e.g. drop=22-29"),
    }
}

/// Loads a model (the default one without `--model`) on a device.
fn load_on(
    model: Option<String>,
    device: DeviceKind,
) -> Result<(String, LoadedModel, candle_core::Device, DType)> {
    let model_id = model_or_default(model)?;
    let (dev, dtype) = device.open()?;
    let loaded = LoadedModel::load(&model_id, &dev, dtype)?;
    Ok((model_id, loaded, dev, dtype))
}

fn model_or_default(model: Option<String>) -> Result<String> {
    Ok(serve::resolve_source(
        model.as_deref().unwrap_or("@default"),
    )?)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli_args::parse_or_exit::<Cli>()) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// The largest decode step replayed from a CUDA graph: none with `--enforce-eager`.
fn graph_rows(enforce_eager: bool, max_rows: usize) -> usize {
    if enforce_eager {
        0
    } else {
        max_rows
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            model,
            served_model_name,
            variants,
            manifests,
            host,
            port,
            device,
            dtype,
            max_step_tokens,
            max_prefill_while_decoding,
            kv_blocks,
            kv_cache_gb,
            max_model_len,
            max_in_flight,
            max_loras,
            max_lora_rank,
            enable_prefix_caching,
            data_parallel,
            reserve_max_tokens,
            sampler,
            enforce_eager,
            max_cudagraph_batch,
            max_body_bytes,
            api_key,
            finetune,
        } => {
            let entries =
                serve::entries_from_args(&manifests, model, served_model_name, &variants)?;
            let settings = serve::EngineSettings {
                device,
                dtype,
                kv_blocks,
                max_step_tokens,
                max_prefill_while_decoding,
                max_in_flight,
                max_model_len,
                kv_cache_gb,
                restart_policy: Default::default(),
                max_loras,
                max_lora_rank,
                prefix_caching: enable_prefix_caching,
                data_parallel: data_parallel.into(),
                reserve_max_tokens,
                sampler,
                cuda_graph_max_batch: graph_rows(enforce_eager, max_cudagraph_batch.into()),
            };
            let registry = Arc::new(serve::build_registry(&entries, &settings)?);
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            let finetune = FineTuning::start(&finetune, registry.clone())?;
            let state = Arc::new(AppState {
                registry,
                metrics: Arc::new(Metrics::new()?),
                api_key,
                validator: Validator::new(workers),
                finetune,
            });
            let listener = std::net::TcpListener::bind((host.as_str(), port))
                .with_context(|| format!("bind {host}:{port}"))?;
            serve::run_http(listener, api::router(state, max_body_bytes))?;
            Ok(())
        }
        Command::ImportGguf {
            file,
            out_dir,
            dtype,
        } => {
            checkpoint::gguf_import::import_gguf(&file, &out_dir, dtype.into())?;
            println!("wrote {}", out_dir.display());
            Ok(())
        }
        Command::Prune {
            model,
            layers,
            out_dir,
        } => {
            let spec = layers.spec()?;
            let base = ModelDir::resolve(&model)?;
            let kept = checkpoint::prune::prune_checkpoint(&base, &model, &spec, &out_dir)?;
            println!(
                "wrote {} with {} of {} layers",
                out_dir.display(),
                kept.len(),
                base.config.num_hidden_layers
            );
            Ok(())
        }
        Command::Merge {
            model,
            adapter,
            out_dir,
        } => {
            let dir = ModelDir::resolve(&serve::resolve_source(&model)?)?;
            let merged = checkpoint::merge::merge_adapter(&dir, &adapter, &out_dir)?;
            println!("wrote {} with {merged} weights merged", out_dir.display());
            Ok(())
        }
        Command::InitRandom {
            like,
            out_dir,
            layers,
            hidden,
            intermediate,
            heads,
            kv_heads,
            head_dim,
            vocab,
            tokenizer,
            dtype,
            seed,
        } => {
            let text = std::fs::read_to_string(&like)
                .with_context(|| format!("read {}", like.display()))?;
            let mut cfg: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("parse {}", like.display()))?;
            let overrides = [
                ("num_hidden_layers", layers),
                ("hidden_size", hidden),
                ("intermediate_size", intermediate),
                ("num_attention_heads", heads),
                ("num_key_value_heads", kv_heads),
                ("head_dim", head_dim),
                ("vocab_size", vocab),
            ];
            for (k, v) in overrides {
                if let Some(v) = v {
                    cfg[k] = serde_json::json!(v);
                }
            }
            if let (Some(n), Some(types)) = (
                layers,
                cfg.get("layer_types").and_then(|t| t.as_array()).cloned(),
            ) {
                let cycled: Vec<_> = types.iter().cycle().take(n).cloned().collect();
                cfg["layer_types"] = serde_json::json!(cycled);
            }
            checkpoint::random_init::init_random(
                cfg,
                tokenizer.as_deref(),
                dtype.into(),
                seed,
                &out_dir,
            )?;
            println!("wrote {}", out_dir.display());
            Ok(())
        }
        Command::InitLora {
            like,
            out_dir,
            rank,
            alpha,
            targets,
            std,
            dtype,
            seed,
        } => {
            let dir = ModelDir::resolve(&serve::resolve_source(&like)?)?;
            let targets: Vec<&str> = match targets.as_str() {
                "all" => PROJECTION_NAMES.to_vec(),
                list => list.split(',').map(str::trim).collect(),
            };
            let init = checkpoint::random_init::AdapterInit {
                rank,
                alpha,
                targets: &targets,
                std,
                dtype: dtype.into(),
                seed,
            };
            checkpoint::random_init::init_random_adapter(&dir.config, &init, &out_dir)?;
            println!("wrote {}", out_dir.display());
            Ok(())
        }
        Command::Selftest {
            device,
            model,
            skip_smollm2,
            keep_dir,
        } => {
            let smollm2 = if skip_smollm2 {
                println!("SKIP SmolLM2 checks (--skip-smollm2)");
                None
            } else {
                Some(model_or_default(model)?)
            };
            let checks = pruneserve::selftest::run_all(
                device,
                smollm2.as_deref(),
                keep_dir.as_deref(),
                |c| {
                    let mark = match (c.informational, c.passed) {
                        (true, _) => "INFO",
                        (false, true) => "PASS",
                        (false, false) => "FAIL",
                    };
                    println!("{mark} {}: {}", c.name, c.detail);
                },
            )?;
            let failed = checks.iter().filter(|c| !c.passed).count();
            println!(
                "selftest: {} passed, {failed} failed",
                checks.len() - failed
            );
            if failed > 0 {
                anyhow::bail!("{failed} selftest check(s) failed");
            }
            Ok(())
        }
        Command::Influence {
            model,
            plan,
            calibration,
            limit,
            metric,
            drop,
            device,
            json,
        } => {
            let (model_id, loaded, _, dtype) = load_on(model, device)?;
            let layers = loaded.dir.config.num_hidden_layers;
            let plan = match plan {
                Some(p) => plan_argument(&p)?.resolve(layers)?,
                None => LayerPlan::full(layers),
            };
            let mut texts = importance::calibration::load(&calibration)?;
            texts.truncate(limit.unwrap_or(usize::MAX));
            importance::calibration::check_texts(&texts)?;
            let bos = loaded.model.config().bos_token_id;
            let prompts =
                importance::calibration::tokenize(&texts, bos, |t| loaded.encode(t, true))?;
            let drop = drop.unwrap_or_else(|| importance::default_drop(plan.layers().len()));
            let report = importance::run_to_end(
                loaded.model.clone(),
                Arc::new(plan),
                prompts,
                metric,
                drop,
            )?;
            println!("model {model_id}, calibration {calibration}, {device:?} {dtype:?}");
            println!("{}", report.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Bench {
            model,
            device,
            step_tokens,
            batches,
            prompt_len,
            gen,
            reverse,
            adapter,
            enforce_eager,
        } => {
            let (model_id, loaded, dev, dtype) = load_on(model, device)?;
            let lora = adapter
                .map(|dir| {
                    LoraAdapter::load(&dir, &loaded.dir.config, &dev, dtype, usize::MAX)
                        .map(Arc::new)
                })
                .transpose()?;
            let shape = pruneserve::bench::Shape {
                prompt_len,
                gen,
                step_tokens,
            };
            let defaults = pruneserve::engine::EngineOptions::default();
            let opts = pruneserve::engine::EngineOptions {
                cuda_graph_max_batch: graph_rows(enforce_eager, defaults.cuda_graph_max_batch),
                ..defaults
            };
            let rows = pruneserve::bench::run(
                loaded.model.clone(),
                &batches,
                shape,
                reverse,
                lora,
                &opts,
            )?;
            println!(
                "model {model_id}, prompt {prompt_len} tokens, {gen} generated, {device:?} {dtype:?}, {} CPU threads",
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
            );
            println!("{}", pruneserve::bench::report(&rows));
            Ok(())
        }
    }
}
