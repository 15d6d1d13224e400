//! The engine's side of prefix caching: a sequence's position keys (its plan's layers, adapter and
//! overlay), reuse of cached KV when a sequence starts, and the offer of its KV when it leaves.
//! The cache decides what it keeps ([`super::kv::prefix`]); an engine whose cache keeps nothing
//! answers every lookup with 0 tokens.

use std::sync::Arc;

use super::kv::prefix::{position_keys, Pin, ScoreMemo};
use super::sample::scoring::TokenScore;
use super::{Engine, EngineError, RunSpec, SeqId};

/// Identity of what a run adds to its plan: the adapter's and the overlay's addresses (kept alive,
/// hence unique, by every cache entry that names them), and whether its prompt rows were exact
/// where exact and rounded rows differ (see [`Engine::exact_class`]).
fn extras_key(spec: &RunSpec, exact: bool) -> u64 {
    let addr = |p: Option<usize>| p.unwrap_or(0) as u64;
    let lora = addr(spec.lora.as_ref().map(|l| Arc::as_ptr(l) as usize));
    let overlay = addr(spec.overlay.as_ref().map(|o| Arc::as_ptr(o) as usize));
    lora ^ overlay.rotate_left(32) ^ u64::from(exact)
}

fn pins(spec: &RunSpec) -> Vec<Pin> {
    let mut pins: Vec<Pin> = Vec::new();
    if let Some(l) = &spec.lora {
        pins.push(l.clone());
    }
    if let Some(o) = &spec.overlay {
        pins.push(o.clone());
    }
    pins
}

impl Engine {
    /// Whether the cache keeps prefixes (`--enable-prefix-caching`).
    pub fn prefix_caching(&self) -> bool {
        self.cache.prefix_caching()
    }

    /// Gives a sequence that holds nothing yet the cached KV of the longest reusable start of
    /// `tokens`; returns how many tokens it now holds (feed the rest). A sequence scoring its
    /// prompt with top-`k` passes `scoring: Some(k)` and also gets the scores of tokens `1..=n`.
    pub fn attach_prefix(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        scoring: Option<usize>,
    ) -> Result<(usize, Vec<TokenScore>), EngineError> {
        if !self.prefix_caching() {
            return Ok((0, Vec::new()));
        }
        let exact = self.exact_class(scoring.is_some());
        let Some(state) = self.seqs.get_mut(&seq) else {
            return Ok((0, Vec::new()));
        };
        if state.len != 0 {
            return Ok((0, Vec::new()));
        }
        let keys = position_keys(state.spec.plan.layers(), extras_key(&state.spec, exact));
        let (n, scores) = self.cache.attach_prefix(seq, &keys, tokens, scoring)?;
        state.len = n;
        self.prefix_queries += tokens.len() as u64;
        self.prefix_hits += n as u64;
        Ok((n, scores))
    }

    /// Offers the KV a sequence holds for its first `tokens`, and the prompt scores it computed,
    /// to the prefix cache (call before releasing it). Failures only lose the offer.
    pub fn offer_prefix(&mut self, seq: SeqId, tokens: &[u32], memo: Option<Arc<ScoreMemo>>) {
        if !self.prefix_caching() {
            return;
        }
        let Some(state) = self.seqs.get(&seq) else {
            return;
        };
        let n = tokens.len().min(state.len);
        let exact = self.exact_class(memo.is_some());
        let keys = position_keys(state.spec.plan.layers(), extras_key(&state.spec, exact));
        let pins = pins(&state.spec);
        if let Err(e) = self.cache.offer_prefix(seq, keys, &tokens[..n], memo, pins) {
            tracing::warn!(error = %e, "a prefix was not cached");
        }
    }

    /// Whether a prompt that is `scored` runs its rows exact in a way that changes its keys and
    /// values: with bf16 weights scored rows are compensated and others rounded (see
    /// [`super::model::activation_dtype`]), so their KV must not stand in for each other; with
    /// f32 weights both are the same f32 computation.
    pub(super) fn exact_class(&self, scored: bool) -> bool {
        scored && self.model.dtype() != candle_core::DType::F32
    }

    /// Prompt tokens looked up in the prefix cache and those found, since the engine started.
    pub fn prefix_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }
}
