//! Automatic prefix caching: the keys and values of finished (or preempted) sequences, kept by
//! what produced them, reused by later sequences that would compute the same ones. The store
//! decides what is kept; what an entry holds is the cache's ([`CachedKv`]): copies of the
//! tensors (the contiguous cache) or references to pool blocks (the paged cache, which counts
//! them, so the store hands back what it drops).
//!
//! A cached entry holds, for each position of its plan, the KV of its first `n` tokens (whole
//! blocks). The KV at plan position `p` depends on the tokens and on what ran up to and including
//! that position: the base layers `plan[0..=p]`, the LoRA adapter and the overlay. A sequence can
//! reuse `d` tokens of an entry when its own position keys equal the entry's first ones (so `rev25`
//! reuses the base's entries: its plan is the base's first 22 layers) and its tokens start with the
//! entry's first `d` tokens. Reuse is all-or-nothing over the sequence's positions: a plan that
//! diverges from the entry at some layer needs the hidden states there, which are not kept.
//!
//! Entries occupy blocks of the pool as sequences do (full plan depth; the paged cache shares
//! them with the sequences that use them); the least recently used is evicted when room is
//! needed. Hits never show in results beyond the float reordering of chunked
//! prefill (a continued chunk attends to cached history in the cache's dtype, f32 on the CPU).
//!
//! Prompt logprobs: an entry offered by a sequence that scored its prompt keeps those scores (a
//! [`ScoreMemo`]). A scoring sequence reuses only an entry of exactly its own plan (same keys: the
//! logprobs depend on every layer), only as many tokens as the memo scored with the same tokens,
//! and takes the memo's scores for them, cut to its own top-k (the top lists are ordered with
//! ties to the lower id, so a longer list cut is the shorter one). Memos are held in host memory
//! beside the entry's blocks ([`PrefixStore::memo_bytes`]).

use std::sync::Arc;

use candle_core::Tensor;

use crate::engine::sample::scoring::TokenScore;

/// Keeps what an entry's keys name alive (its adapter, its overlay), so the address a key was
/// made from is never reused by another while the entry exists.
pub type Pin = Arc<dyn std::any::Any + Send + Sync>;

/// The prompt logprobs a scoring sequence computed: `scores[i]` is the score of `tokens[i + 1]`
/// with its top-`top_k` alternatives (`tokens` is the sequence's whole prompt).
#[derive(Debug, Clone)]
pub struct ScoreMemo {
    pub top_k: usize,
    pub tokens: Vec<u32>,
    pub scores: Vec<TokenScore>,
}

impl ScoreMemo {
    /// Whether this memo holds every score `other` holds, with at least its alternatives.
    fn covers(&self, other: &ScoreMemo) -> bool {
        self.top_k >= other.top_k
            && self.tokens.starts_with(&other.tokens)
            && self.scores.len() >= other.scores.len()
    }

    /// Host bytes held.
    fn bytes(&self) -> usize {
        let top: usize = self.scores.iter().map(|s| s.top.len()).sum();
        self.tokens.len() * 4 + self.scores.len() * std::mem::size_of::<TokenScore>() + top * 8
    }
}

/// What an entry holds per plan position for its tokens.
pub trait CachedKv: Sized {
    /// The first `tokens` tokens (whole blocks) at the first `positions` plan positions, for a
    /// sequence that reuses them.
    fn head(&self, positions: usize, tokens: usize) -> candle_core::Result<Self>;
    /// The first `tokens` tokens at every position, as an entry keeps them.
    fn keep(&self, tokens: usize) -> candle_core::Result<Self>;
    fn positions(&self) -> usize;
}

/// The contiguous cache's: keys and values `[kv_heads, tokens, head_dim]` per position.
impl CachedKv for Vec<(Tensor, Tensor)> {
    fn head(&self, positions: usize, tokens: usize) -> candle_core::Result<Self> {
        self[..positions.min(self.len())]
            .iter()
            .map(|(k, v)| Ok((k.narrow(1, 0, tokens)?, v.narrow(1, 0, tokens)?)))
            .collect()
    }

    fn keep(&self, tokens: usize) -> candle_core::Result<Self> {
        // Copies: the sequence's tensors also hold what comes after.
        self.iter()
            .map(|(k, v)| {
                Ok((
                    k.narrow(1, 0, tokens)?.contiguous()?,
                    v.narrow(1, 0, tokens)?.contiguous()?,
                ))
            })
            .collect()
    }

    fn positions(&self) -> usize {
        self.len()
    }
}

/// One cached prefix.
struct Entry<P> {
    /// Per plan position, the key of what produced its KV.
    keys: Vec<u64>,
    tokens: Vec<u32>,
    kv: P,
    memo: Option<Arc<ScoreMemo>>,
    /// Host bytes of `memo` (counted once, when the entry is made).
    memo_bytes: usize,
    blocks: usize,
    last_used: u64,
    _pins: Vec<Pin>,
}

impl<P> Entry<P> {
    /// How many of `tokens` a sequence can take from this entry, at most `limit` (the caller
    /// rounds down to whole blocks): for a scoring sequence (`Some(top_k)`) also no more than the memo scored
    /// with the same tokens (the score of token `d` included).
    fn usable(&self, keys: &[u64], tokens: &[u32], scoring: Option<usize>, limit: usize) -> usize {
        let common = |a: &[u32]| a.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let mut n = common(&self.tokens).min(limit);
        match (scoring, &self.memo) {
            (None, _) if self.keys.starts_with(keys) => {}
            (Some(k), Some(m)) if self.keys == keys && m.top_k >= k => {
                n = n
                    .min(common(&m.tokens).saturating_sub(1))
                    .min(m.scores.len());
            }
            _ => return 0,
        }
        n
    }
}

pub struct PrefixStore<P> {
    entries: Vec<Entry<P>>,
    block_size: usize,
    clock: u64,
    /// Blocks held by entries.
    pub used_blocks: usize,
    /// Host bytes held by the entries' prompt-logprob memos.
    memo_bytes: usize,
}

/// What a lookup found: the KV of the first `tokens` tokens for each of the asking plan's
/// positions, and for a scoring sequence the scores of tokens `1..=tokens`.
pub struct PrefixHit<P> {
    pub tokens: usize,
    pub kv: P,
    pub scores: Vec<TokenScore>,
}

impl<P: CachedKv> PrefixStore<P> {
    pub fn new(block_size: usize) -> Self {
        Self {
            entries: Vec::new(),
            block_size,
            clock: 0,
            used_blocks: 0,
            memo_bytes: 0,
        }
    }

    /// Host bytes held by the entries' prompt-logprob memos (a running total: the engine loop
    /// reads it after every step).
    pub fn memo_bytes(&self) -> usize {
        self.memo_bytes
    }

    /// Takes a removed entry's blocks and memo bytes off the totals; returns what it held.
    fn forget(&mut self, e: Entry<P>) -> P {
        self.used_blocks -= e.blocks;
        self.memo_bytes -= e.memo_bytes;
        e.kv
    }

    /// The longest reusable prefix for a sequence with position `keys` and `tokens`, in whole
    /// blocks, leaving at least one token to compute (its logits are needed). A sequence that
    /// scores its prompt with top-`k` passes `scoring: Some(k)` and gets the scores too.
    pub fn lookup(
        &mut self,
        keys: &[u64],
        tokens: &[u32],
        scoring: Option<usize>,
    ) -> candle_core::Result<Option<PrefixHit<P>>> {
        let limit = tokens.len().saturating_sub(1);
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let usable = e.usable(keys, tokens, scoring, limit) / self.block_size * self.block_size;
            if usable > 0 && best.is_none_or(|(_, n)| usable > n) {
                best = Some((i, usable));
            }
        }
        let Some((i, n)) = best else {
            return Ok(None);
        };
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        let kv = e.kv.head(keys.len(), n)?;
        let scores = match (scoring, &e.memo) {
            (Some(k), Some(m)) => m.scores[..n]
                .iter()
                .map(|s| TokenScore {
                    token: s.token,
                    logprob: s.logprob,
                    top: s.top[..k.min(s.top.len())].to_vec(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(Some(PrefixHit {
            tokens: n,
            kv,
            scores,
        }))
    }

    /// Keeps the whole blocks of `tokens` whose KV `kv` holds (per position, at least that many
    /// tokens) and the prompt scores `memo` of the sequence that computed them, unless an entry
    /// already covers both; an entry this one covers is replaced. Returns what was kept (`None`
    /// when nothing was) and what the replaced entries held.
    pub fn offer(
        &mut self,
        keys: Vec<u64>,
        tokens: &[u32],
        kv: &P,
        memo: Option<Arc<ScoreMemo>>,
        pins: Vec<Pin>,
    ) -> candle_core::Result<Offered<'_, P>> {
        let n = tokens.len() / self.block_size * self.block_size;
        let mut offered = Offered {
            kept: None,
            dropped: Vec::new(),
        };
        if n == 0 || kv.positions() != keys.len() {
            return Ok(offered);
        }
        let tokens = &tokens[..n];
        let new = (&keys[..], tokens, memo.as_deref());
        if self.entries.iter().any(|e| covers(e.view(), new)) {
            return Ok(offered);
        }
        let kv = kv.keep(n)?;
        // Entries this one covers are dropped.
        let mut kept = Vec::with_capacity(self.entries.len());
        for e in std::mem::take(&mut self.entries) {
            if covers(new, e.view()) {
                offered.dropped.push(self.forget(e));
            } else {
                kept.push(e);
            }
        }
        self.entries = kept;
        let blocks = n / self.block_size;
        let memo_bytes = memo.as_ref().map_or(0, |m| m.bytes());
        self.clock += 1;
        self.entries.push(Entry {
            keys,
            tokens: tokens.to_vec(),
            kv,
            memo,
            memo_bytes,
            blocks,
            last_used: self.clock,
            _pins: pins,
        });
        self.used_blocks += blocks;
        self.memo_bytes += memo_bytes;
        offered.kept = self.entries.last().map(|e| &e.kv);
        Ok(offered)
    }

    /// Evicts least recently used entries until they hold at most `max_blocks`; returns what
    /// they held.
    pub fn shrink_to(&mut self, max_blocks: usize) -> Vec<P> {
        let mut dropped = Vec::new();
        while self.used_blocks > max_blocks {
            match self.evict_one() {
                Some(kv) => dropped.push(kv),
                None => break,
            }
        }
        dropped
    }

    /// Drops the least recently used entry and returns what it held; `None` when none is left.
    pub fn evict_one(&mut self) -> Option<P> {
        let i = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used)?;
        let e = self.entries.swap_remove(i);
        Some(self.forget(e))
    }
}

/// What [`PrefixStore::offer`] did: the entry it kept (what it holds), and what the entries it
/// replaced held.
pub struct Offered<'a, P> {
    pub kept: Option<&'a P>,
    pub dropped: Vec<P>,
}

/// An entry as [`covers`] sees it: position keys, tokens, memo.
type EntryView<'a> = (&'a [u64], &'a [u32], Option<&'a ScoreMemo>);

impl<P> Entry<P> {
    fn view(&self) -> EntryView<'_> {
        (&self.keys, &self.tokens, self.memo.as_deref())
    }
}

/// Whether `long` holds all `short` holds: same keys or more, same tokens or more (so its KV holds
/// all of `short`'s), and a memo covering `short`'s, if any, for the same plan.
fn covers(long: EntryView<'_>, short: EntryView<'_>) -> bool {
    let memo = match (long.2, short.2) {
        (_, None) => true,
        (Some(l), Some(s)) => long.0 == short.0 && l.covers(s),
        (None, Some(_)) => false,
    };
    long.0.starts_with(short.0) && long.1.starts_with(short.1) && memo
}

/// Position keys of a plan: key `p` names `layers[0..=p]` and `extras` (adapter and overlay
/// identity), FNV-1a chained.
pub fn position_keys(layers: &[usize], extras: u64) -> Vec<u64> {
    let mut h = 0xcbf29ce484222325u64 ^ extras;
    layers
        .iter()
        .map(|&l| {
            h = (h ^ (l as u64 + 1)).wrapping_mul(0x100000001b3);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn kv(positions: usize, tokens: usize, salt: f32) -> Vec<(Tensor, Tensor)> {
        (0..positions)
            .map(|p| {
                let t = Tensor::arange(0f32, (2 * tokens * 4) as f32, &Device::Cpu)
                    .unwrap()
                    .affine(1.0, p as f64 * 1000.0 + salt as f64)
                    .unwrap()
                    .reshape((2, tokens, 4))
                    .unwrap();
                (t.clone(), (t * 2.0).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_plan_that_is_a_prefix_of_another_reuses_its_whole_blocks() {
        let mut s = PrefixStore::new(4);
        let base = position_keys(&[0, 1, 2, 3], 0);
        let tokens: Vec<u32> = (0..11).collect();
        s.offer(base.clone(), &tokens, &kv(4, 11, 0.0), None, vec![])
            .unwrap();
        assert_eq!(s.used_blocks, 2);
        // The first two layers of the same base: its keys are the base's first two.
        let rev = position_keys(&[0, 1], 0);
        assert_eq!(rev[..], base[..2]);
        let mut asked: Vec<u32> = (0..9).collect();
        asked.push(99);
        let hit = s.lookup(&rev, &asked, None).unwrap().unwrap();
        assert_eq!(hit.tokens, 8);
        assert_eq!(hit.kv.len(), 2);
        let want = kv(4, 11, 0.0)[1].0.narrow(1, 0, 8).unwrap();
        let got = &hit.kv[1].0;
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        // A dropped middle layer, an adapter, or other tokens: no hit.
        for keys in [position_keys(&[0, 2], 0), position_keys(&[0, 1], 7)] {
            assert!(s.lookup(&keys, &asked, None).unwrap().is_none());
        }
        assert!(s.lookup(&rev, &[5, 6, 7, 8, 9], None).unwrap().is_none());
        // At least one token is left to compute.
        let hit = s.lookup(&base, &tokens[..8], None).unwrap().unwrap();
        assert_eq!(hit.tokens, 4);
    }

    #[test]
    fn covered_entries_are_not_stored_twice_and_eviction_is_lru() {
        let mut s = PrefixStore::new(4);
        let k = position_keys(&[0, 1], 0);
        let long: Vec<u32> = (0..12).collect();
        s.offer(k.clone(), &long[..8], &kv(2, 8, 0.0), None, vec![])
            .unwrap();
        s.offer(k.clone(), &long, &kv(2, 12, 0.0), None, vec![])
            .unwrap();
        assert_eq!(
            (s.entries.len(), s.used_blocks),
            (1, 3),
            "the longer one replaces it"
        );
        s.offer(k.clone(), &long[..4], &kv(2, 4, 0.0), None, vec![])
            .unwrap();
        assert_eq!(s.entries.len(), 1, "a covered prefix is not stored");
        let other: Vec<u32> = (100..108).collect();
        s.offer(k.clone(), &other, &kv(2, 8, 1.0), None, vec![])
            .unwrap();
        s.lookup(&k, &[0, 1, 2, 3, 4], None).unwrap().unwrap();
        assert!(s.evict_one().is_some());
        assert_eq!(
            s.used_blocks, 3,
            "the least recently used (the other) went first"
        );
        assert!(s
            .lookup(&k, &[100, 101, 102, 103, 104], None)
            .unwrap()
            .is_none());
        assert!(s.evict_one().is_some() && s.evict_one().is_none());
        assert_eq!(s.used_blocks, 0);
    }

    /// Scores whose logprob encodes (token, position) and whose top lists are `k` long.
    fn memo(tokens: &[u32], k: usize) -> Arc<ScoreMemo> {
        let scores = tokens[1..]
            .iter()
            .enumerate()
            .map(|(i, &t)| TokenScore {
                token: t,
                logprob: -(i as f32) - t as f32 / 1000.0,
                top: (0..k as u32).map(|j| (j, -(j as f32))).collect(),
            })
            .collect();
        Arc::new(ScoreMemo {
            top_k: k,
            tokens: tokens.to_vec(),
            scores,
        })
    }

    #[test]
    fn scoring_sequences_reuse_only_what_the_memo_of_their_own_plan_scored() {
        let mut s = PrefixStore::new(4);
        let base = position_keys(&[0, 1, 2, 3], 0);
        let prompt: Vec<u32> = (0..11).collect();
        // A generation entry (no memo) serves generation only.
        s.offer(base.clone(), &prompt, &kv(4, 11, 0.0), None, vec![])
            .unwrap();
        assert!(s.lookup(&base, &prompt, Some(1)).unwrap().is_none());
        // The same tokens with a memo replace it (they cover it) and serve scoring.
        s.offer(
            base.clone(),
            &prompt,
            &kv(4, 11, 0.0),
            Some(memo(&prompt, 3)),
            vec![],
        )
        .unwrap();
        assert_eq!(s.entries.len(), 1);
        let hit = s.lookup(&base, &prompt, Some(2)).unwrap().unwrap();
        assert_eq!(hit.tokens, 8);
        assert_eq!(hit.scores.len(), 8, "the scores of tokens 1..=8");
        assert_eq!(hit.scores[7].token, 8);
        assert_eq!(hit.scores[7].logprob, memo(&prompt, 3).scores[7].logprob);
        assert!(hit.scores.iter().all(|s| s.top.len() == 2), "cut to top-2");
        // More alternatives than the memo kept, another plan (rev: its first two layers), or a
        // token 8 that differs from the memo's: the score of token 8 is not known.
        assert!(s.lookup(&base, &prompt, Some(4)).unwrap().is_none());
        let rev = position_keys(&[0, 1], 0);
        assert!(s.lookup(&rev, &prompt, Some(1)).unwrap().is_none());
        assert_eq!(s.lookup(&rev, &prompt, None).unwrap().unwrap().tokens, 8);
        let mut other = prompt.clone();
        other[8] = 99;
        assert_eq!(s.lookup(&base, &other, Some(1)).unwrap().unwrap().tokens, 4);
        assert_eq!(s.lookup(&base, &other, None).unwrap().unwrap().tokens, 8);
        // A generation entry over the same tokens does not replace the memo.
        s.offer(base.clone(), &prompt, &kv(4, 11, 0.0), None, vec![])
            .unwrap();
        assert!(s.lookup(&base, &prompt, Some(1)).unwrap().is_some());
        assert_eq!(s.memo_bytes(), memo(&prompt, 3).bytes());
        assert!(s.evict_one().is_some() && s.evict_one().is_none());
        assert_eq!((s.used_blocks, s.memo_bytes()), (0, 0));
    }
}
