//! `pruneserve selftest --device cuda`: checks the CUDA engine on the machine it runs on against
//! the CPU f32 engine (the one the CPU test suite checks against independent references), and
//! the paged KV cache against the contiguous one on the same device.

#[cfg(feature = "cuda")]
mod decode;
#[cfg(feature = "cuda")]
mod decode_timing;
#[cfg(feature = "cuda")]
mod draw;
#[cfg(feature = "cuda")]
mod graphs;
#[cfg(feature = "cuda")]
mod layer_timing;
mod lora;
#[cfg(feature = "cuda")]
mod prefill;
mod prefix;

use std::sync::Arc;

use candle_core::{DType, Device};
use serde_json::json;

use crate::checkpoint::random_init::init_random;
use crate::checkpoint::{CheckpointError, ModelDir};
use crate::engine::adapters::LoraAdapter;
use crate::engine::batch::{Batcher, GenOutput, GenRequest};
use crate::engine::kv::fp8::KvCacheDtype;
use crate::engine::model::DecoderModel;
use crate::engine::sample::sampler::SamplingParams;
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::loaded::DeviceKind;
use crate::plan::LayerPlan;

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Usage(String),
}

/// One check's outcome, printed as a line.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// Reported figures with no pass/fail meaning (`passed` is then true).
    pub informational: bool,
    pub detail: String,
}

#[derive(Clone, Copy)]
enum CacheKind {
    Paged,
    Contiguous,
}

/// Per-request results of one batched run: prompt logprobs, generated tokens and their logprobs.
struct RunOut {
    prompt_lp: Vec<Vec<f32>>,
    tokens: Vec<Vec<u32>>,
    gen_lp: Vec<Vec<f32>>,
    /// Decode steps replayed from CUDA graphs, and graphs captured (CUDA builds).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph_replays: u64,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph_captures: u64,
}

impl RunOut {
    fn of(outs: &[GenOutput]) -> Self {
        RunOut {
            prompt_lp: outs
                .iter()
                .map(|o| o.prompt_scores.iter().map(|s| s.logprob).collect())
                .collect(),
            tokens: outs
                .iter()
                .map(|o| o.tokens.iter().map(|t| t.token).collect())
                .collect(),
            gen_lp: outs
                .iter()
                .map(|o| o.tokens.iter().map(|t| t.logprob).collect())
                .collect(),
            graph_replays: 0,
            graph_captures: 0,
        }
    }
}

fn run(
    model: &Arc<DecoderModel>,
    cache: CacheKind,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    step_tokens: usize,
) -> Result<RunOut, SelftestError> {
    run_with(model, cache, prompts, max_tokens, step_tokens, None, GREEDY)
}

/// How the requests of a run pick tokens, whether sampled ones are drawn on the device,
/// whether decode steps launch every kernel (no CUDA graphs), and what the KV cache holds.
#[derive(Clone, Copy)]
struct Picking {
    params: fn(usize) -> SamplingParams,
    on_device: bool,
    eager: bool,
    kv_dtype: KvCacheDtype,
}

const GREEDY: Picking = Picking {
    params: |_| SamplingParams::greedy(),
    on_device: false,
    eager: false,
    kv_dtype: KvCacheDtype::Auto,
};

/// Seeded sampling that exercises every truncation: top-p, top-k, min-p, a hot temperature.
fn seeded(i: usize) -> SamplingParams {
    let base = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(100 + i as u64),
        ..SamplingParams::default()
    };
    match i % 4 {
        0 => base,
        1 => SamplingParams { top_k: 40, ..base },
        2 => SamplingParams {
            top_p: 1.0,
            min_p: 0.05,
            ..base
        },
        _ => SamplingParams {
            temperature: 1.3,
            top_p: 0.5,
            ..base
        },
    }
}

/// Seeded draws on the device against the host sampler on the same engine's logits: the same
/// tokens (the kernel and the host code keep the same set and walk it the same way).
fn draw_check(
    model: &Arc<DecoderModel>,
    prompts: &[Vec<u32>],
    name: &str,
) -> Result<Check, SelftestError> {
    let steps = 32;
    let host = Picking {
        params: seeded,
        ..GREEDY
    };
    let device = Picking {
        on_device: true,
        ..host
    };
    let want = run_with(model, CacheKind::Paged, prompts, steps, 4096, None, host)?;
    let got = run_with(model, CacheKind::Paged, prompts, steps, 4096, None, device)?;
    let d = compare(&got, &want);
    Ok(Check {
        name: format!("{name}: seeded draws on the device vs the host sampler (tokens equal)"),
        passed: d.diverge.iter().all(Option::is_none) && d.generated <= 1e-4,
        informational: false,
        detail: d.describe(steps),
    })
}

/// Adapters, and which of them each request (by index) runs.
type AdapterOn<'a> = (&'a [Arc<LoraAdapter>], fn(usize) -> Option<usize>);

/// [`run`], with `lora` on the requests `on` picks.
fn run_with(
    model: &Arc<DecoderModel>,
    cache: CacheKind,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    step_tokens: usize,
    lora: Option<AdapterOn<'_>>,
    picking: Picking,
) -> Result<RunOut, SelftestError> {
    let defaults = EngineOptions::default();
    let opts = EngineOptions {
        device_sampling: picking.on_device,
        cuda_graph_max_batch: match picking.eager {
            true => 0,
            false => defaults.cuda_graph_max_batch,
        },
        kv_cache_dtype: picking.kv_dtype,
        ..defaults
    };
    let engine = match cache {
        CacheKind::Paged => Engine::for_device(model.clone(), &opts)?,
        CacheKind::Contiguous => Engine::with_contiguous_cache(model.clone(), &opts),
    };
    let plan = Arc::new(LayerPlan::full(model.config().num_hidden_layers));
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenRequest {
            plan: plan.clone(),
            overlay: None,
            lora: lora.and_then(|(l, on)| on(i).and_then(|k| l.get(k)).cloned()),
            prompt: p.clone(),
            max_tokens,
            sampling: (picking.params)(i),
            prompt_logprobs: Some(1),
            stop_token_ids: vec![],
            eos_token_ids: vec![],
            ignore_eos: true,
        })
        .collect();
    let mut batcher = Batcher::new(engine, step_tokens);
    let outs: Vec<GenOutput> = batcher
        .run_all(reqs)
        .into_iter()
        .collect::<Result<_, _>>()?;
    #[allow(unused_mut)]
    let mut out = RunOut::of(&outs);
    #[cfg(feature = "cuda")]
    {
        let stats = batcher.engine().graph_stats();
        (out.graph_replays, out.graph_captures) = (stats.replays, stats.captures);
    }
    Ok(out)
}

/// How two runs differ: max abs difference of prompt logprobs, of generated logprobs up to the
/// first differing token, and the first divergence step per request (`None`: identical).
struct Diff {
    prompt: f32,
    generated: f32,
    diverge: Vec<Option<usize>>,
}

impl Diff {
    fn max(&self) -> f32 {
        self.prompt.max(self.generated)
    }

    fn describe(&self, steps: usize) -> String {
        let d: Vec<String> = self
            .diverge
            .iter()
            .map(|d| d.map_or(format!("same {steps}"), |s| format!("differs at {s}")))
            .collect();
        format!(
            "max |dlogprob| prompt {:.2e}, generated {:.2e}; tokens: {}",
            self.prompt,
            self.generated,
            d.join(", ")
        )
    }
}

fn compare(a: &RunOut, b: &RunOut) -> Diff {
    let mut prompt = 0f32;
    let mut max = 0f32;
    let mut diverge = Vec::new();
    for i in 0..a.tokens.len() {
        for (x, y) in a.prompt_lp[i].iter().zip(&b.prompt_lp[i]) {
            prompt = prompt.max((x - y).abs());
        }
        let first = a.tokens[i]
            .iter()
            .zip(&b.tokens[i])
            .position(|(x, y)| x != y);
        let agree = first.unwrap_or(a.tokens[i].len());
        for (x, y) in a.gen_lp[i][..agree].iter().zip(&b.gen_lp[i][..agree]) {
            max = max.max((x - y).abs());
        }
        diverge.push(first);
    }
    Diff {
        prompt,
        generated: max,
        diverge,
    }
}

fn pseudo_prompts(vocab: usize, lens: &[usize]) -> Vec<Vec<u32>> {
    lens.iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 7919 + s * 104_729 + 13) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn tiny(root: &std::path::Path, arch: &str) -> Result<ModelDir, SelftestError> {
    let mut cfg = json!({
        "architectures": [arch],
        "model_type": if arch == "Gemma2ForCausalLM" { "gemma2" } else { "llama" }, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 512, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    if arch == "Gemma2ForCausalLM" {
        // Gemma2-2B's head size: the attention kernels' 256-wide path.
        cfg["head_dim"] = json!(256);
        cfg["query_pre_attn_scalar"] = json!(256);
        cfg["attn_logit_softcapping"] = json!(2.0);
        cfg["final_logit_softcapping"] = json!(5.0);
        cfg["sliding_window"] = json!(24);
        cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
    }
    let dir = root.join(arch);
    // bf16 weights, so the CPU f32 run holds exactly the same model (an exact upcast).
    init_random(cfg, None, DType::BF16, 7, &dir)?;
    Ok(ModelDir::open(&dir)?)
}

fn push(checks: &mut Vec<Check>, report: &mut impl FnMut(&Check), c: Check) {
    report(&c);
    checks.push(c);
}

/// Runs every check; `smollm2` is the default model's directory (`None`: its checks are left
/// out, and the caller says so).
/// Each check is handed to `report` as soon as it is done. With `keep_dir`, the tiny models and
/// their prompts (`prompts.json`) are written there and kept, for outside comparisons.
pub fn run_all(
    device: DeviceKind,
    smollm2: Option<&str>,
    keep_dir: Option<&std::path::Path>,
    mut report: impl FnMut(&Check),
) -> Result<Vec<Check>, SelftestError> {
    if device != DeviceKind::Cuda {
        return Err(SelftestError::Usage(
            "selftest compares the CUDA engine with the CPU one: use --device cuda".into(),
        ));
    }
    let cuda = crate::loaded::cuda_device(0)?;
    let cpu = Device::Cpu;
    let mut checks = Vec::new();
    // PRUNESERVE_SELFTEST_ONLY=draws: the device draw checks alone (kernel profiling under ncu).
    #[cfg(feature = "cuda")]
    if std::env::var("PRUNESERVE_SELFTEST_ONLY").as_deref() == Ok("draws") {
        for c in draw::draw_kernel_checks(&cuda)? {
            push(&mut checks, &mut report, c);
        }
        return Ok(checks);
    }
    let tmp = tempfile::tempdir()
        .map_err(|e| SelftestError::Usage(format!("temporary directory: {e}")))?;
    let root = keep_dir.unwrap_or(tmp.path());

    // 1. Tiny random models: CUDA bf16 (paged) vs CPU f32, and CUDA f32 paged vs CPU f32.
    for arch in ["LlamaForCausalLM", "Gemma2ForCausalLM"] {
        let dir = tiny(root, arch)?;
        // 1100 tokens: decode attention over nine 128-token partitions, merged.
        let prompts = pseudo_prompts(512, &[5, 37, 64, 100, 1100]);
        if keep_dir.is_some() {
            let path = root.join("prompts.json");
            std::fs::write(&path, json!(prompts).to_string())
                .map_err(|e| SelftestError::Usage(format!("write {}: {e}", path.display())))?;
        }
        let cpu_model = Arc::new(DecoderModel::load(&dir, &cpu, DType::F32)?);
        let want = run(&cpu_model, CacheKind::Contiguous, &prompts, 24, 64)?;
        // bf16: the scoring (prompt) logprobs of prompts prefilled in one step (every prompt
        // up to --max-step-tokens; compensated activations, only the weights are bf16) are held
        // to the limit; generated ones come from decode steps with bf16 activations and are
        // reported. Prompts prefilled in 64-token chunks attend to a bf16 KV history: reported.
        // f32: everything is held to the limit.
        let runs = [
            (DType::BF16, 2e-2f32, 4096, false),
            (DType::BF16, 2e-2, 64, true),
            (DType::F32, 1e-3, 64, false),
        ];
        for (dtype, limit, step_tokens, informational) in runs {
            let m = Arc::new(DecoderModel::load(&dir, &cuda, dtype)?);
            let got = run(&m, CacheKind::Paged, &prompts, 24, step_tokens)?;
            let d = compare(&got, &want);
            let (held, what) = match dtype {
                DType::BF16 => (d.prompt, "prompt logprobs"),
                _ => (d.max(), "all logprobs, tokens equal"),
            };
            let tokens_ok = dtype == DType::BF16 || d.diverge.iter().all(Option::is_none);
            let chunks = if step_tokens < 100 {
                format!(", prompts in {step_tokens}-token chunks")
            } else {
                String::new()
            };
            let within = if informational {
                String::new()
            } else {
                format!(" within {limit:.0e}")
            };
            push(
                &mut checks,
                &mut report,
                Check {
                    name: format!(
                        "tiny {arch}: CUDA {dtype:?} paged vs CPU f32 ({what}{within}{chunks})"
                    ),
                    passed: informational || (held <= limit && tokens_ok),
                    informational,
                    detail: d.describe(24),
                },
            );
        }
        // fp8 KV caches: the paged pool's E4M3 bytes (rope_cache, reshape_and_cache, the fp8
        // decode kernels, gathers) against the CPU engine rounding the same values; one-step
        // prompt logprobs held as bf16's are, generated ones reported.
        let fp8 = Picking {
            kv_dtype: KvCacheDtype::Fp8,
            ..GREEDY
        };
        let want = run_with(
            &cpu_model,
            CacheKind::Contiguous,
            &prompts,
            24,
            64,
            None,
            fp8,
        )?;
        let m = Arc::new(DecoderModel::load(&dir, &cuda, DType::BF16)?);
        let got = run_with(&m, CacheKind::Paged, &prompts, 24, 4096, None, fp8)?;
        let d = compare(&got, &want);
        push(
            &mut checks,
            &mut report,
            Check {
                name: format!(
                    "tiny {arch}: CUDA BF16 paged, fp8 KV vs CPU f32, fp8 KV (prompt logprobs within 2e-2)"
                ),
                passed: d.prompt <= 2e-2,
                informational: false,
                detail: d.describe(24),
            },
        );
    }

    // 2. The prefill attention kernels on random inputs against the CPU attention, and the
    //    projections of 1 to 513 rows against the CPU product.
    #[cfg(feature = "cuda")]
    for c in prefill::prefill_checks(&cuda)? {
        push(&mut checks, &mut report, c);
    }
    #[cfg(feature = "cuda")]
    push(&mut checks, &mut report, graphs::projection_check(&cuda)?);
    #[cfg(feature = "cuda")]
    for cache in [DType::BF16, DType::F8E4M3] {
        push(
            &mut checks,
            &mut report,
            decode::decode_check(&cuda, cache)?,
        );
    }
    #[cfg(feature = "cuda")]
    push(
        &mut checks,
        &mut report,
        decode_timing::decode_timing_check(&cuda),
    );
    #[cfg(feature = "cuda")]
    push(
        &mut checks,
        &mut report,
        layer_timing::layer_timing_check(&cuda),
    );
    #[cfg(feature = "cuda")]
    for c in draw::draw_kernel_checks(&cuda)? {
        push(&mut checks, &mut report, c);
    }
    #[cfg(feature = "cuda")]
    push(&mut checks, &mut report, draw::score_kernel_check(&cuda)?);

    // 3. Seeded draws on the device, and prefix caching on the paged pool (the tiny Llama of
    //    step 1, bf16 and f32).
    let dir = ModelDir::open(&root.join("LlamaForCausalLM"))?;
    let prompts = pseudo_prompts(512, &[5, 37, 64, 100]);
    for dtype in [DType::BF16, DType::F32] {
        let m = Arc::new(DecoderModel::load(&dir, &cuda, dtype)?);
        let name = format!("tiny LlamaForCausalLM CUDA {dtype:?}");
        let c = draw_check(&m, &prompts, &name)?;
        push(&mut checks, &mut report, c);
        let c = prefix::prefix_check(&m, &name, dtype == DType::F32)?;
        push(&mut checks, &mut report, c);
        let c = prefix::sharing_check(&m, &name, dtype == DType::F32)?;
        push(&mut checks, &mut report, c);
        // Seven requests (an 8-row bucket, one padded row) crossing the 256-token bucket.
        #[cfg(feature = "cuda")]
        {
            let prompts = pseudo_prompts(512, &[5, 37, 64, 100, 230, 250, 300]);
            push(
                &mut checks,
                &mut report,
                graphs::graph_check(&m, &prompts, 40, None, &name)?,
            );
        }
    }

    // 4. A LoRA adapter (rank 16, all seven projections) on every other request of a batch:
    //    the grouped shrink/expand on the device against the CPU engine.
    lora::adapter_checks(root, &cuda, &mut checks, &mut report)?;

    // 5. SmolLM2: greedy CPU f32 vs CUDA bf16; the first 16 steps must agree.
    let Some(smollm2) = smollm2 else {
        return Ok(checks);
    };
    let mut md = ModelDir::resolve(smollm2)?;
    let tok = md.load_tokenizer()?;
    let questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain gravity to a child in two sentences.",
    ];
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            let text = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
            tok.encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| SelftestError::Usage(format!("tokenize: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let steps = 64;
    let cpu_model = Arc::new(DecoderModel::load(&md, &cpu, DType::F32)?);
    let want = run(&cpu_model, CacheKind::Contiguous, &prompts, steps, 2048)?;
    let bf16 = Arc::new(DecoderModel::load(&md, &cuda, DType::BF16)?);
    let got = run(&bf16, CacheKind::Paged, &prompts, steps, 2048)?;
    let d = compare(&got, &want);
    push(
        &mut checks,
        &mut report,
        Check {
            name: "SmolLM2 greedy: CUDA bf16 paged vs CPU f32, first 16 steps equal".into(),
            passed: d.diverge.iter().all(|d| d.is_none_or(|s| s >= 16)),
            informational: false,
            detail: d.describe(steps),
        },
    );

    // 6. Seeded draws on the device over SmolLM2's 49,152 ids, and decode graphs.
    let c = draw_check(&bf16, &prompts, "SmolLM2 CUDA bf16")?;
    push(&mut checks, &mut report, c);
    #[cfg(feature = "cuda")]
    push(
        &mut checks,
        &mut report,
        graphs::graph_check(&bf16, &prompts, steps, None, "SmolLM2 CUDA bf16")?,
    );

    // 7. Paged vs contiguous on the device, with chunked prefill mixed into decode steps
    //    (a 24-token step budget) so history gathers and fused decode rows are exercised.
    let f32_model = Arc::new(DecoderModel::load(&md, &cuda, DType::F32)?);
    //    In f32 both must agree to float rounding; in bf16 the paged kernel and candle's
    //    attention round differently, so the figures are reported.
    for (model, dtype) in [(&f32_model, "f32"), (&bf16, "bf16")] {
        let contiguous = run(model, CacheKind::Contiguous, &prompts, 48, 24)?;
        let paged = run(model, CacheKind::Paged, &prompts, 48, 24)?;
        let d = compare(&paged, &contiguous);
        let strict = dtype == "f32";
        push(
            &mut checks,
            &mut report,
            Check {
                name: format!(
                    "SmolLM2 CUDA {dtype}: paged vs contiguous decode{}",
                    if strict {
                        " (within 1e-3, tokens equal)"
                    } else {
                        ""
                    }
                ),
                passed: !strict || (d.max() <= 1e-3 && d.diverge.iter().all(Option::is_none)),
                informational: !strict,
                detail: d.describe(48),
            },
        );
    }
    Ok(checks)
}
