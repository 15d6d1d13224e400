//! The `pruneserve` command line's arguments (clap): one struct per larger subcommand, whose
//! handler in main.rs takes it whole.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use pruneserve::engine::kv::fp8::KvCacheDtype;
use pruneserve::finetune::FinetuneArgs;
use pruneserve::importance::{self, Metric};
use pruneserve::loaded::{ComputeDtype, DeviceKind, SamplerPlace};
use pruneserve::plan::{parse_layer_list, PlanSpec};

#[derive(Parser)]
#[command(
    name = "pruneserve",
    version,
    about = "OpenAI-compatible server for layer-pruned LLMs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum WeightDtype {
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
pub struct LayerSelection {
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
    pub fn spec(&self) -> Result<PlanSpec> {
        Ok(match (&self.drop, &self.keep, self.reverse) {
            (Some(d), _, _) => PlanSpec::Drop(parse_layer_list(d)?),
            (_, Some(k), _) => PlanSpec::Keep(parse_layer_list(k)?),
            (_, _, Some(r)) => PlanSpec::Reverse(r),
            _ => bail!("give one of --drop, --keep, --reverse"),
        })
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve base models and their variants over the OpenAI API.
    Serve(ServeArgs),
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
    InitRandom(InitRandomArgs),
    /// Write a seeded random PEFT LoRA adapter shaped for a model (tests and GPU benchmarks).
    InitLora(InitLoraArgs),
    /// Check the CUDA engine on this machine against the CPU one (tiny random models and SmolLM2).
    Selftest(SelftestArgs),
    /// Score layers for pruning (Block Influence, angular distance) over a calibration set and
    /// suggest a drop set; the server offers the same as POST /v1/layer_importance.
    Influence(InfluenceArgs),
    /// Engine throughput without HTTP: prefill and decode tok/s at several batch sizes, full vs
    /// reverse-pruned plan (CPU f32, or CUDA bf16 with the paged cache). With
    /// PRUNESERVE_PHASE_TIMES=1 each figure is followed by where the step time went.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model directory or hub id (default: the imported SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<String>,
    /// Name the base is served under (default: the directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Variants: `NAME=drop:22-29`, `NAME=keep:0-21`, `NAME=reverse:0.25`, `NAME=checkpoint:DIR`;
    /// a plan (or none) may be followed by `+adapter:DIR` (PEFT LoRA) and `+overlay:DIR`.
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    /// Model manifests (TOML, see models/); instead of --model/--variant.
    #[arg(long = "manifest")]
    pub manifests: Vec<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Precision of weights and activations: auto (bf16 on CUDA, f32 on the CPU), bf16, f32
    /// (f16 is refused: the kernels are built for bf16 and f32).
    #[arg(long, value_enum, default_value_t = ComputeDtype::Auto)]
    pub dtype: ComputeDtype,
    /// Token budget of one engine step (decode tokens + prefill chunk), at least 1.
    #[arg(long, default_value_t = 2048, value_parser = at_least_one())]
    pub max_step_tokens: usize,
    /// Most prompt tokens a step carries beside decoding sequences, so a long prompt delays
    /// their next token by a bounded step (0: up to --max-step-tokens). Steps without decoding
    /// sequences take up to --max-step-tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_prefill_while_decoding: usize,
    /// KV cache capacity per base, in blocks of 16 tokens.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
    #[command(flatten)]
    pub kv_cache: KvCacheArgs,
    /// Longest sequence accepted (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Sequences (prompts × n) accepted per base at once; beyond it requests get 503 +
    /// Retry-After, and one request needing more gets 400.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// LoRA adapters loaded at once per base (a batch may mix all of them).
    #[arg(long, default_value_t = 16)]
    pub max_loras: usize,
    /// Highest LoRA rank accepted (1 to 512, as vLLM's choices: the CUDA kernels hold a
    /// packed q|k|v rank of up to 1,536 in shared memory).
    #[arg(long, default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    pub max_lora_rank: usize,
    /// Compute shared work once (CPU engine): keep finished sequences' KV and prompt logprobs
    /// and reuse them for prompts that start the same way (KV on any plan that runs the same
    /// layers first, logprobs on the same plan), and run the common leading layers of plans
    /// fed the same fresh prompt in one step once.
    #[arg(long)]
    pub enable_prefix_caching: bool,
    /// Engine loops per base, each with its own KV pool and requests routed to the least
    /// loaded: on CUDA one per GPU (cuda:0..N-1, each holding its own copy of the weights),
    /// on the CPU N loops sharing one copy. --max-in-flight and the KV flags are per engine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub data_parallel: u16,
    /// Admit a request only when KV for its prompt and all of its max_tokens fits, as engines
    /// without KV on demand do: nothing is ever preempted (recomputed), but far fewer
    /// sequences run at once when max_tokens is large.
    #[arg(long)]
    pub reserve_max_tokens: bool,
    /// Where sampled tokens (temperature > 0) are drawn: auto (the GPU with CUDA, the host on
    /// the CPU), host (every sampled row's logits copied off the GPU), or device (CUDA; rows
    /// with penalties or top logprobs still go to the host). Both give a seeded request the
    /// same tokens (`selftest --device cuda` checks it).
    #[arg(long, value_enum, default_value_t = SamplerPlace::Auto)]
    pub sampler: SamplerPlace,
    /// CUDA: run every decode step launch by launch instead of replaying captured CUDA graphs
    /// (as vLLM's flag).
    #[arg(long)]
    pub enforce_eager: bool,
    /// CUDA: the largest decode step (rows) replayed from a captured graph; larger steps run
    /// eagerly. Graphs are captured per plan, rows bucket (1, 2, 4, 8, multiples of 8 to 64,
    /// then of 32) and context bucket (powers of two from 256) on their second use.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_cudagraph_batch: u16,
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "PRUNESERVE_API_KEY")]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub finetune: FinetuneArgs,
}

#[derive(clap::Args)]
pub struct InitRandomArgs {
    #[arg(long)]
    pub like: PathBuf,
    pub out_dir: PathBuf,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub hidden: Option<usize>,
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub head_dim: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    /// tokenizer.json to ship (its tokenizer_config.json is copied too); default: a byte tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct InitLoraArgs {
    /// The model directory (or hub id) whose shapes the adapter takes.
    #[arg(long)]
    pub like: String,
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Comma-separated projections, or `all` (the seven).
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Standard deviation of the entries of A and B.
    #[arg(long, default_value_t = 0.02)]
    pub std: f32,
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value_t = DeviceKind::Cuda)]
    pub device: DeviceKind,
    /// The SmolLM2 directory (default: the imported default model).
    #[arg(long)]
    pub model: Option<String>,
    /// Run only the tiny-model checks; the SmolLM2 checks are reported as skipped.
    #[arg(long, conflicts_with = "model")]
    pub skip_smollm2: bool,
    /// Keep the tiny models and their prompts here (e.g. for bench/hf_bf16_error.py).
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct InfluenceArgs {
    #[arg(long)]
    pub model: Option<String>,
    /// Score a plan of the model instead of all its layers: `drop=LIST` or `keep=LIST`.
    #[arg(long)]
    pub plan: Option<String>,
    /// `gsm8k-cot` (the first 100 GSM8K test items as chain-of-thought text) or a JSONL
    /// file of {"text"} or {"question", "answer"} rows.
    #[arg(long, default_value = importance::calibration::GSM8K_COT)]
    pub calibration: String,
    /// Use only the first N calibration prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Metric::Bi)]
    pub metric: Metric,
    /// Layers to drop, K (the block size for --metric angular); default a quarter.
    #[arg(long)]
    pub drop: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Most tokens one engine step runs (prefill chunks and decode rows).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one())]
    pub step_tokens: usize,
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 8], value_parser = at_least_one())]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 128, value_parser = at_least_one())]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    #[arg(long, default_value_t = 0.25)]
    pub reverse: f64,
    /// Also measure the pruned plan with this PEFT LoRA adapter on every request.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// CUDA: launch every decode step's kernels (no CUDA graphs), as `serve --enforce-eager`.
    #[arg(long)]
    pub enforce_eager: bool,
    #[command(flatten)]
    pub kv_cache: KvCacheArgs,
}

/// The KV cache's size on CUDA and what it holds (`serve`, `bench`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct KvCacheArgs {
    /// CUDA: GiB of GPU memory for each base's paged KV pool (shared by its plan variants).
    /// Without it the pool holds --kv-blocks (bench: 4,096) blocks of 16 tokens a layer, which
    /// caps how many sequences of a large batch run at once (about 113 of 256 with 512-token
    /// prompts and 64 generated).
    #[arg(long, value_parser = positive_gib)]
    pub kv_cache_gb: Option<f64>,
    /// What the KV cache holds: auto (the model's dtype) or fp8 (E4M3 with a scale of 1, as
    /// vLLM's `--kv-cache-dtype fp8`; alias fp8_e4m3): on CUDA half the memory and the reads of
    /// bf16, with keys and values rounded to 3 mantissa bits, so logprobs move (see the README).
    /// CUDA needs --dtype bf16; the CPU engine rounds the same way and keeps f32.
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    pub kv_cache_dtype: KvCacheDtype,
}

/// A count of at least 1 (a step budget, batch size or prompt length of 0 makes no progress or
/// no figure).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// `--kv-cache-gb`: a positive, finite number of GiB (0, a negative or NaN would size the pool
/// to nothing).
fn positive_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!("expected a positive number of GiB, got {s:?}")),
    }
}
