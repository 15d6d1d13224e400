//! Continuous batching of generation and scoring requests over one [`Engine`]: requests join and
//! leave between steps; each step feeds every decoding sequence one token and fills the rest of the
//! token budget with prefill chunks.
//!
//! KV on demand: a request is admitted when the KV its context needs now fits (not its whole
//! `max_tokens`), and sequences grow block by block. When the pool runs out, the most recently
//! admitted sequences are preempted (vLLM's recompute policy): their KV is freed and they resume
//! later with the same output, sampler state and prompt logprobs.

mod sequence;
mod warm_up;

#[cfg(test)]
mod precision_tests;
#[cfg(test)]
mod prefill_cap_tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use super::adapters::LoraAdapter;
use super::kv::KvError;
use super::model::overlay::ModelOverlay;
use super::sample::sampler::{Sampled, SamplingParams};
use super::sample::scoring::TokenScore;
use super::RunSpec;
use super::{Engine, EngineError, SeqId, StepItem};
use crate::plan::LayerPlan;
use sequence::Sequence;

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

pub struct Batcher {
    engine: Engine,
    /// Accepted requests not holding KV room (new, or preempted: those go first), in order.
    waiting: VecDeque<(SeqId, Sequence)>,
    active: HashMap<SeqId, Sequence>,
    /// Admission order, so prefill is first come, first served and the latest admitted is
    /// preempted first.
    order: Vec<SeqId>,
    next_id: SeqId,
    max_step_tokens: usize,
    /// Most prompt tokens a step carries beside decoding rows (`max_step_tokens`: no cap).
    prefill_while_decoding: usize,
    preemptions: u64,
    /// Admit only when KV for the prompt and all of `max_tokens` fits (never preempts).
    reserve_max_tokens: bool,
    stats: super::instrument::step_stats::StepStats,
}

impl Batcher {
    /// Decode-only steps this batcher has run (see [`StepStats`](super::instrument::step_stats)).
    pub fn decode_only_steps(&self) -> super::instrument::step_stats::DecodeOnly {
        self.stats.decode_only()
    }

    pub fn new(engine: Engine, max_step_tokens: usize) -> Self {
        Self {
            engine,
            waiting: VecDeque::new(),
            active: HashMap::new(),
            order: Vec::new(),
            next_id: 1,
            max_step_tokens: max_step_tokens.max(1),
            prefill_while_decoding: max_step_tokens.max(1),
            preemptions: 0,
            reserve_max_tokens: false,
            stats: Default::default(),
        }
    }

    /// Admits a request only when KV for its prompt and all of its `max_tokens` can be reserved
    /// at once (`serve --reserve-max-tokens`): nothing is ever preempted, and fewer sequences run
    /// at once than with KV on demand.
    pub fn reserving_max_tokens(mut self, on: bool) -> Self {
        self.reserve_max_tokens = on;
        self
    }

    /// Caps the prompt tokens of a step that also decodes (`serve --max-prefill-while-decoding`),
    /// so a long prefill delays the decoding sequences' next token by a bounded step; steps
    /// without decoding rows still take up to `max_step_tokens`. 0 leaves no cap. A scored prompt
    /// that would run whole in an uncapped step (see [`Batcher::waits_to_run_whole`]) runs whole
    /// as the step's first prompt, over the cap, rather than wait while others decode.
    pub fn capping_prefill_while_decoding(mut self, tokens: usize) -> Self {
        self.prefill_while_decoding = match tokens {
            0 => self.max_step_tokens,
            n => n.min(self.max_step_tokens),
        };
        self
    }

    /// The prompt tokens a step with `decode_rows` decoding rows may carry.
    fn prefill_budget(&self, decode_rows: usize) -> usize {
        let room = self.max_step_tokens.saturating_sub(decode_rows);
        if decode_rows == 0 {
            room
        } else {
            room.min(self.prefill_while_decoding)
        }
    }

    /// Sequences preempted so far (their KV freed, to be recomputed).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Prompt tokens looked up in the prefix cache and those found.
    pub fn prefix_counts(&self) -> (u64, u64) {
        self.engine.prefix_counts()
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
        self.waiting.push_back((id, Sequence::new(req)));
        Ok(())
    }

    /// Moves waiting requests into the running set while the KV their context needs now (not
    /// their whole `max_tokens`, unless reserving it) can be reserved; a request that cannot fit
    /// even into an empty cache fails. Sequences grow their KV step by step
    /// ([`Batcher::reserve_or_preempt`]).
    fn admit_waiting(&mut self, events: &mut Vec<BatchEvent>) {
        while let Some((id, mut seq)) = self.waiting.pop_front() {
            let admitted = self
                .engine
                .add_sequence(id, seq.req.run_spec())
                .and_then(|_| {
                    self.engine
                        .reserve(id, seq.admission_need(self.reserve_max_tokens))
                });
            match admitted {
                Ok(()) => {
                    self.reuse_prefix(id, &mut seq);
                    self.active.insert(id, seq);
                    self.order.push(id);
                }
                Err(error) => {
                    self.engine.release(id);
                    let never_fits = matches!(error, EngineError::Kv(KvError::OutOfBlocks { needed, total, .. }) if needed > total);
                    if never_fits || self.active.is_empty() {
                        events.push(BatchEvent::Failed { id, error });
                    } else {
                        self.waiting.push_front((id, seq));
                        return;
                    }
                }
            }
        }
    }

    /// Starts an admitted sequence from cached KV where the prefix cache has its start; a
    /// sequence still to score its prompt also takes the cached scores of those tokens (and keeps
    /// its own scores, to offer them with its KV).
    fn reuse_prefix(&mut self, id: SeqId, seq: &mut Sequence) {
        if !self.engine.prefix_caching() {
            return;
        }
        seq.keep_prompt_scores();
        match self
            .engine
            .attach_prefix(id, seq.context(), seq.scoring_top_k())
        {
            Ok((n, scores)) => seq.start_at(n, scores),
            Err(e) => tracing::warn!(error = %e, "prefix cache lookup failed"),
        }
    }

    /// Frees a sequence's KV, offering it and its prompt scores to the prefix cache first (when
    /// there is one: the token list is not built otherwise).
    fn release_kv(&mut self, id: SeqId, seq: &Sequence) {
        if self.engine.prefix_caching() {
            self.engine
                .offer_prefix(id, &seq.kv_tokens(), seq.score_memo());
        }
        self.engine.release(id);
    }

    /// Drops a request and frees its KV blocks.
    pub fn cancel(&mut self, id: SeqId) {
        self.waiting.retain(|(w, _)| *w != id);
        if self.active.remove(&id).is_some() {
            self.order.retain(|&x| x != id);
            self.engine.release(id);
        }
    }

    /// Decode rows first (one token each), then prefill chunks, within the step budget; both in
    /// admission order. When the engine shares hidden states across plans, a fresh prompt goes
    /// with as many of its twins (other fresh sequences of the same context, on other plans) as
    /// fit whole beside it; when not even one fits beside what the step holds but would in an
    /// emptier step, the prompt waits for the next.
    fn plan_step(&self) -> Vec<StepItem> {
        let mut items: Vec<StepItem> = self
            .order
            .iter()
            .filter_map(|id| self.active[id].decode_item(*id))
            .collect();
        let decode_rows = items.len();
        let mut budget = self.prefill_budget(decode_rows);
        let mut taken: Vec<SeqId> = Vec::new();
        for id in &self.order {
            if taken.contains(id) {
                continue;
            }
            let seq = &self.active[id];
            let Some(mut item) = seq.prefill_item(*id, budget) else {
                continue;
            };
            if self.waits_to_run_whole(seq, &item) {
                let Some(whole) = self.whole_over_cap(seq, *id, items.len() == decode_rows) else {
                    continue;
                };
                budget = whole.tokens.len(); // over the cap: no other prompt joins this step
                item = whole;
            }
            let twins = self.twins(*id, &taken);
            if !twins.is_empty() {
                let len = seq.context().len().max(1);
                let fit = (budget / len).min(1 + twins.len());
                if fit >= 2 {
                    for &t in &twins[..fit - 1] {
                        if let Some(it) = self.active[&t].prefill_item(t, budget) {
                            budget -= it.tokens.len();
                            items.push(it);
                            taken.push(t);
                        }
                    }
                } else if items.len() > decode_rows && 2 * len <= self.prefill_budget(decode_rows) {
                    continue;
                }
            }
            budget -= item.tokens.len();
            items.push(item);
            taken.push(*id);
        }
        items
    }

    /// A scored prompt is not split to fill a step when a step could run the rest of it whole:
    /// with bf16 weights its continued chunk would attend to the cache's bf16 keys and values
    /// instead of its own f32 ones (1e-3 to 1e-2 nats, against 2e-4 in one chunk). It goes first
    /// in a later step instead (decode rows aside, the whole budget is its).
    fn waits_to_run_whole(&self, seq: &Sequence, item: &StepItem) -> bool {
        let rest = seq.unfed();
        item.score.is_some()
            && item.tokens.len() < rest
            && rest <= self.max_step_tokens.saturating_sub(self.active.len())
            && self.engine.exact_class(true)
    }

    /// A scored prompt held back by [`Batcher::waits_to_run_whole`] only because the cap on
    /// prompt tokens beside decoding rows cut it: its whole rest, when it is the step's `first`
    /// prompt and fits the uncapped budget (the cap would otherwise hold it back for as long as
    /// anything decodes).
    fn whole_over_cap(&self, seq: &Sequence, id: SeqId, first: bool) -> Option<StepItem> {
        let room = self.max_step_tokens.saturating_sub(self.active.len());
        let whole = seq.prefill_item(id, room)?;
        (first && whole.tokens.len() == seq.unfed()).then_some(whole)
    }

    /// The other fresh sequences (in admission order, not yet `taken` into the step) with the
    /// same context as `id` on another plan, when it is fresh and the engine shares hidden
    /// states.
    fn twins(&self, id: SeqId, taken: &[SeqId]) -> Vec<SeqId> {
        let seq = &self.active[&id];
        if !self.engine.shares_hidden() || !seq.is_fresh() {
            return Vec::new();
        }
        self.order
            .iter()
            .filter(|&&t| {
                let s = &self.active[&t];
                t != id
                    && !taken.contains(&t)
                    && s.is_fresh()
                    && *s.req.plan != *seq.req.plan
                    && s.context() == seq.context()
            })
            .copied()
            .collect()
    }

    /// Reserves the KV each planned item needs, in plan order. When the pool runs out, the most
    /// recently admitted running sequence is preempted (its KV freed; it waits at the front of
    /// the queue and recomputes it later), down to the sequence asking, which then sits this step
    /// out itself.
    fn reserve_or_preempt(&mut self, items: Vec<StepItem>) -> Vec<StepItem> {
        let mut planned: Vec<StepItem> = Vec::with_capacity(items.len());
        let mut dropped: Vec<SeqId> = Vec::new();
        for item in items {
            if dropped.contains(&item.seq) {
                continue;
            }
            loop {
                let need = self.active[&item.seq].kv_after(&item);
                match self.engine.reserve(item.seq, need) {
                    Ok(()) => {
                        planned.push(item);
                        break;
                    }
                    Err(_) => {
                        let Some(&victim) = self.order.last() else {
                            break;
                        };
                        self.preempt(victim);
                        dropped.push(victim);
                        planned.retain(|p| p.seq != victim);
                        if victim == item.seq {
                            break;
                        }
                    }
                }
            }
        }
        planned
    }

    fn preempt(&mut self, id: SeqId) {
        if let Some(mut seq) = self.active.remove(&id) {
            self.order.retain(|&x| x != id);
            self.release_kv(id, &seq);
            seq.preempt();
            self.preemptions += 1;
            self.waiting.push_front((id, seq));
        }
    }

    /// Runs one engine step and reports tokens, finished and failed requests.
    pub fn step(&mut self) -> Vec<BatchEvent> {
        let mut events = Vec::new();
        self.admit_waiting(&mut events);
        let planned = self.plan_step();
        let mut items = self.reserve_or_preempt(planned);
        self.assign_device_draws(&mut items);
        if items.is_empty() {
            if self.waiting.is_empty() {
                events.extend(self.finish_idle());
            }
            return events;
        }
        let started = std::time::Instant::now();
        let mut results = self.engine.step(&items);
        self.stats.record(&items, started.elapsed());
        let mut drawn = self.draw_tokens(&mut results);
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
            if let Some(scores) = a.ran(item, out.scores) {
                events.push(BatchEvent::PromptScored { id, scores });
            }
            let picked = out.greedy.or_else(|| drawn.remove(&id));
            let done = match picked {
                Some(s) => {
                    let finished = a.picked(&s);
                    if a.out.stop_token.is_none() {
                        events.push(BatchEvent::Token { id, token: s });
                    }
                    finished
                }
                None => a.context_done() && a.req.max_tokens == 0,
            };
            if done {
                self.finish(id, &mut events);
            }
        }
        events
    }

    /// Marks the sampled rows the engine can draw on the device, each with the next uniform number
    /// of its sequence's generator (taken only for rows that run, so a preempted sequence draws
    /// the same numbers when it resumes).
    fn assign_device_draws(&mut self, items: &mut [StepItem]) {
        if !self.engine.draws_on_device() {
            return;
        }
        for it in items
            .iter_mut()
            .filter(|it| it.want_logits && it.greedy_top.is_none())
        {
            if let Some(seq) = self.active.get_mut(&it.seq) {
                it.draw = seq.device_draw();
            }
        }
    }

    /// Samples the next token of every row that returned logits (moved out of `results`), the
    /// rows in parallel: each sequence draws from its own seeded sampler, so the threads change
    /// nothing but the time.
    fn draw_tokens(
        &mut self,
        results: &mut [Result<super::StepOutput, EngineError>],
    ) -> HashMap<SeqId, Sampled> {
        let mut logits: HashMap<SeqId, Vec<f32>> = results
            .iter_mut()
            .filter_map(|r| r.as_mut().ok())
            .filter_map(|o| Some((o.seq, o.logits.take()?)))
            .collect();
        let mut rows: Vec<(SeqId, &mut Sequence, Vec<f32>)> = self
            .active
            .iter_mut()
            .filter_map(|(id, seq)| Some((*id, seq, logits.remove(id)?)))
            .collect();
        rows.par_iter_mut()
            .map(|(id, seq, logits)| (*id, seq.draw(logits)))
            .collect()
    }

    fn finish(&mut self, id: SeqId, events: &mut Vec<BatchEvent>) {
        if let Some(a) = self.active.remove(&id) {
            self.order.retain(|&x| x != id);
            self.release_kv(id, &a);
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
