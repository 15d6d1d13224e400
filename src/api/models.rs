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
use crate::plan::{parse_layer_list, PlanSpec};

pub(super) async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": state.registry.cards()}))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LayerList {
    Text(String),
    Indices(Vec<usize>),
}

impl LayerList {
    fn indices(&self, param: &str) -> Result<Vec<usize>, ApiError> {
        match self {
            LayerList::Text(t) => {
                parse_layer_list(t).map_err(|e| ApiError::bad_request(e.0, Some(param)))
            }
            LayerList::Indices(v) => Ok(v.clone()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateVariant {
    base: String,
    name: String,
    drop: Option<LayerList>,
    keep: Option<LayerList>,
    reverse: Option<f64>,
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CreateVariant = ApiError::parse_body(body)?;
    let spec = match (&req.drop, &req.keep, req.reverse) {
        (Some(d), None, None) => PlanSpec::Drop(d.indices("drop")?),
        (None, Some(k), None) => PlanSpec::Keep(k.indices("keep")?),
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
