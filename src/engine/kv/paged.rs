//! The CUDA paged KV cache: one pool of layer-blocks per base (every plan over it draws from the
//! same pool), written with mistralrs-paged-attn's `reshape_and_cache` and read on decode by our
//! grouped-query kernel; prompt chunks attend in one kernel launch per layer and kind
//! ([`crate::engine::attention::cuda`]): fresh ones to their own keys/values, continued ones (bf16
//! caches) to their history gathered from the pool; f32 caches take continued chunks through
//! candle ops.
//!
//! An fp8 pool (`--kv-cache-dtype fp8`, [`crate::engine::kv::fp8`]) stores E4M3 bytes with a
//! scale of 1: keys and values are rounded once before anything attends to them (fresh prompts
//! included), the decode kernels read the bytes, and histories are gathered widened to the
//! model's dtype.
//!
//! With prefix caching, cached prefixes are blocks of the pool itself, counted by the pool
//! ([`crate::engine::kv::tables`]): a hit puts them in place of a sequence's first blocks, and
//! they are evicted (least recently used first) when a reservation runs short. A branch of shared
//! hidden states takes its trunk's whole blocks and a device copy of the partly filled last one
//! (copy-on-write: both write after it).

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use mistralrs_paged_attn::{gather_kv_cache, reshape_and_cache};

use crate::engine::attention::cuda::{
    prefill_attention, rope_into_cache, PrefillChunk, PrefillKernel, BLOCK_SIZE,
};
use crate::engine::attention::decode::{paged_decode, DecodeKernel};
use crate::engine::attention::{attend_chunk, chunk_heads, AttnParams, MaskCache};
use crate::engine::kv::buffers::{base_ptr, write_into, GraphKvInputs};
use crate::engine::kv::fp8::KvCacheDtype;
use crate::engine::kv::padded::PaddedDecode;
use crate::engine::kv::prefix::{Pin, PrefixStore, ScoreMemo};
use crate::engine::kv::tables::{BlockPool, BlockTables};
use crate::engine::kv::{ChunkRef, KvCache, KvCapacity, KvError, KvUsage};
use crate::engine::sample::scoring::TokenScore;
use crate::engine::SeqId;

struct DecodeIndex {
    /// Packed row of each decode chunk, `[decode]` u32; `None` when the decode rows are every
    /// packed row, in order (a pure decode step): no gather needed.
    rows: Option<Tensor>,
    /// `[plan_len, decode, max_blocks]` u32.
    tables: Tensor,
    /// `[decode]` u32.
    context_lens: Tensor,
}

/// The step's index arrays on the device.
struct UploadedStep {
    /// Decode rows, and the longest context the decode kernel is launched for.
    n_dec: usize,
    max_context: usize,
    /// `[plan_len, T]` i64.
    slots: Tensor,
    /// Present when the step has decode rows.
    decode: Option<DecodeIndex>,
    /// Restores packed row order after decode rows were computed first; `None` when the order
    /// already matches.
    fused_order: Option<Tensor>,
}

pub struct PagedKvCache {
    pool: BlockPool,
    key_cache: Tensor,
    value_cache: Tensor,
    device: Device,
    /// The model's dtype: queries, outputs and gathered histories.
    dtype: DType,
    /// What the pool stores: `dtype`, or fp8 E4M3.
    stored: DType,
    /// fp8 pools: the keys' and values' scales (1, `[1]` f32 on the device) that
    /// mistralrs-paged-attn's writes and gathers take.
    fp8_scales: Option<Tensor>,
    step: Option<UploadedStep>,
    masks: MaskCache,
    /// Prefix caching: entries name pool blocks, which they hold beside the sequences using them.
    prefixes: Option<PrefixStore<BlockTables>>,
    /// Decode graphs' step indices, rewritten in place each step.
    padded: PaddedDecode,
}

fn kernel_err(e: KvError) -> candle_core::Error {
    candle_core::Error::Msg(format!("kv: {e}"))
}

impl PagedKvCache {
    /// Layer-blocks that fit in `bytes` (keys and values).
    pub fn blocks_for_bytes(
        bytes: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        bytes / (2 * kv_heads * head_dim * block_size * dtype.size_in_bytes())
    }

    /// A pool of `num_blocks` layer-blocks for a model computing in `dtype`, storing `stored`
    /// (the same dtype, or fp8 E4M3).
    pub fn new(
        device: &Device,
        (dtype, stored): (DType, DType),
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        match (dtype, stored) {
            (a, b) if a == b => {}
            (DType::BF16, DType::F8E4M3) => {}
            _ => candle_core::bail!("a {dtype:?} model cannot keep a {stored:?} paged KV cache"),
        }
        if block_size != BLOCK_SIZE {
            candle_core::bail!(
                "the CUDA paged cache uses blocks of {BLOCK_SIZE} tokens, not {block_size}"
            );
        }
        let x = 16 / stored.size_in_bytes();
        let key_cache = Tensor::zeros(
            (num_blocks, kv_heads, head_dim / x, block_size, x),
            stored,
            device,
        )?;
        let value_cache =
            Tensor::zeros((num_blocks, kv_heads, head_dim, block_size), stored, device)?;
        let fp8_scales = match stored {
            DType::F8E4M3 => Some(Tensor::new(&[1f32], device)?),
            _ => None,
        };
        Ok(Self {
            pool: BlockPool::new(num_blocks, block_size),
            key_cache,
            value_cache,
            device: device.clone(),
            dtype,
            stored,
            fp8_scales,
            step: None,
            masks: MaskCache::default(),
            prefixes: None,
            padded: PaddedDecode::default(),
        })
    }

    /// Keeps the prefixes of finished sequences (`--enable-prefix-caching`).
    pub fn with_prefix_caching(mut self) -> Self {
        self.prefixes = Some(PrefixStore::new(self.pool.block_size()));
        self
    }

    /// Copies whole blocks of both caches, (source, destination) pairs, on the device's stream.
    fn copy_blocks(&self, pairs: &[(u32, u32)]) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async;
        use candle_core::cuda_backend::WrapErr;
        if pairs.is_empty() {
            return Ok(());
        }
        let blocks = self.pool.total_blocks();
        for cache in [&self.key_cache, &self.value_cache] {
            let bytes = cache.elem_count() / blocks * self.stored.size_in_bytes();
            let (storage, layout) = cache.storage_and_layout();
            let candle_core::Storage::Cuda(s) = &*storage else {
                candle_core::bail!("kv: the paged cache is not on a CUDA device");
            };
            let stream = s.device().cuda_stream();
            let base = match self.stored {
                DType::BF16 => base_ptr::<half::bf16>(s, layout, &stream)?,
                DType::F8E4M3 => base_ptr::<float8::F8E4M3>(s, layout, &stream)?,
                _ => base_ptr::<f32>(s, layout, &stream)?,
            };
            for &(src, dst) in pairs {
                let at = |b: u32| base + (b as usize * bytes) as u64;
                // SAFETY: both blocks lie inside the cache (ids below its block count) and are
                // distinct; the copy is ordered on candle's stream like every kernel using them.
                unsafe { memcpy_dtod_async(at(dst), at(src), bytes, stream.cu_stream()) }.w()?;
            }
        }
        Ok(())
    }

    /// Lets go of the least recently used prefix entry's blocks; `false` when there is none.
    fn evict_prefix(&mut self) -> bool {
        match self.prefixes.as_mut().and_then(PrefixStore::evict_one) {
            Some(dropped) => {
                self.pool.hold_for_entry(&dropped.tables, false);
                true
            }
            None => false,
        }
    }

    /// Keys and values `[len, kv_heads, d]` of `seq`'s first `len` tokens at `plan_pos`.
    fn gather(
        &self,
        seq: SeqId,
        plan_pos: usize,
        len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let table = self.pool.table(seq, plan_pos).map_err(kernel_err)?;
        let used = len.div_ceil(self.pool.block_size());
        let table = Tensor::new(&table[..used], &self.device)?.reshape((1, used))?;
        let cu = Tensor::new(&[0u32, len as u32], &self.device)?;
        let scales = self.fp8_scales.as_ref();
        let (k, v) = gather_kv_cache(
            &self.key_cache,
            &self.value_cache,
            scales,
            scales,
            &table,
            &cu,
            self.dtype,
        )?;
        Ok((k, v))
    }
}

/// A row-major copy starting at offset 0, as the kernels index raw pointers.
fn fresh(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

impl KvCache for PagedKvCache {
    fn allocate(&mut self, seq: SeqId, plan_len: usize) -> Result<(), KvError> {
        self.pool.allocate(seq, plan_len)
    }

    fn reserve(&mut self, seq: SeqId, total_len: usize) -> Result<(), KvError> {
        // Blocks only cached prefixes hold are given up, least recently used first.
        loop {
            match self.pool.reserve(seq, total_len) {
                Err(KvError::OutOfBlocks { .. }) if self.evict_prefix() => continue,
                other => return other,
            }
        }
    }

    fn begin_step(&mut self, chunks: &[ChunkRef], plan_len: usize) -> candle_core::Result<()> {
        let tables = self
            .pool
            .step_tables(chunks, plan_len)
            .map_err(kernel_err)?;
        let total: usize = chunks.iter().map(|c| c.len).sum();
        let dev = &self.device;
        let slots = Tensor::from_slice(&tables.slots, (plan_len, total), dev)?;
        let n_dec = tables.decode_chunks.len();
        let rows: Vec<u32> = tables
            .decode_chunks
            .iter()
            .map(|&i| chunks[i].offset as u32)
            .collect();
        // Zero-length device buffers are avoided: no decode rows, no index tensors.
        let in_order = n_dec == total && rows.iter().enumerate().all(|(j, &r)| r == j as u32);
        let decode = if n_dec == 0 {
            None
        } else {
            Some(DecodeIndex {
                rows: match in_order {
                    true => None,
                    false => Some(Tensor::from_slice(&rows, n_dec, dev)?),
                },
                tables: Tensor::from_slice(
                    &tables.decode_tables,
                    (plan_len, n_dec, tables.decode_max_blocks),
                    dev,
                )?,
                context_lens: Tensor::from_slice(&tables.decode_context_lens, n_dec, dev)?,
            })
        };
        // Fused layout: decode rows first, then the other chunks' rows in chunk order.
        let fused_order = if n_dec == 0 || n_dec == chunks.len() {
            None
        } else {
            let mut position = vec![0u32; total];
            for (j, &i) in tables.decode_chunks.iter().enumerate() {
                position[chunks[i].offset] = j as u32;
            }
            let mut next = n_dec as u32;
            for c in chunks.iter().filter(|c| c.len != 1) {
                for p in &mut position[c.offset..c.offset + c.len] {
                    *p = next;
                    next += 1;
                }
            }
            Some(Tensor::from_slice(&position, total, dev)?)
        };
        self.masks.clear();
        self.step = Some(UploadedStep {
            n_dec,
            max_context: tables.decode_max_context,
            slots,
            decode,
            fused_order,
        });
        Ok(())
    }

    fn begin_padded_decode(
        &mut self,
        chunks: &[ChunkRef],
        plan_len: usize,
        into: &GraphKvInputs,
    ) -> candle_core::Result<bool> {
        let padded = &mut self.padded;
        let fits = padded
            .fill(&self.pool, chunks, plan_len, (into.rows, into.max_blocks))
            .map_err(kernel_err)?;
        if !fits {
            return Ok(false);
        }
        write_into(&into.slots, &padded.slots)?;
        write_into(&into.tables, &padded.tables)?;
        write_into(&into.context_lens, &padded.context_lens)?;
        self.masks.clear();
        self.step = Some(UploadedStep {
            n_dec: into.rows,
            max_context: into.max_blocks * self.pool.block_size(),
            slots: into.slots.narrow(0, 0, plan_len)?,
            decode: Some(DecodeIndex {
                rows: None,
                tables: into.tables.narrow(0, 0, plan_len)?,
                context_lens: into.context_lens.clone(),
            }),
            fused_order: None,
        });
        Ok(true)
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
        let step = self
            .step
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("kv: attend before begin_step".into()))?;
        let slots = fresh(&step.slots.i(plan_pos)?)?;
        // q/k/v arrive in f32 on steps with prefill rows: the cache stores its dtype, fresh
        // prompts attend to their own unrounded keys (rounded to E4M3 first for an fp8 pool,
        // as everything reading the pool sees them), everything else in the model's dtype; the
        // attention output is in q's dtype.
        let (k, v) = match self.stored {
            DType::F8E4M3 => (&KvCacheDtype::Fp8.round(k)?, &KvCacheDtype::Fp8.round(v)?),
            _ => (k, v),
        };
        let scales = self.fp8_scales.as_ref();
        reshape_and_cache(
            &fresh(&k.to_dtype(self.dtype)?)?,
            &fresh(&v.to_dtype(self.dtype)?)?,
            scales,
            scales,
            &self.key_cache,
            &self.value_cache,
            &slots,
        )?;
        let width = params.num_heads * params.head_dim;
        let n_dec = step.n_dec;
        let decode = step.decode.as_ref();
        let fused = decode.is_some();
        let mut parts = Vec::new();
        if let Some(dec) = decode {
            let q_dec = match &dec.rows {
                None => q.to_dtype(self.dtype)?,
                Some(rows) => q.index_select(rows, 0)?.to_dtype(self.dtype)?,
            };
            let out = paged_decode(
                &q_dec,
                (&self.key_cache, &self.value_cache),
                (&dec.tables.i(plan_pos)?, &dec.context_lens),
                step.max_context,
                params,
                DecodeKernel::configured(),
            )?;
            // The output is in q's dtype, f32 on steps with prompt rows.
            parts.push(out.reshape((n_dec, width))?.to_dtype(q.dtype())?);
        }
        // Prompt chunks (f32 on prefill steps): fresh ones attend to their own unrounded keys,
        // continued ones (bf16 caches) to their history gathered from the pool; each kind in one
        // kernel launch.
        let kernel = match self.dtype {
            DType::BF16 => PrefillKernel::for_bf16(),
            _ => PrefillKernel::Simt,
        };
        let prompt = |c: &ChunkRef| c.len > 1 && q.dtype() == DType::F32;
        let is_fresh = |c: &ChunkRef| prompt(c) && c.start == 0;
        let is_continued = |c: &ChunkRef| prompt(c) && c.start > 0 && kernel == PrefillKernel::Mma;
        let fresh = prompt_chunks(chunks.iter().filter(|c| is_fresh(c)), |_, c| (c.offset, 0));
        let fresh_out = if fresh.is_empty() {
            None
        } else {
            let out = prefill_attention((q, k, v), &fresh.chunks, fresh.rows, params, kernel)?;
            if fresh.chunks.len() == chunks.len() {
                // Every chunk is a fresh prompt: the rows are already in packed order.
                return Ok(out);
            }
            Some(out)
        };
        let continued = prompt_chunks(chunks.iter().filter(|c| is_continued(c)), |k_rows, c| {
            (k_rows, c.start)
        });
        let continued_out = if continued.is_empty() {
            None
        } else {
            let mut history = (Vec::new(), Vec::new());
            for c in chunks.iter().filter(|c| is_continued(c)) {
                let (hk, hv) = self.gather(c.seq, plan_pos, c.start + c.len)?;
                history.0.push(hk.to_dtype(DType::F32)?);
                history.1.push(hv.to_dtype(DType::F32)?);
            }
            let (hk, hv) = (Tensor::cat(&history.0, 0)?, Tensor::cat(&history.1, 0)?);
            Some(prefill_attention(
                (q, &hk, &hv),
                &continued.chunks,
                continued.rows,
                params,
                kernel,
            )?)
        };
        let (mut next_fresh, mut next_continued) = (0, 0);
        for c in chunks {
            if fused && c.len == 1 {
                continue;
            }
            if let (Some(out), true) = (&fresh_out, is_fresh(c)) {
                parts.push(out.narrow(0, next_fresh, c.len)?);
                next_fresh += c.len;
                continue;
            }
            if let (Some(out), true) = (&continued_out, is_continued(c)) {
                parts.push(out.narrow(0, next_continued, c.len)?);
                next_continued += c.len;
                continue;
            }
            let (keys, values) = if c.start == 0 {
                (chunk_heads(k, c)?, chunk_heads(v, c)?)
            } else {
                let (hk, hv) = self.gather(c.seq, plan_pos, c.start + c.len)?;
                (
                    hk.transpose(0, 1)?.contiguous()?,
                    hv.transpose(0, 1)?.contiguous()?,
                )
            };
            parts.push(attend_chunk(
                q,
                c,
                &keys,
                &values,
                params,
                &mut self.masks,
                self.dtype,
            )?);
        }
        let out = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        match (&step.fused_order, fused) {
            (Some(order), true) => out.index_select(order, 0),
            _ => Ok(out),
        }
    }

    fn attend_packed(
        &mut self,
        plan_pos: usize,
        qkv: &Tensor,
        rope: (&Tensor, &Tensor),
        params: &AttnParams,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(step) = self.step.as_ref() else {
            return Ok(None);
        };
        // Only steps whose rows are all decode rows, in order (no row index to gather by).
        let Some(dec) = step.decode.as_ref().filter(|d| d.rows.is_none()) else {
            return Ok(None);
        };
        let caches = (&self.key_cache, &self.value_cache);
        let q = rope_into_cache(qkv, rope, &step.slots.i(plan_pos)?, caches, params)?;
        let tables = dec.tables.i(plan_pos)?;
        let out = paged_decode(
            &q,
            caches,
            (&tables, &dec.context_lens),
            step.max_context,
            params,
            DecodeKernel::configured(),
        )?;
        Ok(Some(out.reshape((
            step.n_dec,
            params.num_heads * params.head_dim,
        ))?))
    }

    fn release(&mut self, seq: SeqId) {
        self.pool.release(seq);
    }

    fn usage(&self) -> KvUsage {
        KvUsage {
            memo_bytes: self.prefixes.as_ref().map_or(0, PrefixStore::memo_bytes),
            ..self.pool.usage()
        }
    }

    fn capacity(&self) -> KvCapacity {
        let u = self.pool.usage();
        KvCapacity {
            total_blocks: u.total_blocks,
            block_size: u.block_size,
            per_layer: true,
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
        tokens: usize,
    ) -> candle_core::Result<bool> {
        match self.pool.share_prefix(from, to, positions, tokens) {
            Some(copies) => {
                self.copy_blocks(&copies)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn attach_prefix(
        &mut self,
        seq: SeqId,
        keys: &[u64],
        tokens: &[u32],
        scoring: Option<usize>,
    ) -> candle_core::Result<(usize, Vec<TokenScore>)> {
        let Some(store) = self.prefixes.as_mut() else {
            return Ok((0, Vec::new()));
        };
        match store.lookup(keys, tokens, scoring)? {
            Some(hit) if self.pool.attach(seq, &hit.kv.tables) => Ok((hit.tokens, hit.scores)),
            _ => Ok((0, Vec::new())),
        }
    }

    fn offer_prefix(
        &mut self,
        seq: SeqId,
        keys: Vec<u64>,
        tokens: &[u32],
        memo: Option<Arc<ScoreMemo>>,
        pins: Vec<Pin>,
    ) -> candle_core::Result<()> {
        let Some(store) = self.prefixes.as_mut() else {
            return Ok(());
        };
        let block_size = self.pool.block_size();
        let Some(tables) = self.pool.leading_blocks(seq, tokens.len() / block_size) else {
            return Ok(());
        };
        let entry = BlockTables { block_size, tables };
        let offered = store.offer(keys, tokens, &entry, memo, pins)?;
        // The new entry takes its blocks before replaced ones let go of theirs (they may share).
        if let Some(kept) = offered.kept {
            self.pool.hold_for_entry(&kept.tables, true);
        }
        for dropped in &offered.dropped {
            self.pool.hold_for_entry(&dropped.tables, false);
        }
        Ok(())
    }
}

/// The chunks of one prefill launch and the output rows they fill.
struct PromptChunks {
    chunks: Vec<PrefillChunk>,
    rows: usize,
}

impl PromptChunks {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// `chunks` laid out for [`prefill_attention`]: outputs packed in order; `keys(k_rows, c)` gives
/// a chunk's first key row and start position, with `k_rows` the key rows of the chunks before
/// it (each takes `start + len`).
fn prompt_chunks<'a>(
    chunks: impl Iterator<Item = &'a ChunkRef>,
    keys: impl Fn(usize, &ChunkRef) -> (usize, usize),
) -> PromptChunks {
    let (mut out, mut rows, mut k_rows) = (Vec::new(), 0, 0);
    for c in chunks {
        let (k_row0, start) = keys(k_rows, c);
        out.push(PrefillChunk {
            q_row0: c.offset,
            len: c.len,
            k_row0,
            start,
            out0: rows,
            exact: c.scored,
        });
        rows += c.len;
        k_rows += c.start + c.len;
    }
    PromptChunks { chunks: out, rows }
}
