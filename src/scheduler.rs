//! The engine loop: one thread per base model owns the [`Batcher`]; requests arrive over a channel
//! and join the running batch between steps (continuous batching). A request whose caller went away
//! is cancelled and its KV blocks freed.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::engine::batch::{BatchEvent, Batcher, GenOutput, GenRequest};
use crate::engine::{EngineError, SeqId};

type Reply = oneshot::Sender<Result<GenOutput, EngineError>>;

struct Job {
    req: GenRequest,
    reply: Reply,
}

/// Cloneable handle used by request handlers.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: Sender<Job>,
}

impl SchedulerHandle {
    /// Starts the engine loop thread.
    pub fn spawn(batcher: Batcher) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("engine-loop".into())
            .spawn(move || run_loop(batcher, rx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the engine thread: {e}"));
        Self { tx }
    }

    /// Runs a request to completion. Dropping the future cancels it.
    pub async fn generate(&self, req: GenRequest) -> Result<GenOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { req, reply })
            .map_err(|_| EngineError::Internal("engine loop has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Internal("engine loop dropped the request".into()))?
    }
}

fn run_loop(mut batcher: Batcher, rx: Receiver<Job>) {
    let mut waiting: HashMap<SeqId, Reply> = HashMap::new();
    loop {
        // Block only when idle; otherwise take whatever has arrived and keep stepping.
        let first = if waiting.is_empty() {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        for job in first.into_iter().chain(rx.try_iter()) {
            match batcher.submit(job.req) {
                Ok(id) => {
                    waiting.insert(id, job.reply);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        let gone: Vec<SeqId> = waiting
            .iter()
            .filter(|(_, r)| r.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            waiting.remove(&id);
            batcher.cancel(id);
        }
        for event in batcher.step() {
            match event {
                BatchEvent::Finished { id, output } => {
                    if let Some(r) = waiting.remove(&id) {
                        let _ = r.send(Ok(output));
                    }
                }
                BatchEvent::Failed { id, error } => {
                    if let Some(r) = waiting.remove(&id) {
                        let _ = r.send(Err(error));
                    }
                }
                BatchEvent::Token { .. } => {}
            }
        }
    }
}
