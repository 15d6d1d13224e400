//! The CUDA paged KV cache: one pool of layer-blocks per base (every plan over it draws from the
//! same pool), written with mistralrs-paged-attn's `reshape_and_cache` and read on decode by our
//! grouped-query kernel; fresh prompt chunks attend to their own keys/values in one kernel launch
//! per layer ([`crate::engine::attention::cuda`]), continued ones with candle ops against their history
//! gathered from the pool.

use candle_core::{DType, Device, IndexOp, Tensor};
use mistralrs_paged_attn::{gather_kv_cache, reshape_and_cache};

use crate::engine::attention::cuda::{paged_decode, prefill_attention, FreshChunk, BLOCK_SIZE};
use crate::engine::attention::{attend_chunk, chunk_heads, AttnParams, MaskCache};
use crate::engine::kv::tables::{BlockPool, StepTables};
use crate::engine::kv::{ChunkRef, KvCache, KvCapacity, KvError, KvUsage};
use crate::engine::SeqId;

struct DecodeIndex {
    /// Packed row of each decode chunk, `[decode]` u32.
    rows: Tensor,
    /// The decode rows are every packed row, in order (a pure decode step): no gather needed.
    all_rows: bool,
    /// `[plan_len, decode, max_blocks]` u32.
    tables: Tensor,
    /// `[decode]` u32.
    context_lens: Tensor,
}

/// The step's index arrays on the device.
struct UploadedStep {
    tables: StepTables,
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
    dtype: DType,
    step: Option<UploadedStep>,
    masks: MaskCache,
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

    pub fn new(
        device: &Device,
        dtype: DType,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        if block_size != BLOCK_SIZE {
            candle_core::bail!(
                "the CUDA paged cache uses blocks of {BLOCK_SIZE} tokens, not {block_size}"
            );
        }
        let x = 16 / dtype.size_in_bytes();
        let key_cache = Tensor::zeros(
            (num_blocks, kv_heads, head_dim / x, block_size, x),
            dtype,
            device,
        )?;
        let value_cache =
            Tensor::zeros((num_blocks, kv_heads, head_dim, block_size), dtype, device)?;
        Ok(Self {
            pool: BlockPool::new(num_blocks, block_size),
            key_cache,
            value_cache,
            device: device.clone(),
            dtype,
            step: None,
            masks: MaskCache::default(),
        })
    }

    /// Keys and values `[kv_heads, len, d]` of `seq`'s first `len` tokens at `plan_pos`.
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
        let (k, v) = gather_kv_cache(
            &self.key_cache,
            &self.value_cache,
            None,
            None,
            &table,
            &cu,
            self.dtype,
        )?;
        Ok((
            k.transpose(0, 1)?.contiguous()?,
            v.transpose(0, 1)?.contiguous()?,
        ))
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
        self.pool.reserve(seq, total_len)
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
        let decode = if n_dec == 0 {
            None
        } else {
            Some(DecodeIndex {
                rows: Tensor::from_slice(&rows, n_dec, dev)?,
                all_rows: n_dec == total && rows.iter().enumerate().all(|(j, &r)| r == j as u32),
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
            tables,
            slots,
            decode,
            fused_order,
        });
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
        let step = self
            .step
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("kv: attend before begin_step".into()))?;
        let slots = fresh(&step.slots.i(plan_pos)?)?;
        // q/k/v arrive in f32 on steps with prefill rows: the cache stores its dtype, fresh
        // prompts attend to their own unrounded keys, everything else in the cache's dtype;
        // the attention output is in q's dtype.
        reshape_and_cache(
            &fresh(&k.to_dtype(self.dtype)?)?,
            &fresh(&v.to_dtype(self.dtype)?)?,
            None,
            None,
            &self.key_cache,
            &self.value_cache,
            &slots,
        )?;
        let width = params.num_heads * params.head_dim;
        let n_dec = step.tables.decode_chunks.len();
        let decode = step.decode.as_ref();
        let fused = decode.is_some();
        let mut parts = Vec::new();
        if let Some(dec) = decode {
            let q_dec = if dec.all_rows {
                q.to_dtype(self.dtype)?
            } else {
                q.index_select(&dec.rows, 0)?.to_dtype(self.dtype)?
            };
            let out = paged_decode(
                &q_dec,
                (&self.key_cache, &self.value_cache),
                &dec.tables.i(plan_pos)?,
                &dec.context_lens,
                step.tables.decode_max_context,
                params,
            )?;
            // The output is in q's dtype, f32 on steps with prompt rows.
            parts.push(out.reshape((n_dec, width))?.to_dtype(q.dtype())?);
        }
        // Fresh prompt chunks (f32 on prefill steps) attend to their own unrounded keys, all in
        // one kernel launch; continued chunks to their history gathered from the pool.
        let is_fresh = |c: &ChunkRef| c.len > 1 && c.start == 0 && q.dtype() == DType::F32;
        let mut fresh = Vec::new();
        let mut fresh_rows = 0;
        for c in chunks.iter().filter(|c| is_fresh(c)) {
            fresh.push(FreshChunk {
                row0: c.offset,
                len: c.len,
                out0: fresh_rows,
            });
            fresh_rows += c.len;
        }
        let fresh_out = if fresh.is_empty() {
            None
        } else {
            let out = prefill_attention((q, k, v), &fresh, fresh_rows, params)?;
            if fresh.len() == chunks.len() {
                // Every chunk is a fresh prompt: the rows are already in packed order.
                return Ok(out);
            }
            Some(out)
        };
        let mut next_fresh = 0;
        for c in chunks {
            if fused && c.len == 1 {
                continue;
            }
            if let (Some(out), true) = (&fresh_out, is_fresh(c)) {
                parts.push(out.narrow(0, next_fresh, c.len)?);
                next_fresh += c.len;
                continue;
            }
            let (keys, values) = if c.start == 0 {
                (chunk_heads(k, c)?, chunk_heads(v, c)?)
            } else {
                self.gather(c.seq, plan_pos, c.start + c.len)?
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

    fn release(&mut self, seq: SeqId) {
        self.pool.release(seq);
    }

    fn usage(&self) -> KvUsage {
        self.pool.usage()
    }

    fn capacity(&self) -> KvCapacity {
        let u = self.pool.usage();
        KvCapacity {
            total_blocks: u.total_blocks,
            block_size: u.block_size,
            per_layer: true,
        }
    }
}
