//! One request's state in the batcher: what it still has to run through the model, the token it
//! picked last, and what it has produced. A preempted sequence keeps its output and its sampler
//! (so its RNG continues where it stopped) and recomputes its KV from the prompt and the tokens it
//! generated, scoring nothing twice.

use std::sync::Arc;

use super::{FinishReason, GenOutput, GenRequest};
use crate::engine::kv::prefix::ScoreMemo;
use crate::engine::sample::sampler::{DeviceDraw, Sampled, Sampler};
use crate::engine::sample::scoring::TokenScore;
use crate::engine::{ScoreSpec, SeqId, StepItem};

pub(super) struct Sequence {
    pub(super) req: GenRequest,
    pub(super) sampler: Sampler,
    /// Tokens to run before the next pick: the prompt, or after a preemption the prompt and every
    /// generated token.
    context: Vec<u32>,
    /// How much of `context` has been run.
    fed: usize,
    /// The last picked token, run at the next decode step.
    pending: Option<u32>,
    /// Tokens of this sequence the KV cache holds.
    in_kv: usize,
    /// Prompt logprobs are asked for and not yet delivered.
    scoring: bool,
    /// Keep the prompt's scores once delivered, for the prefix cache.
    keep_scores: bool,
    /// The delivered prompt scores, when kept.
    memo: Option<Arc<ScoreMemo>>,
    pub(super) out: GenOutput,
}

impl Sequence {
    pub(super) fn new(req: GenRequest) -> Self {
        let sampler = Sampler::new(req.sampling.clone());
        Self {
            context: req.prompt.clone(),
            scoring: req.prompt_logprobs.is_some(),
            keep_scores: false,
            memo: None,
            req,
            sampler,
            fed: 0,
            pending: None,
            in_kv: 0,
            out: GenOutput {
                prompt_scores: Vec::new(),
                tokens: Vec::new(),
                finish: FinishReason::Length,
                stop_token: None,
            },
        }
    }

    /// `Some(top_k)` while the prompt's logprobs are still to be computed.
    pub(super) fn scoring_top_k(&self) -> Option<usize> {
        self.req.prompt_logprobs.filter(|_| self.scoring)
    }

    /// Keeps the prompt's scores once computed ([`Sequence::score_memo`]).
    pub(super) fn keep_prompt_scores(&mut self) {
        self.keep_scores = true;
    }

    /// The prompt's scores, kept for the prefix cache.
    pub(super) fn score_memo(&self) -> Option<Arc<ScoreMemo>> {
        self.memo.clone()
    }

    pub(super) fn context(&self) -> &[u32] {
        &self.context
    }

    /// Context tokens still to feed.
    pub(super) fn unfed(&self) -> usize {
        self.context.len() - self.fed
    }

    /// Nothing of the context has run yet (and no prefix-cache hit gave any of it).
    pub(super) fn is_fresh(&self) -> bool {
        self.fed == 0 && self.in_kv == 0 && self.pending.is_none()
    }

    /// The cache already holds the first `n` context tokens (a prefix cache hit) and gave the
    /// scores of tokens `1..=n` when the prompt is being scored.
    pub(super) fn start_at(&mut self, n: usize, scores: Vec<TokenScore>) {
        self.fed = n;
        self.in_kv = n;
        if self.scoring {
            self.out.prompt_scores = scores;
        }
    }

    /// The tokens whose KV the cache holds, in order: the prompt, then generated tokens.
    pub(super) fn kv_tokens(&self) -> Vec<u32> {
        self.req
            .prompt
            .iter()
            .copied()
            .chain(self.out.tokens.iter().map(|t| t.token))
            .take(self.in_kv)
            .collect()
    }

    /// Samples the next token from the last position's `logits` (penalties see the prompt and
    /// the tokens generated so far).
    pub(super) fn draw(&mut self, logits: &[f32]) -> Sampled {
        let generated: Vec<u32> = if self.sampler.params().has_penalties() {
            self.out.tokens.iter().map(|t| t.token).collect()
        } else {
            Vec::new()
        };
        self.sampler.sample(logits, &self.req.prompt, &generated)
    }

    /// The settings and uniform number of a draw on the device, when its sampling allows one.
    pub(super) fn device_draw(&mut self) -> Option<DeviceDraw> {
        if !self.sampler.params().device_draw() {
            return None;
        }
        let u = self.sampler.next_uniform();
        Some(DeviceDraw::new(self.sampler.params(), u))
    }

    /// KV the sequence needs to be admitted: its whole context and one picked token, or with
    /// `whole` everything it may ever hold (prompt and `max_tokens`).
    pub(super) fn admission_need(&self, whole: bool) -> usize {
        let now = self.context.len() + 1;
        if whole {
            now.max(self.req.prompt.len() + self.req.max_tokens)
        } else {
            now
        }
    }

    /// The decode item, when a picked token waits to be run.
    pub(super) fn decode_item(&self, seq: SeqId) -> Option<StepItem> {
        self.pending.map(|t| StepItem {
            seq,
            tokens: vec![t],
            score: None,
            want_logits: true,
            greedy_top: self.sampler.params().device_greedy_top(),
            draw: None,
        })
    }

    /// The next chunk of at most `budget` context tokens, when some remain.
    pub(super) fn prefill_item(&self, seq: SeqId, budget: usize) -> Option<StepItem> {
        let remaining = self.context.len() - self.fed;
        if self.pending.is_some() || remaining == 0 || budget == 0 {
            return None;
        }
        let end = self.fed + remaining.min(budget);
        let score = self
            .req
            .prompt_logprobs
            .filter(|_| self.scoring)
            .map(|top_k| ScoreSpec {
                targets: self.context[self.fed + 1..(end + 1).min(self.context.len())].to_vec(),
                top_k,
            });
        Some(StepItem {
            seq,
            tokens: self.context[self.fed..end].to_vec(),
            score,
            want_logits: end == self.context.len() && self.out.tokens.len() < self.req.max_tokens,
            greedy_top: self.sampler.params().device_greedy_top(),
            draw: None,
        })
    }

    /// KV tokens after running `item`.
    pub(super) fn kv_after(&self, item: &StepItem) -> usize {
        self.in_kv + item.tokens.len()
    }

    /// Records a run item; returns the prompt's logprobs when they are now complete.
    pub(super) fn ran(
        &mut self,
        item: &StepItem,
        scores: Vec<crate::engine::sample::scoring::TokenScore>,
    ) -> Option<Vec<crate::engine::sample::scoring::TokenScore>> {
        self.in_kv += item.tokens.len();
        if self.pending.take().is_some() {
            return None;
        }
        self.fed += item.tokens.len();
        self.out.prompt_scores.extend(scores);
        if self.scoring && self.fed == self.context.len() {
            self.scoring = false;
            let scores = std::mem::take(&mut self.out.prompt_scores);
            if self.keep_scores {
                self.memo = self.req.prompt_logprobs.map(|top_k| {
                    Arc::new(ScoreMemo {
                        top_k,
                        tokens: self.req.prompt.clone(),
                        scores: scores.clone(),
                    })
                });
            }
            return Some(scores);
        }
        None
    }

    /// The whole context has run (nothing more to feed before a pick).
    pub(super) fn context_done(&self) -> bool {
        self.fed == self.context.len()
    }

    /// Takes a picked token: `true` when the sequence is finished (stop id or length).
    pub(super) fn picked(&mut self, s: &Sampled) -> bool {
        let stops = self.req.stop_token_ids.contains(&s.token)
            || (!self.req.ignore_eos && self.req.eos_token_ids.contains(&s.token));
        if stops {
            self.out.finish = FinishReason::Stop;
            self.out.stop_token = Some(s.token);
            return true;
        }
        self.out.tokens.push(s.clone());
        self.pending = Some(s.token);
        self.out.tokens.len() >= self.req.max_tokens
    }

    /// Forgets the KV (the engine freed it): everything generated is recomputed, after the
    /// prompt, before the next pick; prompt logprobs not yet delivered are scored again.
    pub(super) fn preempt(&mut self) {
        self.context = self.req.prompt.clone();
        self.context.extend(self.out.tokens.iter().map(|t| t.token));
        self.fed = 0;
        self.in_kv = 0;
        self.pending = None;
        if self.scoring {
            self.out.prompt_scores.clear();
        }
    }
}
