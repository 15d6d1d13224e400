//! vLLM's tokenizer endpoints: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` (what
//! lm-evaluation-harness's remote tokenizer probes).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::{messages, Message};
use super::error::ApiError;
use super::validation::{self, ValidationError};
use super::AppState;
use crate::registry::Base;

#[derive(Debug, Deserialize)]
pub(super) struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub(super) struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub(super) struct InfoQuery {
    model: Option<String>,
}

/// The named model's base, or the first base when no model is named.
fn base_for(state: &AppState, model: Option<&str>) -> Result<Arc<Base>, ApiError> {
    match model {
        Some(m) => {
            validation::check_model_field(m)?;
            Ok(state.registry.resolve(m)?.base)
        }
        None => state
            .registry
            .bases()
            .first()
            .cloned()
            .ok_or_else(|| ApiError::internal("no model loaded")),
    }
}

pub(super) async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = ApiError::parse_body(body)?;
    let base = base_for(&state, req.model.as_deref())?;
    let tokens = match (req.prompt, req.messages) {
        (Some(p), None) => state
            .validator
            .encode(&base, vec![p], req.add_special_tokens, "prompt")
            .await?
            .swap_remove(0),
        (None, Some(m)) => {
            state
                .validator
                .encode_chat(&base, messages(m)?, req.add_generation_prompt)
                .await?
        }
        _ => return Err(ValidationError::PromptOrMessages.into()),
    };
    Ok(Json(
        json!({"count": tokens.len(), "max_model_len": base.limits.max_model_len, "tokens": tokens, "token_strs": null}),
    ))
}

pub(super) async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = ApiError::parse_body(body)?;
    let base = base_for(&state, req.model.as_deref())?;
    let prompt = state.validator.decode(&base, req.tokens).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

pub(super) async fn tokenizer_info(
    State(state): State<Arc<AppState>>,
    Query(q): Query<InfoQuery>,
) -> Result<Json<Value>, ApiError> {
    let base = base_for(&state, q.model.as_deref())?;
    let dir = &base.model.dir;
    let eos = dir.eos_token.clone().or_else(|| {
        dir.eos_token_ids
            .first()
            .and_then(|&id| base.model.tokenizer.id_to_token(id))
    });
    Ok(Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "eos_token_ids": dir.eos_token_ids,
        "bos_token": dir.bos_token,
        "pad_token": eos,
        "chat_template": dir.chat_template,
        "model_max_length": base.limits.max_model_len,
        "vocab_size": dir.config.vocab_size,
    })))
}
