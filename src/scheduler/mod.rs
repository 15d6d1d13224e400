//! The engine side of a base: a supervised engine loop thread that owns the [`Batcher`] (requests
//! join the running batch between steps), and an output thread that turns its tokens into text
//! (incremental detokenizing, stop strings, per-request metrics). Handlers submit requests through
//! a [`SchedulerHandle`] and read [`OutputEvent`]s; dropping a stream cancels its sequence.
//!
//! Contract:
//! - At most `max_in_flight` sequences are in the system; a group (a request's prompts × `n`) is
//!   admitted whole or not at all.
//! - Other work on the engine's device ([`EngineTask`], e.g. a layer-importance run) goes through
//!   the same thread, a piece per turn between steps; at most [`MAX_ENGINE_TASKS`] wait at once
//!   and a task that panics is dropped alone.
//! - A panic inside the engine fails the requests in flight with [`EngineError::Crashed`] and the
//!   loop restarts on a fresh engine; after too many failures in a short time the base is marked
//!   unhealthy ([`Health::Failed`]) and new requests are refused at once.

mod detokenize;
mod engine_loop;
mod output;
mod replicas;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc as tmpsc;

pub use detokenize::{IncrementalText, TextStep};
pub use output::{OutputEvent, OutputSpec};
pub use replicas::{Replica, Replicas};

use crate::engine::batch::{BatchEvent, Batcher, GenRequest};
use crate::engine::kv::{KvCapacity, KvUsage};
use crate::engine::{EngineError, SeqId};

/// What the engine loop drives: a [`Batcher`], or a test double of one.
pub trait BatchLoop: Send {
    fn submit(&mut self, id: SeqId, req: GenRequest) -> Result<(), EngineError>;
    fn cancel(&mut self, id: SeqId);
    fn step(&mut self) -> Vec<BatchEvent>;
    fn is_idle(&self) -> bool;
    fn stats(&self) -> LoopStats;
    fn capacity(&self) -> KvCapacity;
}

impl BatchLoop for Batcher {
    fn submit(&mut self, id: SeqId, req: GenRequest) -> Result<(), EngineError> {
        self.submit_as(id, req)
    }

    fn cancel(&mut self, id: SeqId) {
        Batcher::cancel(self, id)
    }

    fn step(&mut self) -> Vec<BatchEvent> {
        Batcher::step(self)
    }

    fn is_idle(&self) -> bool {
        Batcher::is_idle(self)
    }

    fn capacity(&self) -> KvCapacity {
        self.engine().kv_capacity()
    }

    fn stats(&self) -> LoopStats {
        LoopStats {
            running: self.num_active(),
            waiting: self.num_waiting(),
            kv: Some(self.engine().kv_usage()),
            restarts: 0,
            preemptions: self.num_preemptions(),
            prefix_cache: {
                let (queried_tokens, hit_tokens) = self.prefix_counts();
                SharedWork {
                    queried_tokens,
                    hit_tokens,
                    shared_layer_rows: self.engine().shared_layer_rows(),
                }
            },
        }
    }
}

/// Work that must run on the engine's thread (it shares the device with the steps): advanced one
/// piece per loop turn, between steps, until it says it is done.
pub trait EngineTask: Send {
    /// Runs the next piece; `true` once nothing is left (finished, failed or abandoned).
    fn advance(&mut self) -> bool;

    /// Whoever waits for the result has gone: the task leaves the queue without running further.
    fn is_abandoned(&self) -> bool;
}

/// Engine tasks queued or running per base at once.
pub const MAX_ENGINE_TASKS: usize = 2;

/// A group's requests (a request's prompts × `n`) and how each one's output is turned into text.
pub type GroupJobs = Vec<(GenRequest, OutputSpec)>;

/// Builds a fresh engine for the loop, at start and after a failure.
pub type EngineFactory = Box<dyn FnMut() -> Result<Box<dyn BatchLoop>, EngineError> + Send>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({in_flight} of {max} sequences in flight); retry later")]
    QueueFull { in_flight: usize, max: usize },
    #[error("this request needs {needed} sequences (prompts × n) but at most {max} can be in flight (--max-in-flight)")]
    NeverFits { needed: usize, max: usize },
    #[error("the engine is unhealthy: {0}")]
    Unhealthy(String),
    #[error("engine {engine} could not load its copy of `{path}`: {reason}")]
    EngineCopy {
        engine: String,
        path: String,
        reason: String,
    },
    #[error("engine loop has stopped")]
    Stopped,
    #[error("{max} engine tasks (e.g. layer-importance runs) are already queued on this base; retry later")]
    TasksBusy { max: usize },
}

/// Live figures for metrics and health.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopStats {
    pub running: usize,
    pub waiting: usize,
    pub kv: Option<KvUsage>,
    /// Times the loop was restarted after a failure.
    pub restarts: u64,
    /// Sequences preempted (KV freed, recomputed later) since start.
    pub preemptions: u64,
    /// Work not redone (`--enable-prefix-caching`), since the loop started.
    pub prefix_cache: SharedWork,
}

/// Work the engine did not redo: prompt tokens looked up in the prefix cache and found there,
/// and rows times layers that plans sharing leading layers took from another plan's rows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SharedWork {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub shared_layer_rows: u64,
}

impl std::ops::AddAssign for SharedWork {
    fn add_assign(&mut self, o: Self) {
        self.queried_tokens += o.queried_tokens;
        self.hit_tokens += o.hit_tokens;
        self.shared_layer_rows += o.shared_layer_rows;
    }
}

/// Whether a base's engine serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Given up after repeated failures (or an engine that could not be rebuilt).
    Failed(String),
}

/// When the loop gives up: more than `max_restarts` failures within `window`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            window: Duration::from_secs(60),
        }
    }
}

/// State the loops publish for handlers.
#[derive(Default)]
struct Shared {
    stats: Mutex<LoopStats>,
    health: Mutex<Option<String>>,
}

enum Command {
    Submit(Box<Job>),
    Cancel(SeqId),
    Task(QueuedTask),
}

/// A task and the count it holds a place in.
struct QueuedTask {
    task: Box<dyn EngineTask>,
    _slot: InFlight,
}

struct Job {
    id: SeqId,
    req: GenRequest,
    output: OutputSpec,
    events: tmpsc::UnboundedSender<OutputEvent>,
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
    rx: tmpsc::UnboundedReceiver<OutputEvent>,
    _in_flight: InFlight,
}

impl GenStream {
    pub async fn next(&mut self) -> Option<OutputEvent> {
        self.rx.recv().await
    }
}

/// Cloneable handle used by request handlers.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: Sender<Command>,
    next_id: Arc<AtomicU64>,
    in_flight: Arc<AtomicUsize>,
    tasks: Arc<AtomicUsize>,
    max_in_flight: usize,
    capacity: KvCapacity,
    shared: Arc<Shared>,
}

impl SchedulerHandle {
    /// Starts the engine loop (on an engine from `factory`) and the output thread; at most
    /// `max_in_flight` sequences are accepted at once.
    pub fn spawn(
        mut factory: EngineFactory,
        tokenizer: Arc<tokenizers::Tokenizer>,
        max_in_flight: usize,
        policy: RestartPolicy,
    ) -> Result<Self, EngineError> {
        let engine = factory()?;
        let capacity = engine.capacity();
        let (tx, rx) = mpsc::channel();
        let (out_tx, out_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
                .map_err(|e| EngineError::Thread(Arc::new(e)))
        };
        let loop_state = engine_loop::EngineLoop::new(engine, factory, policy, shared.clone());
        spawn("engine-loop", Box::new(move || loop_state.run(rx, out_tx)))?;
        let cancel = tx.clone();
        spawn(
            "engine-output",
            Box::new(move || output::run(out_rx, cancel, tokenizer)),
        )?;
        Ok(Self {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            tasks: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
            capacity,
            shared,
        })
    }

    /// Queues a group of requests (a request's prompts × `n`) whole, or none of them.
    pub fn submit_group(&self, jobs: GroupJobs) -> Result<Vec<GenStream>, SubmitError> {
        self.try_submit_group(jobs).map_err(|(e, _)| e)
    }

    /// As [`Self::submit_group`], giving the jobs back when they were not queued because the
    /// loop is at capacity (another engine may take them).
    pub fn try_submit_group(
        &self,
        jobs: GroupJobs,
    ) -> Result<Vec<GenStream>, (SubmitError, GroupJobs)> {
        let k = jobs.len();
        if k > self.max_in_flight {
            return Err((
                SubmitError::NeverFits {
                    needed: k,
                    max: self.max_in_flight,
                },
                jobs,
            ));
        }
        if let Health::Failed(reason) = self.health() {
            return Err((SubmitError::Unhealthy(reason), jobs));
        }
        let before = self.in_flight.fetch_add(k, Ordering::SeqCst);
        let guards: Vec<InFlight> = (0..k).map(|_| InFlight(self.in_flight.clone())).collect();
        if before + k > self.max_in_flight {
            return Err((
                SubmitError::QueueFull {
                    in_flight: before,
                    max: self.max_in_flight,
                },
                jobs,
            ));
        }
        let mut streams = Vec::with_capacity(k);
        for ((req, output), guard) in jobs.into_iter().zip(guards) {
            let (events, rx) = tmpsc::unbounded_channel();
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            self.tx
                .send(Command::Submit(Box::new(Job {
                    id,
                    req,
                    output,
                    events,
                })))
                .map_err(|_| (SubmitError::Stopped, Vec::new()))?;
            streams.push(GenStream {
                rx,
                _in_flight: guard,
            });
        }
        Ok(streams)
    }

    /// Queues work for the engine's thread, unless [`MAX_ENGINE_TASKS`] are already queued.
    pub fn submit_task(&self, task: Box<dyn EngineTask>) -> Result<(), SubmitError> {
        if let Health::Failed(reason) = self.health() {
            return Err(SubmitError::Unhealthy(reason));
        }
        let before = self.tasks.fetch_add(1, Ordering::SeqCst);
        let slot = InFlight(self.tasks.clone());
        if before >= MAX_ENGINE_TASKS {
            return Err(SubmitError::TasksBusy {
                max: MAX_ENGINE_TASKS,
            });
        }
        self.tx
            .send(Command::Task(QueuedTask { task, _slot: slot }))
            .map_err(|_| SubmitError::Stopped)
    }

    pub fn stats(&self) -> LoopStats {
        self.shared.stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub fn health(&self) -> Health {
        match self.shared.health.lock() {
            Ok(h) => h.clone().map_or(Health::Ok, Health::Failed),
            Err(_) => Health::Failed("health state poisoned".into()),
        }
    }

    /// Sequences accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Room in the KV pool (static for the engine's life).
    pub fn capacity(&self) -> KvCapacity {
        self.capacity
    }
}
