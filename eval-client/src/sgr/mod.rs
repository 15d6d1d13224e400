//! `pruneval sgr`: Self-Generated Responses. The base model answers a seeded shuffle of a
//! dataset's user prompts (the paper's settings by default: system "You are a helpful
//! assistant.", prompts of at most 8,000 chat-templated tokens as the server's own `/tokenize`
//! counts them, temperature 0.9, top-p 0.95, `max_tokens` 8192, one answer per prompt), and the
//! answers become a fine-tuning file in OpenAI's chat format, exactly once whatever happens
//! ([`output`]), spread over one or several servers ([`dispatch`]).
//!
//! Decisions a user can rely on:
//! - records are keyed by (source row, sample index) and written in the shuffle's order; each
//!   prompt's request carries a seed derived from `--seed` and its row, so a seeded run's file is
//!   byte-identical whether it was interrupted or not;
//! - `max_tokens` is capped at the room the server's context leaves after the prompt;
//! - answers that stopped on length are dropped (kept with `--keep-length`), empty ones dropped;
//!   both counted, with skipped input rows, in the summary.

pub mod dispatch;
pub mod output;
pub mod report;
pub mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use dispatch::Dispatcher;
use output::{Finished, OrderedWriter, Provenance};
use source::{Prompt, Shape};

#[derive(Debug, thiserror::Error)]
pub enum SgrError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(crate::tasks::TaskError),
    #[error("no server answered: {0}")]
    NoServer(String),
    #[error("the server refused a request ({status}): {body}")]
    Refused { status: u64, body: String },
    #[error("chart: {0}")]
    Chart(#[from] crate::plot::ChartError),
}

impl SgrError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        SgrError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// Everything `pruneval sgr` is told (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct SgrSettings {
    /// Servers to spread requests over (repeat the flag).
    #[arg(long = "base-url", required = true)]
    pub base_urls: Vec<String>,
    #[arg(long)]
    pub model: String,
    /// A .jsonl, .json or .parquet file, or hub:org/name[:config[:split]].
    #[arg(long)]
    pub data: String,
    /// The rows' shape (default: detected from the first row that has one).
    #[arg(long = "format", value_enum)]
    pub shape: Option<Shape>,
    #[arg(long)]
    pub out: PathBuf,
    /// Prompts to answer (after the shuffle and the length filter).
    #[arg(long, default_value_t = 100_000)]
    pub limit: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Answers per prompt.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub n: usize,
    /// Longest chat-templated prompt kept, counted by the server's /tokenize.
    #[arg(long, default_value_t = 8000)]
    pub max_prompt_tokens: usize,
    /// System message ("" for none).
    #[arg(long, default_value = "You are a helpful assistant.")]
    pub system: String,
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Capped at the room the server's context leaves after the prompt.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Extra stop strings (the server stops at the model's own end-of-turn ids).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Extra stop token ids.
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    /// Keep answers that stopped on length (dropped and counted by default).
    #[arg(long)]
    pub keep_length: bool,
    /// Requests in flight per server.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
    /// Draw a progress bar (set when stderr is a terminal).
    #[arg(skip)]
    pub progress: bool,
}

/// `--n`: a positive count.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{text}` is not a positive count")),
    }
}

/// A prompt that passed the length filter.
#[derive(Debug, Clone)]
struct Selected {
    prompt: Prompt,
    prompt_tokens: usize,
    /// The server's context length, to cap `max_tokens`.
    max_model_len: usize,
}

/// The request seed of a row: splitmix64 of (`--seed`, row), kept to 53 bits (exact in JSON).
pub fn row_seed(seed: u64, row: usize) -> u64 {
    let mut z = seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & ((1 << 53) - 1)
}

impl SgrSettings {
    fn messages(&self, user: &str) -> Vec<Value> {
        let mut m = Vec::new();
        if !self.system.is_empty() {
            m.push(json!({"role": "system", "content": self.system}));
        }
        m.push(json!({"role": "user", "content": user}));
        m
    }
}

/// The model's kept base layers, from the first server that lists it.
fn kept_layers(s: &SgrSettings) -> Result<Vec<usize>, SgrError> {
    let http = reqwest::blocking::Client::new();
    let mut last = String::new();
    for url in &s.base_urls {
        let url = format!(
            "{}/v1/models",
            url.trim_end_matches('/').trim_end_matches("/v1")
        );
        let mut req = http.get(&url);
        if let Some(k) = &s.api_key {
            req = req.bearer_auth(k);
        }
        match req.send().and_then(|r| r.json::<Value>()) {
            Ok(v) => {
                let card = v["data"]
                    .as_array()
                    .and_then(|d| d.iter().find(|c| c["id"] == s.model.as_str()));
                return Ok(card
                    .and_then(|c| c["kept_layers"].as_array())
                    .map(|l| {
                        l.iter()
                            .filter_map(|x| x.as_u64().map(|x| x as usize))
                            .collect()
                    })
                    .unwrap_or_default());
            }
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(SgrError::NoServer(last))
}

/// Prompts in shuffle order whose templated length fits, up to `limit`; the rest counted.
async fn select(
    s: &SgrSettings,
    d: &Dispatcher,
    prompts: Vec<Prompt>,
    skipped: &mut BTreeMap<&'static str, usize>,
) -> Result<Vec<Selected>, SgrError> {
    let mut out = Vec::new();
    for chunk in prompts.chunks(256) {
        if out.len() >= s.limit {
            break;
        }
        let counted: Vec<Result<Value, SgrError>> = stream::iter(chunk)
            .map(|p| async move {
                let body = json!({"model": s.model, "messages": s.messages(&p.user),
                                  "add_generation_prompt": true});
                d.post("/tokenize", &body).await
            })
            .buffered(d.concurrency().min(32))
            .collect()
            .await;
        for (p, v) in chunk.iter().zip(counted) {
            if out.len() >= s.limit {
                break;
            }
            let v = v?;
            let too_long = match (v["count"].as_u64(), &v["client_error"]) {
                (Some(n), _) => n as usize > s.max_prompt_tokens,
                // The server refuses texts certainly longer than its context by their size.
                (None, Value::Number(_))
                    if v["body"]
                        .as_str()
                        .is_some_and(|b| b.contains("so at least")) =>
                {
                    true
                }
                (None, Value::Number(status)) => {
                    return Err(SgrError::Refused {
                        status: status.as_u64().unwrap_or(0),
                        body: v["body"].as_str().unwrap_or_default().to_string(),
                    })
                }
                _ => return Err(SgrError::Input(format!("/tokenize answered {v}"))),
            };
            if too_long {
                *skipped.entry("too_long").or_default() += 1;
                continue;
            }
            out.push(Selected {
                prompt: p.clone(),
                prompt_tokens: v["count"].as_u64().unwrap_or(0) as usize,
                max_model_len: v["max_model_len"].as_u64().unwrap_or(u64::MAX) as usize,
            });
        }
    }
    Ok(out)
}

/// Asks for one prompt's answers and turns them into its training and provenance lines.
async fn answer(
    s: &SgrSettings,
    d: &Dispatcher,
    sel: &Selected,
    kept_layers: &[usize],
) -> Result<Finished, SgrError> {
    let room = sel.max_model_len.saturating_sub(sel.prompt_tokens).max(1);
    let max_tokens = s.max_tokens.min(room);
    let seed = row_seed(s.seed, sel.prompt.row);
    let mut body = json!({
        "model": s.model, "messages": s.messages(&sel.prompt.user), "n": s.n, "seed": seed,
        "temperature": s.temperature, "top_p": s.top_p, "max_tokens": max_tokens,
    });
    if !s.stop.is_empty() {
        body["stop"] = json!(s.stop);
    }
    if !s.stop_token_ids.is_empty() {
        body["stop_token_ids"] = json!(s.stop_token_ids);
    }
    if s.n > 1 {
        // `usage` sums the choices; each choice's logprob entries count its own tokens.
        body["logprobs"] = json!(true);
    }
    let v = d.post("/v1/chat/completions", &body).await?;
    if let Some(status) = v["client_error"].as_u64() {
        return Err(SgrError::Refused {
            status,
            body: v["body"].as_str().unwrap_or_default().to_string(),
        });
    }
    let sampling = json!({"temperature": s.temperature, "top_p": s.top_p, "max_tokens": max_tokens,
                          "n": s.n, "stop": s.stop, "stop_token_ids": s.stop_token_ids});
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    let mut lines = Vec::with_capacity(s.n);
    for sample in 0..s.n {
        let c = choices
            .iter()
            .find(|c| c["index"].as_u64() == Some(sample as u64))
            .ok_or_else(|| SgrError::Input(format!("no choice {sample} in {v}")))?;
        let text = c["message"]["content"].as_str().unwrap_or_default();
        let finish = c["finish_reason"].as_str().unwrap_or_default().to_string();
        let completion = match c["logprobs"]["content"].as_array() {
            Some(entries) => entries.len(),
            None => v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
        };
        let status = if finish == "length" && !s.keep_length {
            "dropped_length"
        } else if text.trim().is_empty() {
            "dropped_empty"
        } else {
            "kept"
        };
        let mut messages = s.messages(&sel.prompt.user);
        messages.push(json!({"role": "assistant", "content": text}));
        lines.push((
            (status == "kept").then(|| json!({ "messages": messages })),
            Provenance {
                row: sel.prompt.row,
                sample,
                status: status.into(),
                model: s.model.clone(),
                kept_layers: kept_layers.to_vec(),
                sampling: sampling.clone(),
                seed,
                finish_reason: finish,
                prompt_tokens: sel.prompt_tokens,
                completion_tokens: completion,
            },
        ));
    }
    Ok(Finished { lines })
}

/// Runs (or resumes) an SGR generation; returns its summary (also written beside `out`).
pub fn run(s: &SgrSettings) -> Result<report::Summary, SgrError> {
    let started = Instant::now();
    let cpu_before = report::cpu_seconds();
    let rows = source::read_rows(&s.data)?;
    let shape = s
        .shape
        .or_else(|| source::detect(&rows))
        .ok_or_else(|| SgrError::Input(format!("{}: no row has `conversations`, `messages` or `instruction`; name the shape with --format", s.data)))?;
    let (prompts, mut skipped) = source::shuffled_prompts(&rows, shape, s.seed);
    let d = Dispatcher::new(&s.base_urls, s.concurrency, s.api_key.clone());
    let layers = kept_layers(s)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SgrError::Input(format!("the HTTP runtime did not start: {e}")))?;
    let selected = runtime.block_on(select(s, &d, prompts, &mut skipped))?;
    let (mut writer, committed) =
        OrderedWriter::resume(&s.out, s.n, |p| selected.get(p).map(|x| x.prompt.row))?;
    let first = writer.next_position();
    let mut all = committed;
    let bar = crate::eval::progress("sgr", selected.len());
    bar.set_position(first as u64);
    if !s.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let gen_started = Instant::now();
    // Up to --concurrency answers in flight; each is written as it comes (the writer keeps the
    // shuffle's order). The first error ends the run and drops the requests still in flight.
    let outcome = runtime.block_on(async {
        let mut answers = stream::iter(first..selected.len())
            .map(|p| {
                let (d, sel, layers) = (&d, &selected[p], &layers);
                async move { (p, answer(s, d, sel, layers).await) }
            })
            .buffer_unordered(d.concurrency());
        let mut tokens = 0usize;
        while let Some((p, r)) = answers.next().await {
            let f = r?;
            tokens += f
                .lines
                .iter()
                .map(|(_, p)| p.completion_tokens)
                .sum::<usize>();
            all.extend(writer.put(p, f)?);
            bar.set_position(writer.next_position() as u64);
            let secs = gen_started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs));
        }
        Ok::<(), SgrError>(())
    });
    bar.finish_and_clear();
    outcome?;
    let summary = report::Summary::new(report::Inputs {
        settings: s,
        shape,
        rows: rows.len(),
        skipped,
        provenance: &all,
        servers: d.stats(),
        wall_s: started.elapsed().as_secs_f64(),
        client_cpu_s: report::cpu_seconds() - cpu_before,
    });
    summary.write(&s.out)?;
    Ok(summary)
}
