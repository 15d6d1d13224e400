//! Continuous batching of generation and scoring requests over one [`Engine`]: requests join and
//! leave between steps; each step feeds every decoding sequence one token and fills the rest of the
//! token budget with prefill chunks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use super::adapters::LoraAdapter;
use super::kv::KvError;
use super::model::overlay::ModelOverlay;
use super::sample::sampler::{Sampled, Sampler, SamplingParams};
use super::sample::scoring::TokenScore;
use super::RunSpec;
use super::{Engine, EngineError, ScoreSpec, SeqId, StepItem};
use crate::plan::LayerPlan;

/// A request: score its prompt and/or generate up to `max_tokens`.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub plan: Arc<LayerPlan>,
    /// Replacement tensors of an overlay variant.
    pub overlay: Option<Arc<ModelOverlay>>,
    /// The LoRA adapter of an adapter variant.
    pub lora: Option<Arc<LoraAdapter>>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// `Some(k)`: return the logprob of every prompt token after the first, with top-`k`.
    pub prompt_logprobs: Option<usize>,
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence ids that stop generation unless `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

impl GenRequest {
    /// What the request's sequence runs.
    pub fn run_spec(&self) -> RunSpec {
        RunSpec {
            plan: self.plan.clone(),
            overlay: self.overlay.clone(),
            lora: self.lora.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    /// The API's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    /// `prompt.len() - 1` entries when prompt logprobs were asked for ([`Batcher::run_all`] fills
    /// them in; a stepping caller gets them as [`BatchEvent::PromptScored`]).
    pub prompt_scores: Vec<TokenScore>,
    /// Generated tokens; a stop/eos token that ended generation is not included.
    pub tokens: Vec<Sampled>,
    pub finish: FinishReason,
    /// The token id that stopped generation, if any.
    pub stop_token: Option<u32>,
}

/// What a step produced for one request.
#[derive(Debug)]
pub enum BatchEvent {
    /// The whole prompt was run; its logprobs, when they were asked for.
    PromptScored {
        id: SeqId,
        scores: Vec<TokenScore>,
    },
    Token {
        id: SeqId,
        token: Sampled,
    },
    Finished {
        id: SeqId,
        output: GenOutput,
    },
    Failed {
        id: SeqId,
        error: EngineError,
    },
}

struct Active {
    req: GenRequest,
    sampler: Sampler,
    fed: usize,
    pending: Option<u32>,
    out: GenOutput,
}

pub struct Batcher {
    engine: Engine,
    /// Accepted requests not yet holding KV room, first come first served.
    waiting: VecDeque<(SeqId, GenRequest)>,
    active: HashMap<SeqId, Active>,
    /// Admission order, so prefill is first come, first served.
    order: Vec<SeqId>,
    next_id: SeqId,
    max_step_tokens: usize,
    stats: super::instrument::step_stats::StepStats,
}

impl Batcher {
    pub fn new(engine: Engine, max_step_tokens: usize) -> Self {
        Self {
            engine,
            waiting: VecDeque::new(),
            active: HashMap::new(),
            order: Vec::new(),
            next_id: 1,
            max_step_tokens: max_step_tokens.max(1),
            stats: Default::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Requests holding KV room and running.
    pub fn num_active(&self) -> usize {
        self.active.len()
    }

    /// Requests accepted but waiting for KV room.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// Admits a request under the next free id; fails at once if it can never run (empty
    /// prompt, too long, bad plan).
    pub fn submit(&mut self, req: GenRequest) -> Result<SeqId, EngineError> {
        let id = self.next_id;
        self.submit_as(id, req)?;
        Ok(id)
    }

    /// Admits a request under the caller's id (ids must not repeat; [`Batcher::submit`] and
    /// this are not mixed on one batcher). The server's validation has checked the request
    /// against the same limits already; these checks guard direct callers (bench, selftest).
    pub fn submit_as(&mut self, id: SeqId, req: GenRequest) -> Result<(), EngineError> {
        if self.active.contains_key(&id) || self.waiting.iter().any(|(w, _)| *w == id) {
            return Err(KvError::DuplicateSequence(id).into());
        }
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyInput(id));
        }
        let total = req.prompt.len().saturating_add(req.max_tokens);
        if total > self.engine.max_len() {
            return Err(EngineError::ContextTooLong {
                len: total,
                max: self.engine.max_len(),
            });
        }
        let vocab = self.engine.model().config().vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { id: bad, vocab });
        }
        if req.plan.base_layers() != self.engine.model().config().num_hidden_layers {
            return Err(EngineError::PlanMismatch {
                plan: req.plan.base_layers(),
                model: self.engine.model().config().num_hidden_layers,
            });
        }
        self.next_id = self.next_id.max(id + 1);
        self.waiting.push_back((id, req));
        Ok(())
    }

    /// Moves waiting requests into the running set while their whole KV need (prompt +
    /// `max_tokens`) can be reserved, so a running request never runs out of blocks. A request
    /// that cannot fit even into an empty cache fails.
    fn admit_waiting(&mut self, events: &mut Vec<BatchEvent>) {
        while let Some((id, req)) = self.waiting.pop_front() {
            let need = req.prompt.len().saturating_add(req.max_tokens);
            let admitted = self
                .engine
                .add_sequence(id, req.run_spec())
                .and_then(|_| self.engine.reserve(id, need));
            match admitted {
                Ok(()) => {
                    let out = GenOutput {
                        prompt_scores: Vec::new(),
                        tokens: Vec::new(),
                        finish: FinishReason::Length,
                        stop_token: None,
                    };
                    let sampler = Sampler::new(req.sampling.clone());
                    self.active.insert(
                        id,
                        Active {
                            req,
                            sampler,
                            fed: 0,
                            pending: None,
                            out,
                        },
                    );
                    self.order.push(id);
                }
                Err(error) => {
                    self.engine.release(id);
                    let never_fits = matches!(error, EngineError::Kv(KvError::OutOfBlocks { needed, total, .. }) if needed > total);
                    if never_fits || self.active.is_empty() {
                        events.push(BatchEvent::Failed { id, error });
                    } else {
                        self.waiting.push_front((id, req));
                        return;
                    }
                }
            }
        }
    }

    /// Drops a request and frees its KV blocks.
    pub fn cancel(&mut self, id: SeqId) {
        self.waiting.retain(|(w, _)| *w != id);
        if self.active.remove(&id).is_some() {
            self.order.retain(|&x| x != id);
            self.engine.release(id);
        }
    }

    fn plan_step(&self) -> Vec<StepItem> {
        let mut items = Vec::new();
        let mut budget = self.max_step_tokens;
        for id in &self.order {
            let a = &self.active[id];
            if let Some(t) = a.pending {
                items.push(StepItem {
                    seq: *id,
                    tokens: vec![t],
                    score: None,
                    want_logits: true,
                    greedy_top: a.sampler.params().device_greedy_top(),
                });
                budget = budget.saturating_sub(1);
            }
        }
        for id in &self.order {
            let a = &self.active[id];
            let remaining = a.req.prompt.len() - a.fed;
            if a.pending.is_some() || remaining == 0 || budget == 0 {
                continue;
            }
            let n = remaining.min(budget);
            budget -= n;
            let end = a.fed + n;
            let score = a.req.prompt_logprobs.map(|top_k| ScoreSpec {
                targets: a.req.prompt[a.fed + 1..(end + 1).min(a.req.prompt.len())].to_vec(),
                top_k,
            });
            items.push(StepItem {
                seq: *id,
                tokens: a.req.prompt[a.fed..end].to_vec(),
                score,
                want_logits: end == a.req.prompt.len() && a.req.max_tokens > 0,
                greedy_top: a.sampler.params().device_greedy_top(),
            });
        }
        items
    }

    /// Runs one engine step and reports tokens, finished and failed requests.
    pub fn step(&mut self) -> Vec<BatchEvent> {
        let mut events = Vec::new();
        self.admit_waiting(&mut events);
        let items = self.plan_step();
        if items.is_empty() {
            events.extend(self.finish_idle());
            return events;
        }
        let started = std::time::Instant::now();
        let results = self.engine.step(&items);
        self.stats.record(&items, started.elapsed());
        for (item, result) in items.iter().zip(results) {
            let id = item.seq;
            let out = match result {
                Ok(o) => o,
                Err(error) => {
                    self.cancel(id);
                    events.push(BatchEvent::Failed { id, error });
                    continue;
                }
            };
            let Some(a) = self.active.get_mut(&id) else {
                continue;
            };
            if a.pending.take().is_none() {
                a.fed += item.tokens.len();
                a.out.prompt_scores.extend(out.scores);
                if a.fed == a.req.prompt.len() && a.req.prompt_logprobs.is_some() {
                    let scores = std::mem::take(&mut a.out.prompt_scores);
                    events.push(BatchEvent::PromptScored { id, scores });
                }
            }
            let picked = match (out.greedy, out.logits) {
                (Some(g), _) => Some(g),
                (None, Some(logits)) => {
                    let generated: Vec<u32> = a.out.tokens.iter().map(|t| t.token).collect();
                    Some(a.sampler.sample(&logits, &a.req.prompt, &generated))
                }
                (None, None) => None,
            };
            let done = match picked {
                Some(s) => {
                    let stops = a.req.stop_token_ids.contains(&s.token)
                        || (!a.req.ignore_eos && a.req.eos_token_ids.contains(&s.token));
                    if stops {
                        a.out.finish = FinishReason::Stop;
                        a.out.stop_token = Some(s.token);
                        true
                    } else {
                        a.out.tokens.push(s.clone());
                        events.push(BatchEvent::Token {
                            id,
                            token: s.clone(),
                        });
                        a.pending = Some(s.token);
                        a.out.tokens.len() >= a.req.max_tokens
                    }
                }
                None => a.fed == a.req.prompt.len(),
            };
            if done {
                self.finish(id, &mut events);
            }
        }
        events
    }

    fn finish(&mut self, id: SeqId, events: &mut Vec<BatchEvent>) {
        if let Some(a) = self.active.remove(&id) {
            self.order.retain(|&x| x != id);
            self.engine.release(id);
            events.push(BatchEvent::Finished { id, output: a.out });
        }
    }

    /// Requests with nothing left to run (e.g. `max_tokens == 0` and a one-token prompt).
    fn finish_idle(&mut self) -> Vec<BatchEvent> {
        let idle: Vec<SeqId> = self.order.clone();
        let mut events = Vec::new();
        for id in idle {
            self.finish(id, &mut events);
        }
        events
    }

    /// Runs requests together until all are done; results in request order.
    pub fn run_all(&mut self, reqs: Vec<GenRequest>) -> Vec<Result<GenOutput, EngineError>> {
        let mut ids = Vec::with_capacity(reqs.len());
        for r in reqs {
            ids.push(self.submit(r));
        }
        let mut done: HashMap<SeqId, Result<GenOutput, EngineError>> = HashMap::new();
        let mut scores: HashMap<SeqId, Vec<TokenScore>> = HashMap::new();
        while !self.is_idle() {
            for ev in self.step() {
                match ev {
                    BatchEvent::PromptScored { id, scores: s } => {
                        scores.insert(id, s);
                    }
                    BatchEvent::Finished { id, mut output } => {
                        output.prompt_scores = scores.remove(&id).unwrap_or_default();
                        done.insert(id, Ok(output));
                    }
                    BatchEvent::Failed { id, error } => {
                        done.insert(id, Err(error));
                    }
                    BatchEvent::Token { .. } => {}
                }
            }
        }
        ids.into_iter()
            .map(|r| r.and_then(|id| done.remove(&id).unwrap_or(Err(EngineError::Lost(id)))))
            .collect()
    }
}
