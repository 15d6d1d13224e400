//! The engine loop: one thread per base model owns the [`Batcher`]; requests arrive over a channel
//! and join the running batch between steps (continuous batching). Each request gets a stream of
//! events; dropping the stream (a client that went away) cancels the sequence and frees its KV.
//! The number of requests in the system is bounded: beyond it, submission fails at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc as tmpsc;

use crate::engine::batch::{BatchEvent, Batcher, GenOutput, GenRequest};
use crate::engine::kv_cache::KvUsage;
use crate::engine::sampler::Sampled;
use crate::engine::{EngineError, SeqId};

/// What a request's stream yields.
#[derive(Debug)]
pub enum GenEvent {
    Token(Sampled),
    Done(GenOutput),
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} requests in flight); retry later")]
    QueueFull(usize),
    #[error("engine loop has stopped")]
    Stopped,
}

struct Job {
    req: GenRequest,
    events: tmpsc::UnboundedSender<GenEvent>,
}

/// Live figures for metrics and health.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopStats {
    pub running: usize,
    pub waiting: usize,
    pub kv: Option<KvUsage>,
}

/// Decrements the in-flight count when a request's stream ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request's events; dropping it cancels the request.
pub struct GenStream {
    rx: tmpsc::UnboundedReceiver<GenEvent>,
    _in_flight: InFlight,
}

impl GenStream {
    pub async fn next(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }
}

/// Cloneable handle used by request handlers.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: Sender<Job>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    stats: Arc<Mutex<LoopStats>>,
}

impl SchedulerHandle {
    /// Starts the engine loop thread; at most `max_in_flight` requests are accepted at once.
    pub fn spawn(batcher: Batcher, max_in_flight: usize) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let loop_stats = stats.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("engine-loop".into())
            .spawn(move || run_loop(batcher, rx, loop_stats))
        {
            tracing::error!("cannot start the engine thread: {e}");
        }
        Self {
            tx,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
            stats,
        }
    }

    /// Queues a request and returns its event stream.
    pub fn submit(&self, req: GenRequest) -> Result<GenStream, SubmitError> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        if n >= self.max_in_flight {
            return Err(SubmitError::QueueFull(n));
        }
        let (events, rx) = tmpsc::unbounded_channel();
        self.tx
            .send(Job { req, events })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(GenStream {
            rx,
            _in_flight: guard,
        })
    }

    pub fn stats(&self) -> LoopStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

fn run_loop(mut batcher: Batcher, rx: Receiver<Job>, stats: Arc<Mutex<LoopStats>>) {
    let mut streams: HashMap<SeqId, tmpsc::UnboundedSender<GenEvent>> = HashMap::new();
    loop {
        // Block only when idle; otherwise take whatever has arrived and keep stepping.
        let first = if streams.is_empty() {
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
                    streams.insert(id, job.events);
                }
                Err(e) => {
                    let _ = job.events.send(GenEvent::Failed(e));
                }
            }
        }
        let gone: Vec<SeqId> = streams
            .iter()
            .filter(|(_, s)| s.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            streams.remove(&id);
            batcher.cancel(id);
        }
        for event in batcher.step() {
            match event {
                BatchEvent::Token { id, token } => {
                    if let Some(s) = streams.get(&id) {
                        let _ = s.send(GenEvent::Token(token));
                    }
                }
                BatchEvent::Finished { id, output } => {
                    if let Some(s) = streams.remove(&id) {
                        let _ = s.send(GenEvent::Done(output));
                    }
                }
                BatchEvent::Failed { id, error } => {
                    if let Some(s) = streams.remove(&id) {
                        let _ = s.send(GenEvent::Failed(error));
                    }
                }
            }
        }
        if let Ok(mut s) = stats.lock() {
            *s = LoopStats {
                running: batcher.num_active(),
                waiting: batcher.num_waiting(),
                kv: Some(batcher.engine().kv_usage()),
            };
        }
    }
}
