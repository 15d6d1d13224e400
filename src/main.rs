//! `pruneserve` command line: serve, import-gguf, prune, merge, init-random, init-lora, selftest,
//! influence, bench.

mod cli_args;
mod commands;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use commands::{
    BenchArgs, Cli, Command, InfluenceArgs, InitLoraArgs, InitRandomArgs, KvCacheArgs,
    SelftestArgs, ServeArgs,
};
use pruneserve::api::validation::Validator;
use pruneserve::api::{self, AppState};
use pruneserve::checkpoint::{self, ModelDir};
use pruneserve::engine::adapters::peft::PROJECTION_NAMES;
use pruneserve::engine::adapters::LoraAdapter;
use pruneserve::finetune::FineTuning;
use pruneserve::importance;
use pruneserve::loaded::{DeviceKind, LoadedModel};
use pruneserve::metrics::Metrics;
use pruneserve::plan::{parse_layer_list, LayerPlan, PlanSpec};
use pruneserve::serve;

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
        Command::Serve(args) => serve_command(args),
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
        Command::InitRandom(args) => init_random_command(args),
        Command::InitLora(args) => init_lora_command(args),
        Command::Selftest(args) => selftest_command(args),
        Command::Influence(args) => influence_command(args),
        Command::Bench(args) => bench_command(args),
    }
}

/// `pruneserve serve`: load the bases and variants, then answer HTTP until Ctrl-C.
fn serve_command(args: ServeArgs) -> Result<()> {
    let ServeArgs {
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
        kv_cache: KvCacheArgs {
            kv_cache_gb,
            kv_cache_dtype,
        },
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
    } = args;
    let entries = serve::entries_from_args(&manifests, model, served_model_name, &variants)?;
    let settings = serve::EngineSettings {
        device,
        dtype,
        kv_blocks,
        max_step_tokens,
        max_prefill_while_decoding,
        max_in_flight,
        max_model_len,
        kv_cache_gb,
        kv_cache_dtype,
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

/// `pruneserve init-random`: a config.json with the overrides, written as a random checkpoint.
fn init_random_command(args: InitRandomArgs) -> Result<()> {
    let InitRandomArgs {
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
    } = args;
    let text =
        std::fs::read_to_string(&like).with_context(|| format!("read {}", like.display()))?;
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
    checkpoint::random_init::init_random(cfg, tokenizer.as_deref(), dtype.into(), seed, &out_dir)?;
    println!("wrote {}", out_dir.display());
    Ok(())
}

/// `pruneserve init-lora`: a seeded random PEFT adapter shaped for a model.
fn init_lora_command(args: InitLoraArgs) -> Result<()> {
    let InitLoraArgs {
        like,
        out_dir,
        rank,
        alpha,
        targets,
        std,
        dtype,
        seed,
    } = args;
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

/// `pruneserve selftest`: every check, one line each, and a failing exit when any fails.
fn selftest_command(args: SelftestArgs) -> Result<()> {
    let SelftestArgs {
        device,
        model,
        skip_smollm2,
        keep_dir,
    } = args;
    let smollm2 = if skip_smollm2 {
        println!("SKIP SmolLM2 checks (--skip-smollm2)");
        None
    } else {
        Some(model_or_default(model)?)
    };
    let checks =
        pruneserve::selftest::run_all(device, smollm2.as_deref(), keep_dir.as_deref(), |c| {
            let mark = match (c.informational, c.passed) {
                (true, _) => "INFO",
                (false, true) => "PASS",
                (false, false) => "FAIL",
            };
            println!("{mark} {}: {}", c.name, c.detail);
        })?;
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

/// `pruneserve influence`: layer importance over a calibration set, as a table (and JSON).
fn influence_command(args: InfluenceArgs) -> Result<()> {
    let InfluenceArgs {
        model,
        plan,
        calibration,
        limit,
        metric,
        drop,
        device,
        json,
    } = args;
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
    let prompts = importance::calibration::tokenize(&texts, bos, |t| loaded.encode(t, true))?;
    let drop = drop.unwrap_or_else(|| importance::default_drop(plan.layers().len()));
    let report =
        importance::run_to_end(loaded.model.clone(), Arc::new(plan), prompts, metric, drop)?;
    println!("model {model_id}, calibration {calibration}, {device:?} {dtype:?}");
    println!("{}", report.table());
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `pruneserve bench`: engine throughput without HTTP.
fn bench_command(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        model,
        device,
        step_tokens,
        batches,
        prompt_len,
        gen,
        reverse,
        adapter,
        enforce_eager,
        kv_cache: KvCacheArgs {
            kv_cache_gb,
            kv_cache_dtype,
        },
    } = args;
    let (model_id, loaded, dev, dtype) = load_on(model, device)?;
    kv_cache_dtype.check(device, dtype)?;
    let lora = adapter
        .map(|dir| {
            LoraAdapter::load(&dir, &loaded.dir.config, &dev, dtype, usize::MAX).map(Arc::new)
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
        kv_cache_dtype,
        kv_cache_bytes: kv_cache_gb.map(pruneserve::serve::gib_to_bytes),
        ..defaults
    };
    let rows = pruneserve::bench::run(loaded.model.clone(), &batches, shape, reverse, lora, &opts)?;
    println!(
        "model {model_id}, prompt {prompt_len} tokens, {gen} generated, {device:?} {dtype:?}, KV cache {}, {} CPU threads",
        kv_cache_dtype.name(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("{}", pruneserve::bench::report(&rows));
    Ok(())
}
