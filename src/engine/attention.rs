//! Causal (optionally sliding-window, optionally soft-capped) grouped-query attention of one
//! sequence chunk against its full key/value history. Device-agnostic candle ops.

use candle_core::{DType, Device, Result, Tensor};

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
/// iff `j <= pos` and (with a window `w`) `pos - j < w`. `None` when nothing is masked.
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
    let mut mask = vec![0f32; n * kv_len];
    for i in 0..n {
        let pos = q_start + i;
        for j in 0..kv_len {
            let hidden = j > pos || window.is_some_and(|w| pos - j >= w);
            if hidden {
                mask[i * kv_len + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(mask, (n, kv_len), device).map(Some)
}

/// `q`: `[n, heads, d]`; `k`, `v`: `[kv_heads, L, d]` (the whole history, this chunk included).
/// Returns `[n, heads * d]` in `q`'s dtype. Scores and softmax are computed in f32.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: usize,
    p: &AttnParams,
) -> Result<Tensor> {
    let (n, heads, d) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let group = heads / p.num_kv_heads;
    let dtype = q.dtype();
    // Heads `h*group .. (h+1)*group` share kv head `h` (HF's repeat_kv order).
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((p.num_kv_heads, group * n, d))?;
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let mut scores = (scores * p.scale)?;
    if let Some(cap) = p.softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if let Some(mask) = causal_mask(n, kv_len, q_start, p.window, q.device())? {
        scores = scores
            .reshape((p.num_kv_heads, group, n, kv_len))?
            .broadcast_add(&mask)?
            .reshape((p.num_kv_heads, group * n, kv_len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(v)?; // [kv_heads, group * n, d]
    out.reshape((heads, n, d))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, heads * d))
}

/// Splits `[n, heads*d]`-style projections into `[n, heads, d]`.
pub fn split_heads(x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    x.reshape((n, heads, d))
}
