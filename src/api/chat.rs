//! `POST /v1/chat/completions`: the model's chat template (minijinja), `n`, `stop`, `seed`,
//! `max_tokens`/`max_completion_tokens`, chat-shaped `logprobs`, SSE streaming with usage.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use tracing::Instrument;

use super::error::ApiError;
use super::generation::{finish_stream, run_all, run_choice, submit, unix_now, usage};
use super::sse::{sse_response, SseSender};
use super::validation::{self, Generation, MaxTokens, SamplingFields, ValidationError};
use super::AppState;
use crate::chat_template::ChatMessage;
use crate::engine::sample::sampler::Sampled;
use crate::loaded::LoadedModel;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
    #[serde(flatten)]
    sampling: SamplingFields,
}

fn yes() -> bool {
    true
}

/// The messages' text contents (content parts of type `text` joined); roles are checked by
/// validation.
pub(super) fn messages(raw: Vec<Message>) -> Result<Vec<ChatMessage>, ValidationError> {
    raw.into_iter()
        .enumerate()
        .map(|(index, m)| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s.push_str(&t),
                            (kind, _) => {
                                return Err(ValidationError::ContentPart {
                                    index,
                                    kind: kind.chars().take(64).collect(),
                                })
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

fn token_entry(model: &LoadedModel, id: u32, logprob: f32) -> Value {
    let s = model.decode(&[id]);
    json!({"token": s, "logprob": logprob, "bytes": s.as_bytes()})
}

/// Chat-shaped logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(model: &LoadedModel, tokens: &[Sampled]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = token_entry(model, t.token, t.logprob);
            e["top_logprobs"] = json!(t
                .top
                .iter()
                .map(|&(id, lp)| token_entry(model, id, lp))
                .collect::<Vec<_>>());
            e
        })
        .collect();
    json!({"content": content})
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: ChatRequest = ApiError::parse_body(body)?;
    validation::check_model_field(&req.model)?;
    let span = tracing::info_span!("chat", model = %req.model);
    respond(state, req, started).instrument(span).await
}

async fn respond(
    state: Arc<AppState>,
    req: ChatRequest,
    started: Instant,
) -> Result<Response, ApiError> {
    let target = state.registry.resolve(&req.model)?;
    let top = validation::chat_top_logprobs(req.logprobs, req.top_logprobs)?;
    let max_tokens = MaxTokens::chat(req.max_completion_tokens, req.max_tokens)?;
    let prompt = state
        .validator
        .encode_chat(
            &target.base,
            messages(req.messages)?,
            req.add_generation_prompt,
        )
        .await?;
    let generation = Generation::new(&target, vec![prompt], &req.sampling, max_tokens, top, None)?;
    let streams = submit(&state, &target, &generation, started)?;
    let id = format!("chatcmpl-{:x}", rand::random::<u64>());
    let created = unix_now();
    let prompt_tokens = generation.prompts[0].len();
    let name = target.name.clone();
    let logprobs = req.logprobs;
    if req.sampling.stream {
        let include_usage = req.sampling.include_usage();
        return Ok(sse_response(move |tx: SseSender| async move {
            let model = &target.base.model;
            let chunk = |index: usize, delta: Value, logprobs: Value, finish: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
            };
            let runs = streams.into_iter().enumerate().map(|(index, stream)| {
                let tx = tx.clone();
                let chunk = &chunk;
                async move {
                    if !tx.send(&chunk(
                        index,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                        Value::Null,
                    )) {
                        return Err(ApiError::internal("client went away"));
                    }
                    let res = run_choice(stream, |d| {
                        let lp = if logprobs {
                            chat_logprobs(model, &d.tokens)
                        } else {
                            Value::Null
                        };
                        tx.send(&chunk(index, json!({"content": d.text}), lp, Value::Null))
                    })
                    .await?;
                    tx.send(&chunk(
                        index,
                        json!({}),
                        Value::Null,
                        json!(res.finish_reason),
                    ));
                    Ok::<_, ApiError>(res.tokens.len())
                }
            });
            let usage_chunk = include_usage.then_some(|completion: usize| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [],
                       "usage": usage(prompt_tokens, completion)})
            });
            finish_stream(&tx, runs.collect(), usage_chunk).await;
        }));
    }
    let results = run_all(streams).await?;
    let model = &target.base.model;
    let completion_tokens: usize = results.iter().map(|r| r.tokens.len()).sum();
    let choices: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(index, r)| {
            json!({"index": index, "message": {"role": "assistant", "content": r.text},
                   "logprobs": if logprobs { chat_logprobs(model, &r.tokens) } else { Value::Null },
                   "finish_reason": r.finish_reason})
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": name, "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}
