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

use super::error::ApiError;
use super::generation::{
    check_prompt, finish_stream, run_all, run_choice, submit, unix_now, usage, SamplingFields,
};
use super::sse::{sse_response, SseSender};
use super::AppState;
use crate::chat_template::ChatMessage;
use crate::engine::sampler::Sampled;
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

pub(super) fn messages(raw: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    raw.iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
                                    format!("content part type `{kind}` is not supported"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// Renders and tokenizes the conversation (no extra special tokens: the template has them).
pub(super) fn chat_prompt(
    model: &LoadedModel,
    msgs: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template", Some("messages"))
    })?;
    let text = template
        .render(msgs, add_generation_prompt)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    model
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request(e, Some("messages")))
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
    let span = tracing::info_span!("chat", model = %req.model);
    let _guard = span.enter();
    let target = state.registry.resolve(&req.model)?;
    let model = &target.base.model;
    let prompt = chat_prompt(model, &messages(&req.messages)?, req.add_generation_prompt)?;
    let n = req.sampling.n()?;
    let stops = req.sampling.stops()?;
    let top = if req.logprobs {
        req.top_logprobs.unwrap_or(0)
    } else {
        0
    };
    if top > 20 {
        return Err(ApiError::bad_request(
            "top_logprobs must be at most 20",
            Some("top_logprobs"),
        ));
    }
    let params = req.sampling.params(top)?;
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            return Err(ApiError::bad_request(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ))
        }
        Some(m) => m,
        None => model
            .dir
            .config
            .max_position_embeddings
            .saturating_sub(prompt.len())
            .clamp(1, 4096),
    };
    check_prompt(model, &prompt, max_tokens)?;
    state.metrics.count_prompt(&req.model, prompt.len());
    let streams = (0..n)
        .map(|i| {
            submit(
                &target,
                req.sampling
                    .request(&target, prompt.clone(), max_tokens, &params, None, i),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let id = format!("chatcmpl-{:x}", rand::random::<u64>());
    let created = unix_now();
    let prompt_tokens = prompt.len();
    if req.sampling.stream {
        let include_usage = req.sampling.include_usage();
        let state2 = state.clone();
        return Ok(sse_response(move |tx: SseSender| async move {
            let model = &target.base.model;
            let name = req.model.as_str();
            let chunk = |index: usize, delta: Value, logprobs: Value, finish: Value| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
            };
            let runs = streams.into_iter().enumerate().map(|(index, stream)| {
                let tx = tx.clone();
                let (chunk, stops, metrics) = (&chunk, &stops, &state2.metrics);
                async move {
                    if !tx.send(&chunk(
                        index,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                        Value::Null,
                    )) {
                        return Err(ApiError::internal("client went away"));
                    }
                    let res = run_choice(stream, model, stops, metrics, name, started, |d| {
                        let lp = if req.logprobs {
                            chat_logprobs(model, &d.tokens)
                        } else {
                            Value::Null
                        };
                        tx.send(&chunk(index, json!({"content": d.text}), lp, Value::Null))
                    })
                    .await?;
                    metrics.count_finished(name, res.finish_reason);
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
    let results = run_all(streams, model, &stops, &state.metrics, &req.model, started).await?;
    let completion_tokens: usize = results.iter().map(|r| r.tokens.len()).sum();
    let choices: Vec<Value> = results
        .iter()
        .enumerate()
        .map(|(index, r)| {
            json!({"index": index, "message": {"role": "assistant", "content": r.text},
                   "logprobs": if req.logprobs { chat_logprobs(model, &r.tokens) } else { Value::Null },
                   "finish_reason": r.finish_reason})
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}
