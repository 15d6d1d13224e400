//! Causal (optionally sliding-window, optionally soft-capped) grouped-query attention of one
//! sequence chunk against its full key/value history. Device-agnostic candle ops.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod decode;
pub mod partition;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::engine::kv::ChunkRef;

/// Per-layer attention settings.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub scale: f64,
    pub softcap: Option<f64>,
    pub window: Option<usize>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// `[n, L]` additive mask: query `i` sits at absolute position `q_start + i` and may see key `j`
/// iff `j <= pos` and (with a window `w`) `pos - j < w`. `None` when nothing is masked. Built
/// with device ops, so nothing is uploaded per layer.
fn causal_mask(
    n: usize,
    kv_len: usize,
    q_start: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let needs_mask = n > 1 || window.is_some_and(|w| kv_len > w);
    if !needs_mask {
        return Ok(None);
    }
    let q_pos = Tensor::arange(q_start as i64, (q_start + n) as i64, device)?.reshape((n, 1))?;
    let k_pos = Tensor::arange(0i64, kv_len as i64, device)?.reshape((1, kv_len))?;
    let mut hidden = k_pos.broadcast_gt(&q_pos)?;
    if let Some(w) = window {
        let too_far = q_pos.broadcast_sub(&k_pos)?.ge(w as i64)?;
        hidden = hidden.maximum(&too_far)?;
    }
    let zeros = Tensor::zeros((n, kv_len), DType::F32, device)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (n, kv_len), device)?;
    hidden.where_cond(&neg_inf, &zeros).map(Some)
}

/// The causal masks of one step, by (rows, keys, first position, window): every layer of a step,
/// and every prompt of the same length, reuses one mask instead of building it again. Cleared by
/// the KV cache at the start of each step.
#[derive(Default)]
pub struct MaskCache(HashMap<(usize, usize, usize, Option<usize>), Option<Tensor>>);

impl MaskCache {
    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn get(
        &mut self,
        n: usize,
        kv_len: usize,
        q_start: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let key = (n, kv_len, q_start, window);
        if let Some(m) = self.0.get(&key) {
            return Ok(m.clone());
        }
        let m = causal_mask(n, kv_len, q_start, window, device)?;
        self.0.insert(key, m.clone());
        Ok(m)
    }
}

/// Rows of chunk `c` of packed `[T, heads, d]` keys or values, as `[heads, c.len, d]`.
pub fn chunk_heads(x: &Tensor, c: &ChunkRef) -> Result<Tensor> {
    x.narrow(0, c.offset, c.len)?.transpose(0, 1)?.contiguous()
}

/// Attention of chunk `c`'s rows of the packed queries against `k`, `v` (`[kv_heads, L, d]`),
/// by the KV caches' precision rule: a decode row (one token continuing a sequence) has its query
/// rounded to the cache's `dtype`, as the paged decode kernel takes it; prompt chunks keep their
/// queries as given (f32 on prefill steps). Returns `[c.len, heads * d]` in `q`'s dtype.
pub fn attend_chunk(
    q: &Tensor,
    c: &ChunkRef,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    masks: &mut MaskCache,
    dtype: DType,
) -> Result<Tensor> {
    let out = q.dtype();
    let q = q.narrow(0, c.offset, c.len)?;
    let q = if c.len == 1 && c.start > 0 {
        q.to_dtype(dtype)?
    } else {
        q
    };
    attend(&q, k, v, c.start, p, masks)?.to_dtype(out)
}

/// `q`: `[n, heads, d]`; `k`, `v`: `[kv_heads, L, d]` (the whole history, this chunk included).
/// Returns `[n, heads * d]` in `q`'s dtype. Everything is computed in f32 (bf16 scores would
/// round a score of 10 to steps of 0.06).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: usize,
    p: &AttnParams,
    masks: &mut MaskCache,
) -> Result<Tensor> {
    let (n, heads, d) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let group = heads / p.num_kv_heads;
    let dtype = q.dtype();
    let (q, k, v) = (
        q.to_dtype(DType::F32)?,
        k.to_dtype(DType::F32)?,
        v.to_dtype(DType::F32)?,
    );
    // Heads `h*group .. (h+1)*group` share kv head `h` (HF's repeat_kv order).
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((p.num_kv_heads, group * n, d))?;
    let scores = q.matmul(&k.t()?)?;
    let mut scores = (scores * p.scale)?;
    if let Some(cap) = p.softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if let Some(mask) = masks.get(n, kv_len, q_start, p.window, q.device())? {
        scores = scores
            .reshape((p.num_kv_heads, group, n, kv_len))?
            .broadcast_add(&mask)?
            .reshape((p.num_kv_heads, group * n, kv_len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v)?; // [kv_heads, group * n, d]
    out.to_dtype(dtype)?
        .reshape((heads, n, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, heads * d))
}
