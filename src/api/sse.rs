//! Server-sent events for streaming responses: JSON chunks, then `data: [DONE]`. A client that
//! disconnects drops the receiving end, which the producer sees as a failed send.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
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

    /// Reports an error mid-stream in the OpenAI error shape (its type follows its status).
    pub fn send_error(&self, e: ApiError) {
        self.send(&e.body());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_event_carries_the_type_of_its_status() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sender = SseSender { tx };
        sender.send_error(ApiError::bad_request("n must be at most 128", Some("n")));
        sender.send_error(ApiError::overloaded("full"));
        sender.send_error(ApiError::internal("broken"));
        let shown: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| format!("{e:?}"))
            .collect();
        assert!(shown[0].contains("invalid_request_error"), "{}", shown[0]);
        assert!(shown[1].contains("overloaded_error"), "{}", shown[1]);
        assert!(shown[2].contains("server_error"), "{}", shown[2]);
    }
}
