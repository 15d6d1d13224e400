//! `POST /v1/completions` (legacy OpenAI schema plus vLLM's sampling extensions): token-id or text
//! prompts (one or a batch), `echo` + `logprobs` prompt scoring as lm-evaluation-harness uses it,
//! generation, `stop`, `n`, and SSE streaming.

use std::collections::BTreeMap;
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
use super::generation::{
    finish_stream, run_all, run_choice, submit, unix_now, usage, ChoiceResult,
};
use super::sse::{sse_response, SseSender};
use super::validation::{self, Generation, MaxTokens, SamplingFields};
use super::AppState;
use crate::loaded::LoadedModel;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptInput,
    #[serde(default)]
    echo: bool,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: CompletionRequest = ApiError::parse_body(body)?;
    validation::check_model_field(&req.model)?;
    let span = tracing::info_span!("completion", model = %req.model);
    respond(state, req, started).instrument(span).await
}

async fn respond(
    state: Arc<AppState>,
    req: CompletionRequest,
    started: Instant,
) -> Result<Response, ApiError> {
    let target = state.registry.resolve(&req.model)?;
    let top = validation::check_logprobs("logprobs", req.logprobs.unwrap_or(0))?;
    let max_tokens = MaxTokens::completion(req.max_tokens, req.echo)?;
    let prompts = match req.prompt {
        PromptInput::Text(t) => {
            state
                .validator
                .encode(&target.base, vec![t], true, "prompt")
                .await?
        }
        PromptInput::Texts(ts) => {
            state
                .validator
                .encode(&target.base, ts, true, "prompt")
                .await?
        }
        PromptInput::Ids(ids) => vec![ids],
        PromptInput::IdLists(l) => l,
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let prompt_logprobs = (req.echo && req.logprobs.is_some()).then_some(top);
    let generation = Generation::new(
        &target,
        prompts,
        &req.sampling,
        max_tokens,
        top,
        prompt_logprobs,
    )?;
    let streams = submit(&state, &target, &generation, started)?;
    let id = format!("cmpl-{:x}", rand::random::<u64>());
    let created = unix_now();
    let name = target.name.clone();
    let n = generation.n;
    let prompts = generation.prompts;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    if req.sampling.stream {
        let include_usage = req.sampling.include_usage();
        let (echo, logprobs) = (req.echo, req.logprobs.is_some());
        return Ok(sse_response(move |tx: SseSender| async move {
            let model = &target.base.model;
            let chunk = |index: usize, text: String, logprobs: Value, finish: Value| {
                json!({"id": id, "object": "text_completion", "created": created, "model": name,
                       "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
            };
            let runs = streams.into_iter().enumerate().map(|(index, stream)| {
                let tx = tx.clone();
                let prompt = &prompts[index / n];
                let chunk = &chunk;
                async move {
                    if echo
                        && !tx.send(&chunk(
                            index,
                            model.decode(prompt),
                            Value::Null,
                            Value::Null,
                        ))
                    {
                        return Err(ApiError::internal("client went away"));
                    }
                    let res = run_choice(stream, |d| {
                        let lp = if logprobs {
                            legacy_logprobs(model, &[], &d.tokens, 0)
                        } else {
                            Value::Null
                        };
                        tx.send(&chunk(index, d.text, lp, Value::Null))
                    })
                    .await?;
                    tx.send(&chunk(
                        index,
                        String::new(),
                        Value::Null,
                        json!(res.finish_reason),
                    ));
                    Ok::<_, ApiError>(res.tokens.len())
                }
            });
            let usage_chunk = include_usage.then_some(|completion: usize| {
                json!({"id": id, "object": "text_completion", "created": created, "model": name, "choices": [],
                       "usage": usage(prompt_tokens, completion)})
            });
            finish_stream(&tx, runs.collect(), usage_chunk).await;
        }));
    }
    let results = run_all(streams).await?;
    let model = &target.base.model;
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (index, res) in results.iter().enumerate() {
        completion_tokens += res.tokens.len();
        choices.push(choice(
            model,
            index,
            &prompts[index / n],
            res,
            req.echo,
            req.logprobs,
        ));
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// A token with its logprob and top alternatives; `None` for the unscored first prompt token.
type ScoredToken = (u32, Option<(f32, Vec<(u32, f32)>)>);

/// A `{token string: logprob}` dict as the legacy API returns it (the actual token included).
fn top_dict(model: &LoadedModel, top: &[(u32, f32)], actual: (u32, f32)) -> Value {
    let mut m = BTreeMap::new();
    for &(id, lp) in top.iter().chain(std::iter::once(&actual)) {
        m.entry(model.decode(&[id])).or_insert(lp);
    }
    json!(m)
}

/// Legacy `logprobs` for (optionally) a scored prompt followed by sampled tokens.
fn legacy_logprobs(
    model: &LoadedModel,
    prompt: &[ScoredToken],
    sampled: &[crate::engine::sample::sampler::Sampled],
    offset0: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let entries = prompt.iter().map(|(id, s)| (*id, s.clone())).chain(
        sampled
            .iter()
            .map(|s| (s.token, Some((s.logprob, s.top.clone())))),
    );
    for (id, score) in entries {
        tokens.push(model.decode(&[id]));
        match score {
            Some((lp, top)) => {
                token_logprobs.push(json!(lp));
                top_logprobs.push(top_dict(model, &top, (id, lp)));
            }
            None => {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            }
        }
    }
    let mut offset = offset0;
    let text_offset: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let o = offset;
            offset += t.len();
            o
        })
        .collect();
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

fn choice(
    model: &LoadedModel,
    index: usize,
    prompt: &[u32],
    res: &ChoiceResult,
    echo: bool,
    logprobs: Option<usize>,
) -> Value {
    let text = if echo {
        model.decode(prompt) + &res.text
    } else {
        res.text.clone()
    };
    let logprobs = logprobs.map(|_| {
        let scored: Vec<ScoredToken> = if echo {
            std::iter::once((prompt[0], None))
                .chain(
                    res.prompt_scores
                        .iter()
                        .map(|s| (s.token, Some((s.logprob, s.top.clone())))),
                )
                .collect()
        } else {
            Vec::new()
        };
        legacy_logprobs(model, &scored, &res.tokens, 0)
    });
    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": res.finish_reason})
}
