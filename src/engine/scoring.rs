//! Prompt scoring: natural-log log-softmax over logits rows, the logprob of each actual next token
//! and the top-k alternatives, computed on the logits' device; only `[rows, k]` reaches the host.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::sampler::Sampled;

/// The logprob of one position's target token and the best alternatives (descending).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenScore {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Scores `targets[i]` under row `i` of `logits` (`[rows >= targets.len(), vocab]`, f32).
pub fn score_rows(
    logits: &Tensor,
    targets: &[u32],
    top_k: usize,
) -> candle_core::Result<Vec<TokenScore>> {
    let n = targets.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let lsm =
        candle_nn::ops::log_softmax(&logits.narrow(0, 0, n)?.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, lsm.device())?.unsqueeze(1)?;
    let target_lp: Vec<f32> = lsm.gather(&idx, 1)?.squeeze(1)?.to_vec1()?;
    let top = top_k_rows(&lsm, top_k)?;
    Ok(targets
        .iter()
        .zip(target_lp)
        .zip(top)
        .map(|((&token, logprob), top)| TokenScore {
            token,
            logprob,
            top,
        })
        .collect())
}

/// Greedy picks for logits rows: the argmax token of each row, its log-softmax value and the
/// top-`k` log-softmax entries, computed on the logits' device.
pub fn greedy_rows(logits: &Tensor, k: usize) -> candle_core::Result<Vec<Sampled>> {
    let lsm = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let top = top_k_rows(&lsm, k.max(1))?;
    Ok(top
        .into_iter()
        .map(|top| Sampled {
            token: top[0].0,
            logprob: top[0].1,
            top: top.into_iter().take(k).collect(),
        })
        .collect())
}

/// The `k` largest entries of each row, by repeated argmax with masking (no full sort, so it
/// works for any vocabulary size on any device).
pub fn top_k_rows(values: &Tensor, k: usize) -> candle_core::Result<Vec<Vec<(u32, f32)>>> {
    let (rows, vocab) = values.dims2()?;
    let mut out = vec![Vec::with_capacity(k); rows];
    if k == 0 {
        return Ok(out);
    }
    let cols = Tensor::arange(0u32, vocab as u32, values.device())?.unsqueeze(0)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (rows, vocab), values.device())?;
    let mut work = values.clone();
    for step in 0..k.min(vocab) {
        let idx = work.argmax_keepdim(D::Minus1)?;
        let val: Vec<f32> = work.gather(&idx, 1)?.squeeze(1)?.to_vec1()?;
        let ids: Vec<u32> = idx.squeeze(1)?.to_vec1()?;
        for (r, (i, v)) in ids.into_iter().zip(val).enumerate() {
            out[r].push((i, v));
        }
        if step + 1 < k {
            let hit = cols.broadcast_eq(&idx)?;
            work = hit.where_cond(&neg_inf, &work)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_direct_log_softmax() {
        let rows = vec![vec![1.0f32, 2.0, 3.0, 0.5], vec![-1.0, 4.0, 4.5, 0.0]];
        let t = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let s = score_rows(&t, &[0, 2], 2).unwrap();
        for (r, row) in rows.iter().enumerate() {
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            let want = row[s[r].token as usize] as f64 - lse;
            assert!((s[r].logprob as f64 - want).abs() < 1e-6);
            let mut sorted: Vec<(usize, f64)> =
                row.iter().map(|&x| x as f64 - lse).enumerate().collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (j, (id, lp)) in s[r].top.iter().enumerate() {
                assert_eq!(*id as usize, sorted[j].0);
                assert!((*lp as f64 - sorted[j].1).abs() < 1e-6);
            }
        }
    }
}
