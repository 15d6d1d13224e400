//! OpenAI's Files and Fine-tuning endpoints over [`crate::finetune`]:
//! `POST /v1/files` (multipart `file` + `purpose=fine-tune`, streamed to disk and validated),
//! `GET /v1/files`, `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`;
//! `POST|GET /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs/{id}`, `POST …/{id}/cancel`,
//! `GET …/{id}/events`, `GET …/{id}/checkpoints` (lists newest first, `after` and `limit`).
//! Without `--state-dir` every one of them answers 404 naming the flag.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::error::ApiError;
use super::AppState;
use crate::finetune::files::Upload;
use crate::finetune::jobs::page;
use crate::finetune::request::CreateJob;
use crate::finetune::{FineTuning, FinetuneError};

/// What a fine-tuning call's blocking task is called if it dies.
const FT_WORK: &str = "fine-tuning work failed";

/// Largest `limit` of a list request.
const MAX_PAGE: usize = 10_000;

impl From<FinetuneError> for ApiError {
    fn from(e: FinetuneError) -> Self {
        use FinetuneError as E;
        let (status, param) = match &e {
            E::Registry(_) => (StatusCode::BAD_REQUEST, None),
            E::NoSuchFile(_) | E::NoSuchJob(_) => (StatusCode::NOT_FOUND, None),
            E::Invalid { param, .. } => (StatusCode::BAD_REQUEST, Some(*param)),
            E::BadTrainingFile { .. } => (StatusCode::BAD_REQUEST, Some("file")),
            E::NotCancellable { .. } => (StatusCode::BAD_REQUEST, None),
            E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Some("file")),
            E::Io { .. } | E::TrainerCommand(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        match e {
            E::Registry(r) => ApiError::from(r),
            e => ApiError::new(status, e.to_string(), param),
        }
    }
}

fn service(state: &AppState) -> Result<Arc<FineTuning>, ApiError> {
    state.finetune.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "fine-tuning is off: start the server with --state-dir DIR",
            None,
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

fn multipart_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("invalid multipart body: {e}"), None)
}

pub(super) async fn upload(
    State(state): State<Arc<AppState>>,
    body: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    let mut body = body.map_err(|e| ApiError::new(e.status(), e.body_text(), None))?;
    let upload = ft.files.begin_upload();
    let (mut purpose, mut filename, mut got_file) = (None, String::from("upload.jsonl"), false);
    while let Some(mut field) = body.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(multipart_error)?),
            Some("file") if !got_file => {
                if let Some(name) = field.file_name() {
                    filename = name.to_string();
                }
                receive(&mut field, &upload, ft.files.max_bytes).await?;
                got_file = true;
            }
            other => {
                let name = other.unwrap_or("").chars().take(64).collect::<String>();
                return Err(ApiError::bad_request(
                    format!("unexpected form field `{name}` (send `file` once and `purpose`)"),
                    None,
                ));
            }
        }
    }
    let purpose =
        purpose.ok_or_else(|| ApiError::bad_request("`purpose` is required", Some("purpose")))?;
    if !got_file {
        return Err(ApiError::bad_request("`file` is required", Some("file")));
    }
    let store = ft.clone();
    let file = ApiError::blocking(FT_WORK, move || {
        store.files.commit(upload, &filename, &purpose)
    })
    .await?;
    tracing::info!(file = %file.id, bytes = file.bytes, "file stored");
    Ok(Json(json!(file)))
}

/// Streams a multipart field to the upload's path, refusing more than `max` bytes.
async fn receive(
    field: &mut axum::extract::multipart::Field<'_>,
    upload: &Upload,
    max: u64,
) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::internal(format!("storing the upload: {e}"));
    let mut out = tokio::fs::File::create(&upload.path).await.map_err(io)?;
    let mut written = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        written += chunk.len() as u64;
        if written > max {
            return Err(FinetuneError::TooLarge { max }.into());
        }
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)
}

pub(super) async fn list_files(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    let files =
        ApiError::blocking(FT_WORK, move || Ok::<_, FinetuneError>(ft.files.list())).await?;
    Ok(Json(
        json!({"object": "list", "data": files, "has_more": false}),
    ))
}

pub(super) async fn get_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    Ok(Json(json!(
        ApiError::blocking(FT_WORK, move || ft.files.get(&id)).await?
    )))
}

pub(super) async fn file_content(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let ft = service(&state)?;
    let path = ApiError::blocking(FT_WORK, move || ft.files.content_path(&id)).await?;
    // Streamed: a file may be as large as --max-file-bytes.
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("reading the file: {e}")))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

pub(super) async fn delete_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    let gone = id.clone();
    ApiError::blocking(FT_WORK, move || ft.files.delete(&id)).await?;
    Ok(Json(json!({"id": gone, "object": "file", "deleted": true})))
}

pub(super) async fn create_job(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    let req: CreateJob = ApiError::parse_body(body)?;
    let job = ApiError::blocking(FT_WORK, move || ft.create_job(req)).await?;
    tracing::info!(job = %job.id, model = %job.model, "fine-tuning job queued");
    Ok(Json(json!(job)))
}

pub(super) async fn list_jobs(
    State(state): State<Arc<AppState>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    paged(q, 20, Ok(service(&state)?.jobs.list()), |j| &j.id)
}

pub(super) async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(service(&state)?.jobs.get(&id)?)))
}

pub(super) async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ft = service(&state)?;
    Ok(Json(json!(
        ApiError::blocking(FT_WORK, move || ft.cancel(&id)).await?
    )))
}

pub(super) async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    paged(q, 20, service(&state)?.jobs.events(&id), |e| &e.id)
}

pub(super) async fn job_checkpoints(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    paged(q, 10, service(&state)?.jobs.checkpoints(&id), |c| &c.id)
}

/// A newest-first list as OpenAI pages it (`after` an id, `limit` with a default).
fn paged<T: serde::Serialize>(
    q: Result<Query<PageQuery>, QueryRejection>,
    default_limit: usize,
    items: Result<Vec<T>, FinetuneError>,
    id_of: impl Fn(&T) -> &str,
) -> Result<Json<Value>, ApiError> {
    let q = q
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    let limit = match q.limit.unwrap_or(default_limit) {
        n @ 1..=MAX_PAGE => n,
        _ => {
            return Err(ApiError::bad_request(
                format!("limit is 1 to {MAX_PAGE}"),
                Some("limit"),
            ))
        }
    };
    Ok(Json(page(items?, id_of, q.after.as_deref(), limit)))
}
