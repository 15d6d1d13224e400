//! `POST /v1/layer_importance` (a pruneserve extension): Block Influence and angular distances of a
//! base's or variant's layers over a calibration set, run on the serving device between generation
//! steps, with the ranking and the suggested drop set (and the model name that serves it).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::error::ApiError;
use super::validation::{self, CalibrationField};
use super::AppState;
use crate::engine::RunSpec;
use crate::importance::{ImportanceError, ImportanceRun, ImportanceTask, Metric};
use crate::plan::LayerPlan;
use crate::registry::Registry;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportanceRequest {
    model: String,
    #[serde(default)]
    calibration: Option<CalibrationField>,
    #[serde(default)]
    max_prompts: Option<usize>,
    #[serde(default)]
    metric: Metric,
    #[serde(default)]
    drop: Option<usize>,
}

impl From<ImportanceError> for ApiError {
    fn from(e: ImportanceError) -> Self {
        match e {
            ImportanceError::Engine { .. } | ImportanceError::Cache(_) => {
                ApiError::internal(e.to_string())
            }
            _ => ApiError::bad_request(e.to_string(), None),
        }
    }
}

/// The served name that runs `model`'s plan without `drop`: `<served>@drop=...` relative to the
/// served name's own plan.
fn suggested_model(
    registry: &Registry,
    model: &str,
    plan: &LayerPlan,
    drop: &[usize],
) -> Option<String> {
    let served = model.split('@').next()?;
    let parent = registry.resolve(served).ok()?;
    let kept: Vec<usize> = plan
        .layers()
        .iter()
        .copied()
        .filter(|l| !drop.contains(l))
        .collect();
    let new_plan = LayerPlan::new(kept, plan.base_layers()).ok()?;
    Some(format!(
        "{served}@{}",
        new_plan.canonical_suffix(&parent.plan)
    ))
}

pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ImportanceRequest = ApiError::parse_body(body)?;
    validation::check_model_field(&req.model)?;
    let target = state.registry.resolve(&req.model)?;
    let span = tracing::info_span!("layer_importance", model = %target.name, metric = ?req.metric);
    async move {
        let input = validation::check_importance(
            &state.validator,
            &target,
            req.calibration,
            req.max_prompts,
            req.drop,
        )
        .await?;
        let spec = RunSpec {
            plan: target.plan.clone(),
            overlay: target.overlay.clone(),
            lora: target.lora.clone(),
        };
        let model = target.base.model.model.clone();
        let run = ImportanceRun::new(model, spec, input.prompts)?;
        let (task, done) = ImportanceTask::new(run, req.metric, input.drop);
        target.base.scheduler.submit_task(Box::new(task))?;
        let report = done
            .await
            .map_err(|_| ApiError::internal("the layer-importance run was stopped by a failure in the engine loop"))??;
        let suggested = suggested_model(&state.registry, &target.name, &target.plan, &report.drop);
        let mut body = serde_json::to_value(&report)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))?;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("object".into(), json!("layer_importance"));
            obj.insert("model".into(), json!(target.name));
            obj.insert("calibration".into(), json!(input.source));
            obj.insert("suggested_model".into(), json!(suggested));
        }
        tracing::info!(prompts = report.prompts, tokens = report.tokens, drop = ?report.drop, "layer importance done");
        Ok(Json(body))
    }
    .instrument(span)
    .await
}
