//! The KV cache interface the decoder writes through, and its contiguous implementation (any
//! device; the CPU default). Capacity is
//! accounted in blocks of `block_size` tokens (full plan depth), as a paged CUDA cache will hold
//! them, so limits surface the same way on every backend.

#[cfg(feature = "cuda")]
pub mod buffers;
pub mod fp8;
pub mod padded;
#[cfg(feature = "cuda")]
pub mod paged;
pub mod prefix;
pub mod tables;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::attention::{attend_chunk, chunk_heads, AttnParams, MaskCache};
use crate::engine::sample::scoring::TokenScore;
use crate::engine::SeqId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error(
        "out of KV blocks: {needed} more needed, {free} free of {total} (block size {block_size})"
    )]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
        block_size: usize,
    },
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
}

/// Occupancy figures, for metrics and admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub used_blocks: usize,
    pub total_blocks: usize,
    pub block_size: usize,
    /// Blocks held by prefix-cache entries (beside `used_blocks`, within `total_blocks`).
    pub cached_blocks: usize,
    /// Host bytes of the prefix cache's prompt-score memos.
    pub memo_bytes: usize,
}

/// How much one sequence can ever hold: blocks of `block_size` tokens, counted per sequence at full
/// plan depth (`per_layer == false`, the contiguous cache) or per plan layer (the paged pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCapacity {
    pub total_blocks: usize,
    pub block_size: usize,
    pub per_layer: bool,
}

impl KvCapacity {
    /// Tokens one sequence of a `plan_len`-layer plan fits into an empty pool.
    pub fn max_tokens(&self, plan_len: usize) -> usize {
        let blocks = if self.per_layer {
            self.total_blocks / plan_len.max(1)
        } else {
            self.total_blocks
        };
        blocks.saturating_mul(self.block_size)
    }
}

/// One sequence's rows inside a packed batch: rows `offset..offset+len` belong to `seq`, whose
/// first new token sits at absolute position `start`.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRef {
    pub seq: SeqId,
    pub offset: usize,
    pub len: usize,
    pub start: usize,
    /// The chunk's prompt logprobs are asked for: its rows are computed at full precision.
    pub scored: bool,
}

/// Storage and attention for cached keys/values. `plan_pos` is the layer's position in the
/// sequence's plan, so plans of one base share one pool.
pub trait KvCache: Send {
    fn allocate(&mut self, seq: SeqId, plan_len: usize) -> Result<(), KvError>;
    /// Makes room for `total_len` tokens of `seq`, or fails without side effects.
    fn reserve(&mut self, seq: SeqId, total_len: usize) -> Result<(), KvError>;
    /// Called once per packed forward, before its first layer, with the step's chunks and the
    /// length of their (common) plan.
    fn begin_step(&mut self, _chunks: &[ChunkRef], _plan_len: usize) -> candle_core::Result<()> {
        Ok(())
    }
    /// Begins a decode-only step (every chunk one token) in place of [`KvCache::begin_step`],
    /// writing its cache indices into the fixed buffers of a captured decode graph, padded to
    /// their rows and blocks ([`buffers::GraphKvInputs`]); `false` (nothing begun) when this cache
    /// cannot or the step does not fit them.
    #[cfg(feature = "cuda")]
    fn begin_padded_decode(
        &mut self,
        _chunks: &[ChunkRef],
        _plan_len: usize,
        _into: &buffers::GraphKvInputs,
    ) -> candle_core::Result<bool> {
        Ok(false)
    }
    /// Appends this step's keys/values (`[T, kv_heads, d]`, packed over `chunks`) at `plan_pos` and
    /// returns attention outputs `[T, heads * d]` for the packed queries `[T, heads, d]`, in the
    /// queries' dtype.
    fn attend(
        &mut self,
        plan_pos: usize,
        chunks: &[ChunkRef],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> candle_core::Result<Tensor>;
    /// A decode-only step's attention at `plan_pos` straight from the packed f32 q|k|v
    /// projection rows `[T, (heads + 2 kv_heads) * d]`: rotates them with the `rope` rows (cos,
    /// sin), stores the keys and values, and returns the attention output `[T, heads * d]` in the
    /// cache's dtype, in fewer launches than rotating apart and calling [`KvCache::attend`];
    /// `None` when this cache or step does not take that path.
    fn attend_packed(
        &mut self,
        _plan_pos: usize,
        _qkv: &Tensor,
        _rope: (&Tensor, &Tensor),
        _params: &AttnParams,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
    fn release(&mut self, seq: SeqId);
    fn usage(&self) -> KvUsage;
    fn capacity(&self) -> KvCapacity;
    /// Whether this cache keeps prefixes ([`prefix`]).
    fn prefix_caching(&self) -> bool {
        false
    }
    /// Whether [`KvCache::share_kv`] can give one sequence another's keys and values.
    fn shares_kv(&self) -> bool {
        false
    }
    /// Gives `to` the keys and values `from` holds at plan positions `0..positions` for their
    /// first `tokens` tokens (both fed the same tokens from position 0 through the same layers
    /// there, `to` nothing yet); `false` when this cache cannot.
    fn share_kv(
        &mut self,
        _from: SeqId,
        _to: SeqId,
        _positions: usize,
        _tokens: usize,
    ) -> candle_core::Result<bool> {
        Ok(false)
    }
    /// Gives a fresh sequence with position `keys` the cached KV of the longest reusable start of
    /// `tokens` (for a sequence scoring its prompt with top-`k`, `scoring: Some(k)`: only what a
    /// memo of its plan scored); returns how many tokens it now holds and, when scoring, their
    /// scores.
    fn attach_prefix(
        &mut self,
        _seq: SeqId,
        _keys: &[u64],
        _tokens: &[u32],
        _scoring: Option<usize>,
    ) -> candle_core::Result<(usize, Vec<TokenScore>)> {
        Ok((0, Vec::new()))
    }
    /// Offers the KV `seq` holds for `tokens` (its first tokens), and the prompt scores it
    /// computed, to the prefix cache; called before the sequence is released.
    fn offer_prefix(
        &mut self,
        _seq: SeqId,
        _keys: Vec<u64>,
        _tokens: &[u32],
        _memo: Option<Arc<prefix::ScoreMemo>>,
        _pins: Vec<prefix::Pin>,
    ) -> candle_core::Result<()> {
        Ok(())
    }
}

struct SeqKv {
    layers: Vec<Option<(Tensor, Tensor)>>,
    blocks: usize,
}

/// Contiguous per-sequence tensors grown by concatenation, stored in `dtype`; blocks are only
/// counted.
pub struct ContiguousKvCache {
    seqs: HashMap<SeqId, SeqKv>,
    block_size: usize,
    total_blocks: usize,
    used_blocks: usize,
    dtype: DType,
    /// Keys and values are rounded to this first (fp8: the CPU reference of the paged pool's
    /// bytes, still stored in `dtype`).
    kv_dtype: fp8::KvCacheDtype,
    masks: MaskCache,
    /// Cached prefixes, when prefix caching is on; their blocks come out of the same pool.
    prefixes: Option<prefix::PrefixStore<Vec<(Tensor, Tensor)>>>,
}

impl ContiguousKvCache {
    pub fn new(total_blocks: usize, block_size: usize, dtype: DType) -> Self {
        Self {
            seqs: HashMap::new(),
            block_size,
            total_blocks,
            used_blocks: 0,
            dtype,
            kv_dtype: fp8::KvCacheDtype::Auto,
            masks: MaskCache::default(),
            prefixes: None,
        }
    }

    /// The same cache rounding keys and values to `kv_dtype` before they are used.
    pub fn with_kv_dtype(mut self, kv_dtype: fp8::KvCacheDtype) -> Self {
        self.kv_dtype = kv_dtype;
        self
    }

    /// The same cache keeping finished sequences' prefixes for reuse.
    pub fn with_prefix_caching(mut self) -> Self {
        self.prefixes = Some(prefix::PrefixStore::new(self.block_size));
        self
    }
}

impl KvCache for ContiguousKvCache {
    fn begin_step(&mut self, _chunks: &[ChunkRef], _plan_len: usize) -> candle_core::Result<()> {
        self.masks.clear();
        Ok(())
    }

    fn allocate(&mut self, seq: SeqId, plan_len: usize) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSequence(seq));
        }
        self.seqs.insert(
            seq,
            SeqKv {
                layers: vec![None; plan_len],
                blocks: 0,
            },
        );
        Ok(())
    }

    fn reserve(&mut self, seq: SeqId, total_len: usize) -> Result<(), KvError> {
        let held = self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))?
            .blocks;
        let needed = total_len.div_ceil(self.block_size).saturating_sub(held);
        // Room beside the live sequences; cached prefixes in it give it back, least recently used
        // first, when that is enough.
        let beside_live = self.total_blocks - self.used_blocks;
        if needed > beside_live {
            return Err(KvError::OutOfBlocks {
                needed,
                free: beside_live,
                total: self.total_blocks,
                block_size: self.block_size,
            });
        }
        if let Some(p) = self.prefixes.as_mut() {
            p.shrink_to(beside_live - needed);
        }
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        s.blocks += needed;
        self.used_blocks += needed;
        Ok(())
    }

    fn attend(
        &mut self,
        plan_pos: usize,
        chunks: &[ChunkRef],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = (&self.kv_dtype.round(k)?, &self.kv_dtype.round(v)?);
        let mut outs = Vec::with_capacity(chunks.len());
        for c in chunks {
            let s = self.seqs.get_mut(&c.seq).ok_or_else(|| {
                candle_core::Error::Msg(format!("kv: unknown sequence {}", c.seq))
            })?;
            let slot = s.layers.get_mut(plan_pos).ok_or_else(|| {
                candle_core::Error::Msg(format!("kv: plan position {plan_pos} out of range"))
            })?;
            let (new_k, new_v) = (chunk_heads(k, c)?, chunk_heads(v, c)?);
            let mut attend_to = |keys: &Tensor, values: &Tensor| -> candle_core::Result<Tensor> {
                attend_chunk(q, c, keys, values, params, &mut self.masks, self.dtype)
            };
            if c.start == 0 {
                // A fresh prompt attends to its own keys and values as given (f32 on prefill,
                // rounded to an fp8 cache's values).
                outs.push(attend_to(&new_k, &new_v)?);
                *slot = Some((new_k.to_dtype(self.dtype)?, new_v.to_dtype(self.dtype)?));
                continue;
            }
            let (new_k, new_v) = (new_k.to_dtype(self.dtype)?, new_v.to_dtype(self.dtype)?);
            let (all_k, all_v) = match slot.take() {
                Some((pk, pv)) => {
                    if pk.dim(1)? != c.start {
                        candle_core::bail!(
                            "kv: sequence {} holds {} tokens, chunk starts at {}",
                            c.seq,
                            pk.dim(1)?,
                            c.start
                        );
                    }
                    (
                        Tensor::cat(&[&pk, &new_k], 1)?,
                        Tensor::cat(&[&pv, &new_v], 1)?,
                    )
                }
                None => candle_core::bail!(
                    "kv: sequence {} has no cache but chunk starts at {}",
                    c.seq,
                    c.start
                ),
            };
            // A continued chunk attends to its history in the cache's dtype.
            outs.push(attend_to(&all_k, &all_v)?);
            *slot = Some((all_k, all_v));
        }
        Tensor::cat(&outs, 0)
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.used_blocks -= s.blocks;
        }
    }

    fn usage(&self) -> KvUsage {
        KvUsage {
            used_blocks: self.used_blocks,
            total_blocks: self.total_blocks,
            block_size: self.block_size,
            cached_blocks: self.prefixes.as_ref().map_or(0, |p| p.used_blocks),
            memo_bytes: self.prefixes.as_ref().map_or(0, |p| p.memo_bytes()),
        }
    }

    fn capacity(&self) -> KvCapacity {
        KvCapacity {
            total_blocks: self.total_blocks,
            block_size: self.block_size,
            per_layer: false,
        }
    }

    fn prefix_caching(&self) -> bool {
        self.prefixes.is_some()
    }

    fn shares_kv(&self) -> bool {
        true
    }

    fn share_kv(
        &mut self,
        from: SeqId,
        to: SeqId,
        positions: usize,
        _tokens: usize,
    ) -> candle_core::Result<bool> {
        let Some(src) = self.seqs.get(&from) else {
            return Ok(false);
        };
        let Some(kv) = src.layers.get(..positions).map(<[_]>::to_vec) else {
            return Ok(false);
        };
        let Some(dst) = self.seqs.get_mut(&to) else {
            return Ok(false);
        };
        if dst.layers.len() < positions || kv.iter().any(Option::is_none) {
            return Ok(false);
        }
        // Tensors are shared, not copied: a later chunk concatenates into new ones.
        for (slot, kv) in dst.layers.iter_mut().zip(kv) {
            *slot = kv;
        }
        Ok(true)
    }

    fn attach_prefix(
        &mut self,
        seq: SeqId,
        keys: &[u64],
        tokens: &[u32],
        scoring: Option<usize>,
    ) -> candle_core::Result<(usize, Vec<TokenScore>)> {
        let (Some(store), Some(s)) = (self.prefixes.as_mut(), self.seqs.get_mut(&seq)) else {
            return Ok((0, Vec::new()));
        };
        if s.layers.len() != keys.len() || s.layers.iter().any(Option::is_some) {
            return Ok((0, Vec::new()));
        }
        let Some(hit) = store.lookup(keys, tokens, scoring)? else {
            return Ok((0, Vec::new()));
        };
        for (slot, kv) in s.layers.iter_mut().zip(hit.kv) {
            *slot = Some(kv);
        }
        Ok((hit.tokens, hit.scores))
    }

    fn offer_prefix(
        &mut self,
        seq: SeqId,
        keys: Vec<u64>,
        tokens: &[u32],
        memo: Option<Arc<prefix::ScoreMemo>>,
        pins: Vec<prefix::Pin>,
    ) -> candle_core::Result<()> {
        let (Some(store), Some(s)) = (self.prefixes.as_mut(), self.seqs.get(&seq)) else {
            return Ok(());
        };
        let mut kv = Vec::with_capacity(s.layers.len());
        for slot in &s.layers {
            match slot {
                Some((k, v)) if k.dim(1)? >= tokens.len() => kv.push((k.clone(), v.clone())),
                _ => return Ok(()),
            }
        }
        // The entry's blocks must fit beside the live sequences (this one's are freed next).
        let blocks = tokens.len() / self.block_size;
        let beside_live = self.total_blocks - self.used_blocks + s.blocks;
        if blocks > beside_live {
            return Ok(());
        }
        // Dropped entries' tensors are freed with them.
        store.shrink_to(beside_live - blocks);
        store.offer(keys, tokens, &kv, memo, pins).map(drop)
    }
}
