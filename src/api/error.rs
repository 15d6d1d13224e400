//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::adapters::AdapterError;
use crate::engine::kv::KvError;
use crate::engine::EngineError;
use crate::registry::RegistryError;
use crate::scheduler::SubmitError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status,
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, param)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message, None)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, None)
    }

    /// Runs file-reading work on tokio's blocking pool; `what` names it if the task itself dies.
    pub async fn blocking<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
        what: &'static str,
        work: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T, ApiError> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| ApiError::internal(what))?
            .map_err(Into::into)
    }

    /// Parses a JSON body into `T`, as a 400 (or 413 for an oversized body) on failure.
    pub fn parse_body<T: serde::de::DeserializeOwned>(
        body: Result<axum::body::Bytes, BytesRejection>,
    ) -> Result<T, ApiError> {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text(), None))?;
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}"), None))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use EngineError as E;
        let status = match &e {
            E::Kv(KvError::OutOfBlocks { needed, total, .. }) if needed <= total => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::ContextTooLong { .. }
            | E::TokenOutOfRange { .. }
            | E::EmptyInput(_)
            | E::Plan(_)
            | E::PlanMismatch { .. }
            | E::Kv(KvError::OutOfBlocks { .. }) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: e.to_string(),
            param: None,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. }
            | SubmitError::Unhealthy(_)
            | SubmitError::TasksBusy { .. } => ApiError::overloaded(e.to_string()),
            SubmitError::NeverFits { .. } => ApiError::bad_request(e.to_string(), Some("n")),
            SubmitError::Stopped | SubmitError::EngineCopy { .. } => {
                ApiError::internal(e.to_string())
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::UnknownModel(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_) => StatusCode::CONFLICT,
            RegistryError::Adapter { ref error, .. }
                if matches!(**error, AdapterError::Compute(_)) =>
            {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            message: e.to_string(),
            param: Some("model".into()),
        }
    }
}

impl ApiError {
    /// The OpenAI error object, as both plain responses and error events in a stream carry it.
    pub fn body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            400 | 405 | 409 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if matches!(self.status.as_u16(), 429 | 503) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}
