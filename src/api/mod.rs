//! HTTP API (OpenAI schema, vLLM's extensions where lm-eval and EvalPlus need them). Every error,
//! 404 and 405 included, is OpenAI error JSON; `/v1/*` takes an optional Bearer key. Handlers
//! parse, hand the request to [`validation`], submit it, and format what the engine side sends
//! back: they compute nothing else.

mod chat;
mod completions;
pub mod error;
mod fine_tuning;
mod generation;
mod importance;
mod models;
mod sse;
mod tokenize;
pub mod validation;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::scheduler::Health;
use error::ApiError;
use validation::Validator;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    pub validator: Validator,
    /// The Files and Fine-tuning APIs (`--state-dir`), if on.
    pub finetune: Option<Arc<crate::finetune::FineTuning>>,
}

/// The key of an `Authorization: Bearer KEY` header (the scheme is case-insensitive, RFC 7235).
fn bearer_key(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Rejects `/v1/*` requests without the configured Bearer key.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_key);
        if given != Some(key.as_str()) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid API key", None)
                .into_response();
        }
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route", None)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method",
        None,
    )
}

/// `200 {"status": "ok"}` while every base's engine serves, else 503 naming the failed ones.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let failed: Vec<serde_json::Value> = state
        .registry
        .bases()
        .iter()
        .filter_map(|b| match b.scheduler.health() {
            Health::Ok => None,
            Health::Failed(reason) => Some(json!({"model": b.name, "reason": reason})),
        })
        .collect();
    if failed.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let body = json!({"status": "unhealthy", "failed": failed,
            "error": {"message": "an engine has failed", "type": "overloaded_error", "param": null, "code": 503}});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/variants", post(models::create))
        .route("/v1/variants/{name}", delete(models::delete))
        .route("/v1/load_lora_adapter", post(models::load_lora))
        .route("/v1/unload_lora_adapter", post(models::unload_lora))
        .route("/v1/lora_adapters", get(models::list_loras))
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/layer_importance", post(importance::create))
        // Uploads are held to --max-file-bytes while they stream, not to the body limit.
        .route(
            "/v1/files",
            post(fine_tuning::upload)
                .layer(DefaultBodyLimit::disable())
                .get(fine_tuning::list_files),
        )
        .route(
            "/v1/files/{id}",
            get(fine_tuning::get_file).delete(fine_tuning::delete_file),
        )
        .route("/v1/files/{id}/content", get(fine_tuning::file_content))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create_job).get(fine_tuning::list_jobs),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get_job))
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel_job),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/events",
            get(fine_tuning::job_events),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(fine_tuning::job_checkpoints),
        )
        // Set before the key layer, so a wrong method under /v1 still needs the key.
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/health", get(health))
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move { s.metrics.render(&s.registry) }),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::bearer_key;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for h in ["Bearer k", "bearer k", "BEARER k", "  Bearer   k "] {
            assert_eq!(bearer_key(h), Some("k"), "{h}");
        }
        assert_eq!(bearer_key("Basic k"), None);
        assert_eq!(bearer_key("Bearerk"), None);
    }
}
