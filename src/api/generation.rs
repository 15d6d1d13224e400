//! What completions and chat share: submitting a validated request, and reading a choice's
//! events (text comes final from the engine side's output step) into a result or a stream.

use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::validation::Generation;
use super::AppState;
use crate::engine::sample::sampler::Sampled;
use crate::engine::sample::scoring::TokenScore;
use crate::metrics::RequestObserver;
use crate::registry::Resolved;
use crate::scheduler::{GenStream, OutputEvent, OutputSpec};

/// Counts the prompts and submits every choice of a validated request as one group.
pub fn submit(
    state: &Arc<AppState>,
    target: &Resolved,
    generation: &Generation,
    started: Instant,
) -> Result<Vec<GenStream>, ApiError> {
    let label = state.metrics.label(target);
    for p in &generation.prompts {
        state.metrics.count_prompt(&label, p.len());
    }
    let jobs = generation.jobs(target, || OutputSpec {
        stops: Vec::new(),
        observer: Some(RequestObserver::new(
            state.metrics.clone(),
            label.clone(),
            started,
        )),
    });
    Ok(target.base.scheduler.submit_group(jobs)?)
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

/// Consumes a choice's events to the end. `on_delta` receives text as it becomes final and
/// returns false when the client is gone, which cancels the request (by dropping the stream).
pub async fn run_choice(
    mut stream: GenStream,
    mut on_delta: impl FnMut(Delta) -> bool,
) -> Result<ChoiceResult, ApiError> {
    let mut text = String::new();
    let mut tokens: Vec<Sampled> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            OutputEvent::Delta {
                text: t,
                tokens: ts,
            } => {
                text.push_str(&t);
                tokens.extend(ts.iter().cloned());
                if !on_delta(Delta {
                    text: t,
                    tokens: ts,
                }) {
                    return Err(ApiError::internal("client went away"));
                }
            }
            OutputEvent::Done {
                finish,
                prompt_scores,
            } => {
                return Ok(ChoiceResult {
                    text,
                    tokens,
                    finish_reason: finish.as_str(),
                    prompt_scores,
                })
            }
            OutputEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

/// Runs non-streamed choices to their ends.
pub async fn run_all(streams: Vec<GenStream>) -> Result<Vec<ChoiceResult>, ApiError> {
    futures::future::try_join_all(streams.into_iter().map(|s| run_choice(s, |_| true))).await
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
