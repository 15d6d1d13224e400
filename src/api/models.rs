//! `GET /v1/models` (every base and variant with lineage) and runtime variants:
//! `POST /v1/variants {base, name, drop|keep|reverse, adapter?, overlay?}`,
//! `DELETE /v1/variants/{name}`, and vLLM's LoRA endpoints `POST /v1/load_lora_adapter
//! {lora_name, lora_path, base_model_name?}`, `POST /v1/unload_lora_adapter {lora_name}`,
//! `GET /v1/lora_adapters`. Loading reads files, so it runs on a blocking thread.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use std::path::PathBuf;

use super::error::ApiError;
use super::validation;
use super::AppState;
use crate::plan::{LayerList, PlanError, PlanSpec};
use crate::registry::ExtraDirs;

pub(super) async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": state.registry.cards()}))
}

/// A layer list as text (`"3,22-29"`) or as indices; expanded only once checked against the base.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LayerField {
    Text(String),
    Indices(Vec<usize>),
}

impl LayerField {
    fn list(self, param: &str) -> Result<LayerList, ApiError> {
        match self {
            LayerField::Text(t) => t
                .parse()
                .map_err(|e: PlanError| ApiError::bad_request(e.to_string(), Some(param))),
            LayerField::Indices(v) => Ok(v.into()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateVariant {
    base: String,
    name: String,
    drop: Option<LayerField>,
    keep: Option<LayerField>,
    reverse: Option<f64>,
    /// A PEFT LoRA adapter directory to serve on the plan.
    adapter: Option<PathBuf>,
    /// A directory of replacement tensors.
    overlay: Option<PathBuf>,
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CreateVariant = ApiError::parse_body(body)?;
    let spec = match (req.drop, req.keep, req.reverse) {
        (Some(d), None, None) => PlanSpec::Drop(d.list("drop")?),
        (None, Some(k), None) => PlanSpec::Keep(k.list("keep")?),
        (None, None, Some(r)) => PlanSpec::Reverse(r),
        (None, None, None) if req.adapter.is_some() || req.overlay.is_some() => {
            PlanSpec::Drop(LayerList::default())
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of drop, keep, reverse (or only adapter/overlay)",
                None,
            ))
        }
    };
    let registry = state.registry.clone();
    let card = ApiError::blocking("loading failed", move || {
        let dirs = ExtraDirs {
            adapter: req.adapter.as_deref(),
            overlay: req.overlay.as_deref(),
        };
        registry.add_variant(&req.base, &req.name, &spec, dirs, true)
    })
    .await?;
    tracing::info!(variant = %card.id, "variant created");
    Ok((StatusCode::CREATED, Json(json!(card))))
}

#[derive(Debug, Deserialize)]
pub(super) struct LoadLora {
    lora_name: String,
    lora_path: PathBuf,
    base_model_name: Option<String>,
}

pub(super) async fn load_lora(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: LoadLora = ApiError::parse_body(body)?;
    let on = match req.base_model_name {
        Some(b) => {
            validation::check_model_field(&b)?;
            b
        }
        None => state
            .registry
            .bases()
            .first()
            .map(|b| b.name.clone())
            .ok_or_else(|| ApiError::internal("no model loaded"))?,
    };
    let registry = state.registry.clone();
    let card = ApiError::blocking("loading failed", move || {
        let dirs = ExtraDirs {
            adapter: Some(&req.lora_path),
            overlay: None,
        };
        registry.add_recovered(&req.lora_name, &on, dirs, true)
    })
    .await?;
    tracing::info!(adapter = %card.id, "LoRA adapter loaded");
    Ok(Json(json!(card)))
}

#[derive(Debug, Deserialize)]
pub(super) struct UnloadLora {
    lora_name: String,
}

pub(super) async fn unload_lora(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: UnloadLora = ApiError::parse_body(body)?;
    state.registry.remove_variant(&req.lora_name, true)?;
    tracing::info!(adapter = %req.lora_name, "LoRA adapter unloaded");
    Ok(Json(
        json!({"id": req.lora_name, "object": "lora_adapter", "deleted": true}),
    ))
}

pub(super) async fn list_loras(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": state.registry.adapter_cards()}))
}

pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.registry.remove_variant(&name, false)?;
    Ok(Json(
        json!({"id": name, "object": "model", "deleted": true}),
    ))
}
