//! HTTP API (OpenAI schema, vLLM's extensions where lm-eval and EvalPlus need them). Every error
//! is OpenAI error JSON; `/v1/*` takes an optional Bearer key.

mod chat;
mod completions;
pub mod error;
mod generation;
pub mod metrics;
mod models;
mod sse;
mod tokenize;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

use crate::registry::Registry;
use error::ApiError;
use metrics::Metrics;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub api_key: Option<String>,
}

/// Rejects `/v1/*` requests without the configured Bearer key.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
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

pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/variants", post(models::create))
        .route("/v1/variants/{name}", delete(models::delete))
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .merge(v1)
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move { s.metrics.render(&s.registry) }),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
