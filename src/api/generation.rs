//! What completions and chat share: sampling fields, running a choice to its end (stop strings,
//! incremental text for streaming, metrics), and logprob formatting helpers.

use std::time::Instant;

use serde::Deserialize;

use super::error::ApiError;
use super::metrics::Metrics;
use crate::engine::batch::{FinishReason, GenRequest};
use crate::engine::sampler::{Sampled, SamplingParams};
use crate::engine::scoring::TokenScore;
use crate::loaded::LoadedModel;
use crate::registry::Resolved;
use crate::scheduler::{GenEvent, GenStream, SubmitError};

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and control fields common to `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl SamplingFields {
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::bad_request("n must be at least 1", Some("n"))),
            n if n > 128 => Err(ApiError::bad_request("n must be at most 128", Some("n"))),
            n => Ok(n),
        }
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(
                "stop strings must not be empty",
                Some("stop"),
            ));
        }
        Ok(stops)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// Validated sampling parameters; `top_logprobs` alternatives are reported per token.
    pub fn params(&self, top_logprobs: usize) -> Result<SamplingParams, ApiError> {
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "top_k must be -1 or positive",
                    Some("top_k"),
                ))
            }
        };
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed,
            top_logprobs,
        };
        p.validate()
            .map_err(|(param, msg)| ApiError::bad_request(msg, Some(param)))?;
        Ok(p)
    }

    /// The engine request of choice `i` (seeded choices get consecutive seeds).
    pub fn request(
        &self,
        target: &Resolved,
        prompt: Vec<u32>,
        max_tokens: usize,
        params: &SamplingParams,
        prompt_logprobs: Option<usize>,
        i: usize,
    ) -> GenRequest {
        let mut sampling = params.clone();
        sampling.seed = self.seed.map(|s| s.wrapping_add(i as u64));
        GenRequest {
            plan: target.plan.clone(),
            prompt,
            max_tokens,
            sampling,
            prompt_logprobs,
            stop_token_ids: self.stop_token_ids.clone(),
            eos_token_ids: target.base.model.dir.eos_token_ids.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

/// Rejects token ids outside the model's vocabulary, naming the request parameter.
pub fn check_token_ids(model: &LoadedModel, ids: &[u32], param: &str) -> Result<(), ApiError> {
    let vocab = model.dir.config.vocab_size;
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ApiError::bad_request(
            format!("token id {bad} is out of range (vocabulary size {vocab})"),
            Some(param),
        )),
        None => Ok(()),
    }
}

/// Checks a prompt against the model before it is queued.
pub fn check_prompt(
    model: &LoadedModel,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<(), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    check_token_ids(model, prompt, "prompt")?;
    let max = model.dir.config.max_position_embeddings;
    if prompt.len() + max_tokens > max {
        return Err(ApiError::bad_request(
            format!("context too long: {} prompt tokens + {max_tokens} max_tokens exceeds the model's {max}", prompt.len()),
            Some("max_tokens"),
        ));
    }
    Ok(())
}

pub fn submit(target: &Resolved, req: GenRequest) -> Result<GenStream, ApiError> {
    target.base.scheduler.submit(req).map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::overloaded(e.to_string()),
        SubmitError::Stopped => ApiError::internal(e.to_string()),
    })
}

/// New text and the tokens that produced it, for one streamed chunk.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<Sampled>,
}

/// A finished choice.
#[derive(Debug)]
pub struct ChoiceResult {
    pub text: String,
    pub tokens: Vec<Sampled>,
    pub finish_reason: &'static str,
    pub prompt_scores: Vec<TokenScore>,
}

/// Byte length of the longest suffix of `text` that starts some stop string (held back while
/// streaming, since the next token may complete the stop).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text.ends_with(&stop[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Consumes a request's events to the end. `on_delta` receives text as it becomes final and
/// returns false when the client is gone, which cancels the request (by dropping the stream).
pub async fn run_choice(
    mut stream: GenStream,
    model: &LoadedModel,
    stops: &[String],
    metrics: &Metrics,
    model_name: &str,
    started: Instant,
    mut on_delta: impl FnMut(Delta) -> bool,
) -> Result<ChoiceResult, ApiError> {
    let mut tokens: Vec<Sampled> = Vec::new();
    let mut sent = 0usize;
    let mut unsent_tokens: Vec<Sampled> = Vec::new();
    let mut last_token_at: Option<Instant> = None;
    while let Some(event) = stream.next().await {
        match event {
            GenEvent::Token(s) => {
                let now = Instant::now();
                match last_token_at {
                    None => metrics.observe_ttft(model_name, now - started),
                    Some(t) => metrics.observe_itl(model_name, now - t),
                }
                last_token_at = Some(now);
                tokens.push(s.clone());
                unsent_tokens.push(s);
                let ids: Vec<u32> = tokens.iter().map(|t| t.token).collect();
                let full = model.decode(&ids);
                let search_from = stops
                    .iter()
                    .map(String::len)
                    .max()
                    .map_or(sent, |m| sent.saturating_sub(m));
                let search_from = (0..=search_from)
                    .rev()
                    .find(|&i| full.is_char_boundary(i))
                    .unwrap_or(0);
                let hit = stops
                    .iter()
                    .filter_map(|st| {
                        full[search_from..]
                            .find(st.as_str())
                            .map(|p| p + search_from)
                    })
                    .min();
                if let Some(end) = hit {
                    let end = end.max(sent);
                    on_delta(Delta {
                        text: full[sent..end].to_string(),
                        tokens: std::mem::take(&mut unsent_tokens),
                    });
                    metrics.count_generated(model_name, tokens.len(), started.elapsed());
                    return Ok(ChoiceResult {
                        text: full[..end].to_string(),
                        tokens,
                        finish_reason: "stop",
                        prompt_scores: Vec::new(),
                    });
                }
                let mut safe = full.len() - held_back(&full, stops);
                if full[..safe].ends_with('\u{FFFD}') {
                    safe -= '\u{FFFD}'.len_utf8();
                }
                if safe > sent
                    && !on_delta(Delta {
                        text: full[sent..safe].to_string(),
                        tokens: std::mem::take(&mut unsent_tokens),
                    })
                {
                    return Err(ApiError::internal("client went away".to_string()));
                }
                sent = sent.max(safe);
            }
            GenEvent::Done(out) => {
                let ids: Vec<u32> = out.tokens.iter().map(|t| t.token).collect();
                let full = model.decode(&ids);
                let rest = full.get(sent..).unwrap_or_default().to_string();
                if !rest.is_empty() || !unsent_tokens.is_empty() {
                    on_delta(Delta {
                        text: rest,
                        tokens: unsent_tokens,
                    });
                }
                metrics.count_generated(model_name, out.tokens.len(), started.elapsed());
                let finish_reason = match out.finish {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                };
                return Ok(ChoiceResult {
                    text: full,
                    tokens: out.tokens,
                    finish_reason,
                    prompt_scores: out.prompt_scores,
                });
            }
            GenEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal(
        "the engine dropped the request".to_string(),
    ))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `usage` object.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens})
}

/// Runs non-streamed choices to their ends and counts them as finished.
pub async fn run_all(
    streams: Vec<GenStream>,
    model: &LoadedModel,
    stops: &[String],
    metrics: &Metrics,
    model_name: &str,
    started: Instant,
) -> Result<Vec<ChoiceResult>, ApiError> {
    let runs = streams
        .into_iter()
        .map(|s| run_choice(s, model, stops, metrics, model_name, started, |_| true));
    let results = futures::future::try_join_all(runs).await?;
    for r in &results {
        metrics.count_finished(model_name, r.finish_reason);
    }
    Ok(results)
}

/// Awaits every streamed choice (each yielding its completion token count), then sends the
/// usage chunk built by `usage_chunk` when asked for, or the error that stopped a choice.
pub async fn finish_stream<F>(
    tx: &super::sse::SseSender,
    runs: Vec<F>,
    usage_chunk: Option<impl FnOnce(usize) -> serde_json::Value>,
) where
    F: std::future::Future<Output = Result<usize, ApiError>>,
{
    match futures::future::try_join_all(runs).await {
        Ok(counts) => {
            if let Some(chunk) = usage_chunk {
                tx.send(&chunk(counts.iter().sum()));
            }
        }
        Err(e) => tx.send_error(e),
    }
}
