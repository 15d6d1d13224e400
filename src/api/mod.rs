//! HTTP API (OpenAI schema): `GET /v1/models`, `POST /v1/completions`. Errors are OpenAI error JSON.

mod completions;
pub mod error;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::loaded::LoadedModel;
use crate::plan::LayerPlan;
use crate::scheduler::SchedulerHandle;

/// One servable name: a base model or a plan variant of it.
pub struct Variant {
    pub name: String,
    pub plan: Arc<LayerPlan>,
}

pub struct AppState {
    pub base_name: String,
    pub model: LoadedModel,
    pub variants: Vec<Variant>,
    pub scheduler: SchedulerHandle,
}

impl AppState {
    fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }
}

pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions::create))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn list_models(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .variants
        .iter()
        .map(|v| {
            json!({
                "id": v.name,
                "object": "model",
                "owned_by": "pruneserve",
                "root": state.base_name,
                "parent": if v.name == state.base_name { serde_json::Value::Null } else { json!(state.base_name) },
                "max_model_len": state.model.dir.config.max_position_embeddings,
                "kept_layers": v.plan.layers(),
                "dropped_layers": v.plan.dropped(),
                "lineage": state.model.dir.lineage,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
