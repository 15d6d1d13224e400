//! `GET /v1/models` (every base and variant with lineage) and runtime plan variants:
//! `POST /v1/variants {base, name, drop|keep|reverse}`, `DELETE /v1/variants/{name}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::plan::{LayerList, PlanError, PlanSpec};

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
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of drop, keep, reverse",
                None,
            ))
        }
    };
    let card = state
        .registry
        .add_variant(&req.base, &req.name, &spec, None, true)?;
    tracing::info!(variant = %req.name, base = %req.base, "variant created");
    Ok((StatusCode::CREATED, Json(json!(card))))
}

pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.registry.remove_variant(&name)?;
    Ok(Json(
        json!({"id": name, "object": "model", "deleted": true}),
    ))
}
