//! `POST /v1/completions` (legacy OpenAI schema plus vLLM's sampling extensions): token-id or text
//! prompts, `echo` + `logprobs` prompt scoring as lm-evaluation-harness uses it, and generation.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::engine::batch::{GenOutput, GenRequest};
use crate::engine::sampler::SamplingParams;

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
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    seed: Option<u64>,
    n: Option<usize>,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    ignore_eos: bool,
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: CompletionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))?;
    let span = tracing::info_span!("completion", model = %req.model);
    let _guard = span.enter();
    let variant = state
        .variant(&req.model)
        .ok_or_else(|| ApiError::not_found(format!("model `{}` does not exist", req.model)))?;
    let prompts = tokenize_prompts(&state, &req.prompt)?;
    let n = req.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad_request("n must be at least 1", Some("n")));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(_) => {
            return Err(ApiError::bad_request(
                "top_k must be -1 or positive",
                Some("top_k"),
            ))
        }
    };
    let sampling = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k,
        min_p: req.min_p.unwrap_or(0.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        seed: req.seed,
        top_logprobs: req.logprobs.unwrap_or(0),
    };
    sampling
        .validate()
        .map_err(|(param, msg)| ApiError::bad_request(msg, Some(param)))?;
    let max_tokens = req.max_tokens.unwrap_or(16);
    let mut jobs = Vec::new();
    for prompt in &prompts {
        for i in 0..n {
            let mut s = sampling.clone();
            s.seed = req.seed.map(|seed| seed.wrapping_add(i as u64));
            let r = GenRequest {
                plan: variant.plan.clone(),
                prompt: prompt.clone(),
                max_tokens,
                sampling: s,
                prompt_logprobs: (req.echo && req.logprobs.is_some())
                    .then(|| req.logprobs.unwrap_or(0)),
                stop_token_ids: req.stop_token_ids.clone(),
                eos_token_ids: state.model.dir.eos_token_ids.clone(),
                ignore_eos: req.ignore_eos,
            };
            jobs.push(state.scheduler.generate(r));
        }
    }
    let outputs = futures::future::try_join_all(jobs).await?;
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (index, out) in outputs.iter().enumerate() {
        let prompt = &prompts[index / n];
        prompt_tokens += if index % n == 0 { prompt.len() } else { 0 };
        completion_tokens += out.tokens.len();
        choices.push(choice(&state, index, prompt, out, req.echo, req.logprobs));
    }
    Ok(Json(json!({
        "id": format!("cmpl-{:x}", rand::random::<u64>()),
        "object": "text_completion",
        "created": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "model": req.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    })))
}

fn tokenize_prompts(state: &AppState, prompt: &PromptInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |t: &str| {
        state
            .model
            .encode(t, true)
            .map_err(|e| ApiError::bad_request(e, Some("prompt")))
    };
    let prompts = match prompt {
        PromptInput::Text(t) => vec![encode(t)?],
        PromptInput::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptInput::Ids(ids) => vec![ids.clone()],
        PromptInput::IdLists(l) => l.clone(),
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ApiError::bad_request(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let vocab = state.model.dir.config.vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(
            format!("token id {bad} is out of range (vocabulary size {vocab})"),
            Some("prompt"),
        ));
    }
    Ok(prompts)
}

/// A `{token string: logprob}` dict as the legacy API returns it.
fn top_dict(state: &AppState, top: &[(u32, f32)], actual: (u32, f32)) -> Value {
    let mut m = BTreeMap::new();
    for &(id, lp) in top.iter().chain(std::iter::once(&actual)) {
        m.entry(state.model.decode(&[id])).or_insert(lp);
    }
    json!(m)
}

fn choice(
    state: &AppState,
    index: usize,
    prompt: &[u32],
    out: &GenOutput,
    echo: bool,
    logprobs: Option<usize>,
) -> Value {
    let generated: Vec<u32> = out.tokens.iter().map(|t| t.token).collect();
    let mut text = state.model.decode(&generated);
    if echo {
        text = state.model.decode(prompt) + &text;
    }
    let logprobs = logprobs.map(|_| {
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        if echo {
            tokens.push(state.model.decode(&prompt[..1]));
            token_logprobs.push(Value::Null);
            top_logprobs.push(Value::Null);
            for s in &out.prompt_scores {
                tokens.push(state.model.decode(&[s.token]));
                token_logprobs.push(json!(s.logprob));
                top_logprobs.push(top_dict(state, &s.top, (s.token, s.logprob)));
            }
        }
        for s in &out.tokens {
            tokens.push(state.model.decode(&[s.token]));
            token_logprobs.push(json!(s.logprob));
            top_logprobs.push(top_dict(state, &s.top, (s.token, s.logprob)));
        }
        let mut offset = 0;
        let text_offset: Vec<usize> = tokens
            .iter()
            .map(|t| {
                let o = offset;
                offset += t.len();
                o
            })
            .collect();
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
    });
    json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish})
}
