//! The supervised engine loop: takes submissions and cancellations between steps, runs steps while
//! there is work, and hands every step's events to the output thread. A panic anywhere in an
//! iteration fails the sequences in flight, drops the engine (and its KV pool) and builds a fresh
//! one; more than the policy's failures within its window marks the base unhealthy. Engine tasks
//! take turns with steps, one piece each; a task that panics is dropped without touching the
//! engine.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use super::output::OutputMsg;
use super::{
    BatchLoop, Command, EngineFactory, Job, QueuedTask, RestartPolicy, Shared, SharedWork,
};
use crate::engine::batch::BatchEvent;
use crate::engine::{EngineError, SeqId};

pub(super) struct EngineLoop {
    engine: Option<Box<dyn BatchLoop>>,
    factory: EngineFactory,
    policy: RestartPolicy,
    shared: Arc<Shared>,
    /// Sequences submitted and not yet finished, failed or cancelled.
    live: HashSet<SeqId>,
    failures: VecDeque<Instant>,
    restarts: u64,
    /// Preemptions counted by engines dropped after a failure.
    /// Counters of engines replaced after a failure (preemptions, prefix-cache queries and hits),
    /// so the exported counters keep counting.
    retired: (u64, SharedWork),
    /// Engine tasks in arrival order; the first advances each turn.
    tasks: VecDeque<QueuedTask>,
}

/// The text of a panic payload.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

impl EngineLoop {
    pub(super) fn new(
        engine: Box<dyn BatchLoop>,
        factory: EngineFactory,
        policy: RestartPolicy,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            engine: Some(engine),
            factory,
            policy,
            shared,
            live: HashSet::new(),
            failures: VecDeque::new(),
            restarts: 0,
            retired: (0, SharedWork::default()),
            tasks: VecDeque::new(),
        }
    }

    pub(super) fn run(mut self, rx: Receiver<Command>, out: Sender<OutputMsg>) {
        loop {
            // Block only when idle; otherwise take whatever has arrived and keep stepping.
            let busy = !self.tasks.is_empty() || self.engine.as_ref().is_some_and(|e| !e.is_idle());
            let first = if busy {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            let commands: Vec<Command> = first.into_iter().chain(rx.try_iter()).collect();
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.iterate(commands, &out))) {
                self.recover(panic_message(payload.as_ref()), &out);
            }
            self.publish();
        }
    }

    fn iterate(&mut self, commands: Vec<Command>, out: &Sender<OutputMsg>) {
        for command in commands {
            match command {
                Command::Submit(job) => self.admit(job, out),
                Command::Cancel(id) => {
                    if self.live.remove(&id) {
                        if let Some(engine) = self.engine.as_mut() {
                            engine.cancel(id);
                        }
                    }
                }
                Command::Task(task) => self.tasks.push_back(task),
            }
        }
        self.advance_task();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        if engine.is_idle() {
            return;
        }
        let events = engine.step();
        for event in &events {
            if let BatchEvent::Finished { id, .. } | BatchEvent::Failed { id, .. } = event {
                self.live.remove(id);
            }
        }
        let _ = out.send(OutputMsg::Events(events));
    }

    /// One piece of the first task; a finished, panicking or abandoned task leaves the queue.
    fn advance_task(&mut self) {
        self.tasks.retain(|t| !t.task.is_abandoned());
        let Some(front) = self.tasks.front_mut() else {
            return;
        };
        let done = catch_unwind(AssertUnwindSafe(|| front.task.advance())).unwrap_or_else(|p| {
            tracing::error!(error = %panic_message(p.as_ref()), "an engine task panicked; dropped");
            true
        });
        if done {
            self.tasks.pop_front();
        }
    }

    fn admit(&mut self, job: Box<Job>, out: &Sender<OutputMsg>) {
        let Job {
            id,
            req,
            output,
            events,
        } = *job;
        let result = match self.engine.as_mut() {
            Some(engine) => engine.submit(id, req),
            None => Err(EngineError::Unavailable(self.unhealthy_reason())),
        };
        let msg = match result {
            Ok(()) => {
                self.live.insert(id);
                OutputMsg::Register { id, output, events }
            }
            Err(error) => OutputMsg::Reject { events, error },
        };
        let _ = out.send(msg);
    }

    fn unhealthy_reason(&self) -> String {
        self.shared
            .health
            .lock()
            .ok()
            .and_then(|h| h.clone())
            .unwrap_or_else(|| "the engine is not running".into())
    }

    /// After a panic: fail what was in flight, then rebuild the engine or give up.
    fn recover(&mut self, message: String, out: &Sender<OutputMsg>) {
        tracing::error!(
            error = %message,
            in_flight = self.live.len(),
            "the engine panicked; failing its requests and restarting it"
        );
        let ids: Vec<SeqId> = self.live.drain().collect();
        let _ = out.send(OutputMsg::Fail {
            ids,
            error: EngineError::Crashed(message.clone()),
        });
        // Drop the engine (and its KV pool) before building the next one.
        if let Ok(s) = self.shared.stats.lock() {
            self.retired = (s.preemptions, s.prefix_cache);
        }
        self.engine = None;
        let now = Instant::now();
        self.failures.push_back(now);
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.failures.pop_front();
        }
        if self.failures.len() > self.policy.max_restarts {
            self.give_up(format!(
                "the engine failed {} times within {} s (last: {message})",
                self.failures.len(),
                self.policy.window.as_secs()
            ));
            return;
        }
        let rebuilt = catch_unwind(AssertUnwindSafe(|| (self.factory)()));
        match rebuilt {
            Ok(Ok(engine)) => {
                self.engine = Some(engine);
                self.restarts += 1;
                tracing::warn!(restarts = self.restarts, "engine restarted");
            }
            Ok(Err(e)) => self.give_up(format!("the engine could not be rebuilt: {e}")),
            Err(p) => self.give_up(format!(
                "the engine could not be rebuilt: {}",
                panic_message(p.as_ref())
            )),
        }
    }

    fn give_up(&mut self, reason: String) {
        tracing::error!(%reason, "the base is unhealthy and refuses new requests");
        if let Ok(mut h) = self.shared.health.lock() {
            *h = Some(reason);
        }
    }

    fn publish(&self) {
        let mut stats = self.engine.as_ref().map(|e| e.stats()).unwrap_or_default();
        stats.restarts = self.restarts;
        // Counts of engines that were replaced after a failure still count.
        let (preemptions, shared) = self.retired;
        stats.preemptions += preemptions;
        stats.prefix_cache += shared;
        if let Ok(mut s) = self.shared.stats.lock() {
            *s = stats;
        }
    }
}
