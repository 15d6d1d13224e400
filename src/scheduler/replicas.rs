//! Data parallelism (`serve --data-parallel N`): one base served by N engine loops, each with its
//! own KV pool (and, on CUDA, its own copy of the weights on its own GPU), behind one handle that
//! the API, the registry and the metrics use as they would one loop.
//!
//! Contract:
//! - A request group goes whole to one engine: the healthy engine with the fewest sequences in
//!   flight (ties: the lowest index); an engine at capacity passes the group to the next.
//! - The registry loads adapters and overlays on engine 0's weights. Another engine loads its own
//!   copy from the same directory the first time a request routed to it needs one, and drops that
//!   copy once the registry's is gone (unloaded, and no request holds it any more).
//! - Engine tasks (layer-importance runs) run on engine 0, whose weights they were built on.
//! - Figures are summed over the engines; [`Replicas::per_engine`] gives each engine's own. The
//!   base is unhealthy only when every engine has failed; a failed engine gets no new requests.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{EngineTask, GenStream, GroupJobs, Health, LoopStats, SchedulerHandle, SubmitError};
use crate::engine::adapters::LoraAdapter;
use crate::engine::batch::GenRequest;
use crate::engine::kv::{KvCapacity, KvUsage};
use crate::engine::model::overlay::ModelOverlay;
use crate::engine::model::DecoderModel;

/// One engine of a base: its loop and the weights it runs.
pub struct Replica {
    /// Where it runs, e.g. `cuda:1` or `cpu:0`.
    pub label: String,
    scheduler: SchedulerHandle,
    model: Arc<DecoderModel>,
    copies: Mutex<Copies>,
    /// Sequences routed to it since start.
    routed: AtomicU64,
}

/// One engine's figures.
#[derive(Debug, Clone)]
pub struct EngineFigures<'a> {
    pub label: &'a str,
    pub stats: LoopStats,
    /// Sequences routed to it since start.
    pub routed: u64,
}

/// An engine's own copies of adapters and overlays loaded by the registry on engine 0.
#[derive(Default)]
struct Copies {
    loras: Vec<(Weak<LoraAdapter>, Arc<LoraAdapter>)>,
    overlays: Vec<(Weak<ModelOverlay>, Arc<ModelOverlay>)>,
}

impl Replica {
    pub fn new(label: String, scheduler: SchedulerHandle, model: Arc<DecoderModel>) -> Self {
        Self {
            label,
            scheduler,
            model,
            copies: Mutex::default(),
            routed: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> LoopStats {
        self.scheduler.stats()
    }

    pub fn health(&self) -> Health {
        self.scheduler.health()
    }

    /// Points a request's adapter and overlay at this engine's copies.
    fn localize(&self, req: &mut GenRequest) -> Result<(), SubmitError> {
        let mut copies = self.copies.lock().map_err(|_| {
            SubmitError::Unhealthy(format!("engine {}: state poisoned", self.label))
        })?;
        let model = &self.model;
        if let Some(lora) = &req.lora {
            let path = lora.info.path.clone();
            req.lora = Some(copy_of(&mut copies.loras, lora, || {
                LoraAdapter::load(
                    Path::new(&path),
                    model.config(),
                    model.device(),
                    model.dtype(),
                    usize::MAX,
                )
                .map_err(|e| self.copy_failed(&path, e.to_string()))
            })?);
        }
        if let Some(overlay) = &req.overlay {
            let path = overlay.info.path.clone();
            req.overlay = Some(copy_of(&mut copies.overlays, overlay, || {
                model
                    .load_overlay(Path::new(&path))
                    .map_err(|e| self.copy_failed(&path, e.to_string()))
            })?);
        }
        Ok(())
    }

    fn copy_failed(&self, path: &str, reason: String) -> SubmitError {
        SubmitError::EngineCopy {
            engine: self.label.clone(),
            path: path.to_string(),
            reason,
        }
    }
}

/// This engine's copy of `source`, loaded by `load` the first time; copies whose source is gone
/// are dropped on the way.
fn copy_of<T>(
    list: &mut Vec<(Weak<T>, Arc<T>)>,
    source: &Arc<T>,
    load: impl FnOnce() -> Result<T, SubmitError>,
) -> Result<Arc<T>, SubmitError> {
    list.retain(|(weak, _)| weak.strong_count() > 0);
    let wanted = Arc::downgrade(source);
    if let Some((_, copy)) = list.iter().find(|(weak, _)| weak.ptr_eq(&wanted)) {
        return Ok(copy.clone());
    }
    let copy = Arc::new(load()?);
    list.push((wanted, copy.clone()));
    Ok(copy)
}

/// A base's engines.
pub struct Replicas {
    engines: Vec<Replica>,
}

impl Replicas {
    /// `engines` must not be empty; engine 0 runs the weights the registry loads extras onto.
    pub fn new(engines: Vec<Replica>) -> Self {
        assert!(!engines.is_empty(), "a base has at least one engine");
        Self { engines }
    }

    /// Queues a group (a request's prompts × `n`) whole on the least-loaded healthy engine.
    pub fn submit_group(&self, mut jobs: GroupJobs) -> Result<Vec<GenStream>, SubmitError> {
        let mut order: Vec<(usize, usize)> = self
            .engines
            .iter()
            .enumerate()
            .filter(|(_, e)| e.health() == Health::Ok)
            .map(|(i, e)| (e.scheduler.in_flight(), i))
            .collect();
        if order.is_empty() {
            return match self.health() {
                Health::Failed(reason) => Err(SubmitError::Unhealthy(reason)),
                Health::Ok => Err(SubmitError::Stopped),
            };
        }
        order.sort_unstable();
        let originals: Vec<_> = jobs
            .iter()
            .map(|(req, _)| (req.lora.clone(), req.overlay.clone()))
            .collect();
        let mut last = SubmitError::Stopped;
        for (_, i) in order {
            let engine = &self.engines[i];
            for ((req, _), (lora, overlay)) in jobs.iter_mut().zip(&originals) {
                (req.lora, req.overlay) = (lora.clone(), overlay.clone());
                if i > 0 {
                    engine.localize(req)?;
                }
            }
            let k = jobs.len() as u64;
            match engine.scheduler.try_submit_group(jobs) {
                Ok(streams) => {
                    engine.routed.fetch_add(k, Ordering::Relaxed);
                    return Ok(streams);
                }
                Err((SubmitError::QueueFull { .. }, back)) if self.engines.len() > 1 => {
                    jobs = back;
                    last = SubmitError::QueueFull {
                        in_flight: self.in_flight(),
                        max: self.max_in_flight(),
                    };
                }
                Err((e, _)) => return Err(e),
            }
        }
        Err(last)
    }

    /// Queues work for engine 0's thread.
    pub fn submit_task(&self, task: Box<dyn EngineTask>) -> Result<(), SubmitError> {
        self.engines[0].scheduler.submit_task(task)
    }

    /// The engines' figures summed.
    pub fn stats(&self) -> LoopStats {
        let mut sum = LoopStats::default();
        for s in self.per_engine().into_iter().map(|e| e.stats) {
            sum.running += s.running;
            sum.waiting += s.waiting;
            sum.restarts += s.restarts;
            sum.preemptions += s.preemptions;
            sum.prefix_cache += s.prefix_cache;
            sum.kv = match (sum.kv, s.kv) {
                (Some(a), Some(b)) => Some(KvUsage {
                    used_blocks: a.used_blocks + b.used_blocks,
                    total_blocks: a.total_blocks + b.total_blocks,
                    block_size: a.block_size,
                    cached_blocks: a.cached_blocks + b.cached_blocks,
                    memo_bytes: a.memo_bytes + b.memo_bytes,
                }),
                (a, b) => a.or(b),
            };
        }
        sum
    }

    /// Each engine's figures.
    pub fn per_engine(&self) -> Vec<EngineFigures<'_>> {
        self.engines
            .iter()
            .map(|e| EngineFigures {
                label: &e.label,
                stats: e.stats(),
                routed: e.routed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Failed only when every engine has failed (their reasons joined).
    pub fn health(&self) -> Health {
        let mut reasons = Vec::new();
        for e in &self.engines {
            match e.health() {
                Health::Ok => return Health::Ok,
                Health::Failed(r) if self.engines.len() == 1 => return Health::Failed(r),
                Health::Failed(r) => reasons.push(format!("{}: {r}", e.label)),
            }
        }
        Health::Failed(reasons.join("; "))
    }

    /// Room in one engine's KV pool (every engine has the same).
    pub fn capacity(&self) -> KvCapacity {
        self.engines[0].scheduler.capacity()
    }

    pub fn len(&self) -> usize {
        self.engines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.engines.iter().map(|e| e.scheduler.in_flight()).sum()
    }

    fn max_in_flight(&self) -> usize {
        self.engines.iter().map(|e| e.scheduler.max_in_flight).sum()
    }
}
