//! Server-sent events for streaming responses: JSON chunks, then `data: [DONE]`. A client that
//! disconnects drops the receiving end, which the producer sees as a failed send.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;

#[derive(Clone)]
pub struct SseSender {
    tx: mpsc::UnboundedSender<Event>,
}

impl SseSender {
    /// Sends one JSON chunk; false when the client is gone.
    pub fn send(&self, chunk: &Value) -> bool {
        self.tx
            .send(Event::default().data(chunk.to_string()))
            .is_ok()
    }

    /// Reports an error mid-stream in the OpenAI error shape.
    pub fn send_error(&self, e: ApiError) {
        let body = json!({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.status.as_u16()}});
        self.send(&body);
    }
}

/// Streams what `producer` sends, then `[DONE]`.
pub fn sse_response<F, Fut>(producer: F) -> Response
where
    F: FnOnce(SseSender) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = SseSender { tx };
    tokio::spawn(async move {
        let done = sender.clone();
        producer(sender).await;
        let _ = done.tx.send(Event::default().data("[DONE]"));
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
