//! Prompt scoring: natural-log log-softmax over logits rows, the logprob of each actual next token
//! and the top-k alternatives, computed on the logits' device; only `[rows, k]` reaches the host
//! (on CUDA, scores with at most one alternative come from one kernel for the whole step; on the
//! CPU each row's log-sum-exp is summed in f64).

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use crate::engine::sample::sampler::{top_k_pairs, DeviceDraw, Sampled};

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
    if logits.device().is_cpu() {
        let rows = logits
            .narrow(0, 0, n)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        return rows
            .iter()
            .zip(targets)
            .map(|(row, &token)| host_score(row, token, top_k))
            .collect();
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

/// One scored chunk of a step's logits: `targets.len()` rows from `at`, each scored for its
/// target token, with the best `top_k` alternatives.
pub struct ScoreSpan<'a> {
    pub at: usize,
    pub targets: &'a [u32],
    pub top_k: usize,
}

/// [`score_rows`] for every span of `logits` (`[rows, vocab]`, f32). On CUDA the spans asking
/// for at most one alternative (lm-eval's loglikelihood asks for one) are scored in one launch
/// (`score_pick_f32` in sampling.cu: no `[rows, vocab]` log-softmax in memory, one transfer for
/// the step); the others, and every span on the CPU, through [`score_rows`] one span at a time.
pub fn score_spans(
    logits: &Tensor,
    spans: &[ScoreSpan<'_>],
) -> candle_core::Result<Vec<Vec<TokenScore>>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::score_spans(logits, spans);
    }
    spans
        .iter()
        .map(|s| {
            score_rows(
                &logits.narrow(0, s.at, s.targets.len())?,
                s.targets,
                s.top_k,
            )
        })
        .collect()
}

/// Greedy picks for logits rows: the argmax token of each row, its log-softmax value and the
/// top-`k` log-softmax entries, computed on the logits' device.
pub fn greedy_rows(logits: &Tensor, k: usize) -> candle_core::Result<Vec<Sampled>> {
    #[cfg(feature = "cuda")]
    if k <= 1 && logits.device().is_cuda() {
        return cuda::greedy_pick(logits, k);
    }
    if logits.device().is_cpu() {
        return logits
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .iter()
            .map(|row| {
                let top = top_logprobs(row, log_sum_exp(row), k.max(1));
                let Some(&(token, logprob)) = top.first() else {
                    candle_core::bail!("greedy pick over an empty row");
                };
                Ok(Sampled {
                    token,
                    logprob,
                    top: top.into_iter().take(k).collect(),
                })
            })
            .collect();
    }
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

/// The `k` largest entries of each row, largest first (the lower index first on ties): on the
/// host by partial selection for CPU tensors, by repeated argmax with masking on a device (no
/// full sort, so it works for any vocabulary size there).
pub fn top_k_rows(values: &Tensor, k: usize) -> candle_core::Result<Vec<Vec<(u32, f32)>>> {
    if values.device().is_cpu() {
        return Ok(values
            .to_vec2::<f32>()?
            .iter()
            .map(|row| top_k_pairs(row, k))
            .collect());
    }
    top_k_masked(values, k)
}

/// Repeated argmax with masking, on the tensor's device.
fn top_k_masked(values: &Tensor, k: usize) -> candle_core::Result<Vec<Vec<(u32, f32)>>> {
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

/// One row scored on the host: `token`'s log-softmax value and the best `top_k` alternatives,
/// against [`log_sum_exp`].
fn host_score(row: &[f32], token: u32, top_k: usize) -> candle_core::Result<TokenScore> {
    let Some(&target) = row.get(token as usize) else {
        candle_core::bail!(
            "scoring: token {token} outside a vocabulary of {}",
            row.len()
        );
    };
    let lse = log_sum_exp(row);
    Ok(TokenScore {
        token,
        logprob: raw_logprob(target, lse),
        top: top_logprobs(row, lse, top_k),
    })
}

/// A logit's log-softmax value against its row's [`log_sum_exp`].
pub fn raw_logprob(logit: f32, lse: f64) -> f32 {
    (f64::from(logit) - lse) as f32
}

/// The best `k` entries of `row` ([`top_k_pairs`]: largest first, ties to the lower id) as
/// log-softmax values against its [`log_sum_exp`] `lse`.
pub fn top_logprobs(row: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    top_k_pairs(row, k)
        .into_iter()
        .map(|(id, v)| (id, raw_logprob(v, lse)))
        .collect()
}

/// `ln Σ exp(row)`: each exponential in f32 (of `x - max`), their sum in f64, so a row of a
/// large vocabulary loses nothing to the sum (candle's f32 log-softmax on the CPU, a sequential f32
/// sum, was up to 2.9e-4 off an f64 one over the selftest's rows of 128,256 ids; `draw_f32` sums
/// the same way on CUDA).
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
    f64::from(max) + sum.ln()
}

/// Draw steps of at most this many rows take a cluster of blocks per row on CUDA (sm_90), so that
/// one row's passes over the vocabulary run on several multiprocessors; more rows fill the GPU
/// with a block each.
pub const CLUSTER_DRAW_ROWS: usize = 16;

static CLUSTER_DRAWS: std::sync::LazyLock<std::sync::atomic::AtomicBool> =
    std::sync::LazyLock::new(|| {
        let on = std::env::var("PRUNESERVE_DRAW_CLUSTER").map_or(true, |v| v != "0");
        std::sync::atomic::AtomicBool::new(on)
    });

/// Turns the cluster draws of small steps on or off for this process (on unless
/// `PRUNESERVE_DRAW_CLUSTER=0`; the selftest times both).
pub fn set_cluster_draws(on: bool) {
    CLUSTER_DRAWS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Draws one token per row of `logits` on CUDA with each row's settings and uniform number
/// (`draw_f32` in sampling.cu; its definition, and the CPU reference it is checked against by
/// `selftest`, is [`super::sampler::Sampler::sample`]): the token and its raw logprob, so only two
/// numbers per row leave the device.
pub fn draw_rows(logits: &Tensor, draws: &[DeviceDraw]) -> candle_core::Result<Vec<Sampled>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::draw(logits, draws);
    }
    let _ = (logits, draws);
    candle_core::bail!("device draws run on CUDA only")
}

/// One-kernel picks on CUDA (sampling.cu): greedy picks for up to one reported logprob (the argmax
/// and its log-softmax value without the `[rows, vocab]` log-softmax in memory) and seeded draws.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

    use super::{score_rows, ScoreSpan, TokenScore};
    use crate::engine::attention::cuda::storage_view;
    use crate::engine::sample::sampler::{DeviceDraw, Sampled};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

    struct GreedyPick;

    impl CustomOp1 for GreedyPick {
        fn name(&self) -> &'static str {
            "greedy-pick"
        }

        crate::engine::ops::cuda_only_cpu_fwd!(1);

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            pairs_per_row(s, l, ("greedy_pick_f32", 1), None)
        }
    }

    /// Launches `kernel` of sampling.cu with `blocks` 1024-thread blocks per row of the f32
    /// logits in `s` (a cluster when more than one): arguments (logits, out, vocab[, params,
    /// masses]), two f32 written per row into `out`; draws get a scratch of 8 bytes per logit
    /// (each id's fixed-point mass, computed once).
    fn pairs_per_row(
        s: &CudaStorage,
        l: &Layout,
        (kernel, blocks): (&str, usize),
        params: Option<&CudaView<'_, f64>>,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let dev = s.device().clone();
        let logits = storage_view::<f32>(s, l, "logits")?;
        // SAFETY: both kernels write both values of every row.
        let out = unsafe { dev.alloc::<f32>(rows * 2)? };
        let func = dev.get_or_load_custom_func(kernel, "pruneserve_sampling", PTX)?;
        let vocab_i = vocab as i32;
        let mut b = func.builder();
        b.arg(&logits).arg(&out).arg(&vocab_i);
        // SAFETY: draw_f32 writes every id's mass before it reads any.
        let masses = params
            .map(|_| unsafe { dev.alloc::<u64>(rows * vocab) })
            .transpose()?;
        if let (Some(p), Some(m)) = (params, &masses) {
            b.arg(p).arg(m);
        }
        let cfg = LaunchConfig {
            grid_dim: ((rows * blocks) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `greedy_pick_f32(logits, out, vocab)` and
        // `draw_f32(logits, out, vocab, params, masses)` / `draw_f32_c8` (5 doubles per row,
        // rows * vocab u64) in sampling.cu; `draw_f32_c8` is compiled with clusters of
        // DRAW_CLUSTER_BLOCKS, which divides the grid.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, 2)),
        ))
    }

    /// Blocks of `draw_f32_c8`'s cluster (DRAW_CLUSTER in sampling.cu).
    const DRAW_CLUSTER_BLOCKS: usize = 8;

    /// The draw kernel for `rows` rows: steps of at most [`super::CLUSTER_DRAW_ROWS`] rows take
    /// a cluster of blocks per row (sm_90 builds, unless [`super::set_cluster_draws`] turned it
    /// off; a cluster launch that fails is run again a block per row), the others a block per
    /// row.
    fn draw_kernel(
        dev: &candle_core::cuda_backend::CudaDevice,
        rows: usize,
    ) -> (&'static str, usize) {
        let cluster = super::CLUSTER_DRAWS.load(std::sync::atomic::Ordering::Relaxed)
            && rows <= super::CLUSTER_DRAW_ROWS
            && dev
                .get_or_load_custom_func("draw_f32_c8", "pruneserve_sampling", PTX)
                .is_ok();
        match cluster {
            true => ("draw_f32_c8", DRAW_CLUSTER_BLOCKS),
            false => ("draw_f32", 1),
        }
    }

    struct Draw;

    impl CustomOp2 for Draw {
        fn name(&self) -> &'static str {
            "device-draw"
        }

        crate::engine::ops::cuda_only_cpu_fwd!(2);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
            ps: &CudaStorage,
            pl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let params = storage_view::<f64>(ps, pl, "draw params")?;
            let rows = l.shape().dims2()?.0;
            let kernel = draw_kernel(s.device(), rows);
            match pairs_per_row(s, l, kernel, Some(&params)) {
                // A cluster the device cannot place (a small MIG slice): a block per row.
                Err(_) if kernel.1 > 1 => pairs_per_row(s, l, ("draw_f32", 1), Some(&params)),
                other => other,
            }
        }
    }

    pub fn draw(logits: &Tensor, draws: &[DeviceDraw]) -> Result<Vec<Sampled>> {
        let params: Vec<f64> = draws
            .iter()
            .flat_map(|d| {
                [
                    d.u,
                    1.0 / f64::from(d.temperature),
                    f64::from(d.top_p),
                    f64::from(d.min_p),
                    d.top_k as f64,
                ]
            })
            .collect();
        let params = Tensor::from_vec(params, (draws.len(), 5), logits.device())?;
        let picks = as_f32(logits)?.apply_op2_no_bwd(&params, &Draw)?;
        Ok(read_picks(&picks)?
            .map(|(token, logprob)| Sampled {
                token,
                logprob,
                top: Vec::new(),
            })
            .collect())
    }

    pub fn greedy_pick(logits: &Tensor, k: usize) -> Result<Vec<Sampled>> {
        let picks = as_f32(logits)?.apply_op1_no_bwd(&GreedyPick)?;
        Ok(read_picks(&picks)?
            .map(|(token, logprob)| Sampled {
                token,
                logprob,
                top: if k == 1 {
                    vec![(token, logprob)]
                } else {
                    Vec::new()
                },
            })
            .collect())
    }

    struct ScorePick;

    impl CustomOp3 for ScorePick {
        fn name(&self) -> &'static str {
            "score-pick"
        }

        crate::engine::ops::cuda_only_cpu_fwd!(3);

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
            rs: &CudaStorage,
            rl: &Layout,
            ts: &CudaStorage,
            tl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (_, vocab) = l.shape().dims2()?;
            let n = rl.shape().elem_count();
            let dev = s.device().clone();
            let logits = storage_view::<f32>(s, l, "logits")?;
            let rows = storage_view::<u32>(rs, rl, "scored rows")?;
            let targets = storage_view::<u32>(ts, tl, "targets")?;
            // SAFETY: the kernel writes all three values of every scored row.
            let out = unsafe { dev.alloc::<f32>(n * 3)? };
            let func = dev.get_or_load_custom_func("score_pick_f32", "pruneserve_sampling", PTX)?;
            let vocab_i = vocab as i32;
            let mut b = func.builder();
            b.arg(&logits)
                .arg(&rows)
                .arg(&targets)
                .arg(&out)
                .arg(&vocab_i);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `score_pick_f32(logits, rows, targets, out, vocab)` in
            // sampling.cu; `score_spans` checked every row below the logits' rows and every
            // target below `vocab`.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, 3))))
        }
    }

    /// [`super::score_spans`] on CUDA: spans of `top_k <= 1` through `score_pick_f32`, the
    /// others through [`super::score_rows`].
    pub fn score_spans(logits: &Tensor, spans: &[ScoreSpan<'_>]) -> Result<Vec<Vec<TokenScore>>> {
        let logits = as_f32(logits)?;
        let (n_rows, vocab) = logits.dims2()?;
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for s in spans.iter().filter(|s| s.top_k <= 1) {
            if s.at + s.targets.len() > n_rows {
                candle_core::bail!("scoring: rows {}.. outside {n_rows} logits rows", s.at);
            }
            if let Some(t) = s.targets.iter().find(|&&t| t as usize >= vocab) {
                candle_core::bail!("scoring: target {t} outside a vocabulary of {vocab}");
            }
            rows.extend((s.at..s.at + s.targets.len()).map(|r| r as u32));
            targets.extend_from_slice(s.targets);
        }
        let mut picked = Vec::new().into_iter();
        if !rows.is_empty() {
            let dev = logits.device();
            let rows = Tensor::new(rows.as_slice(), dev)?;
            let targets_t = Tensor::new(targets.as_slice(), dev)?;
            let out = logits.apply_op3_no_bwd(&rows, &targets_t, &ScorePick)?;
            picked = out.to_vec2::<f32>()?.into_iter();
        }
        spans
            .iter()
            .map(|s| match s.top_k {
                0 | 1 => Ok(s
                    .targets
                    .iter()
                    .zip(picked.by_ref())
                    .map(|(&token, p)| TokenScore {
                        token,
                        logprob: p[0],
                        top: match s.top_k {
                            1 => vec![(p[1] as u32, p[2])],
                            _ => Vec::new(),
                        },
                    })
                    .collect()),
                _ => score_rows(
                    &logits.narrow(0, s.at, s.targets.len())?,
                    s.targets,
                    s.top_k,
                ),
            })
            .collect()
    }

    /// The logits as the kernels read them: contiguous f32.
    fn as_f32(logits: &Tensor) -> Result<Tensor> {
        logits.to_dtype(candle_core::DType::F32)?.contiguous()
    }

    /// The (token, logprob) pair a pick kernel wrote for each row.
    fn read_picks(picks: &Tensor) -> Result<impl Iterator<Item = (u32, f32)>> {
        Ok(picks
            .to_vec2::<f32>()?
            .into_iter()
            .map(|p| (p[0] as u32, p[1])))
    }
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

    /// A flat row of Llama-3's 128,256 ids and its f64 log-sum-exp.
    fn flat_row() -> (Vec<f32>, f64) {
        let row: Vec<f32> = (0..128_256u64)
            .map(|i| ((i * 2_654_435_761 % 1000) as f32 / 1000.0 - 0.5) * 3.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        (row, max + sum.ln())
    }

    #[test]
    fn host_scores_and_picks_are_exact_at_a_large_vocabulary() {
        let (row, lse) = flat_row();
        let t = Tensor::from_vec(row.clone(), (1, row.len()), &Device::Cpu).unwrap();
        let s = &score_rows(&t, &[17], 2).unwrap()[0];
        assert!((s.logprob as f64 - (row[17] as f64 - lse)).abs() < 2e-6);
        let g = &greedy_rows(&t, 1).unwrap()[0];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(
            g.token as usize,
            row.iter().position(|&x| x == max).unwrap()
        );
        assert!((g.logprob as f64 - (max as f64 - lse)).abs() < 2e-6);
        assert_eq!(s.top[0], (g.token, g.logprob));
        assert!(score_rows(&t, &[128_256], 0).is_err());
    }

    #[test]
    fn spans_are_scored_on_their_own_rows() {
        let data: Vec<f32> = (0..5 * 7).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let t = Tensor::from_vec(data, (5, 7), &Device::Cpu).unwrap();
        let (a, b) = ([3u32, 0], [6u32, 1, 2]);
        let spans = [
            ScoreSpan {
                at: 0,
                targets: &a,
                top_k: 1,
            },
            ScoreSpan {
                at: 2,
                targets: &b,
                top_k: 3,
            },
        ];
        let got = score_spans(&t, &spans).unwrap();
        assert_eq!(
            got[0],
            score_rows(&t.narrow(0, 0, 2).unwrap(), &a, 1).unwrap()
        );
        assert_eq!(
            got[1],
            score_rows(&t.narrow(0, 2, 3).unwrap(), &b, 3).unwrap()
        );
        assert_eq!(got[1][0].token, 6);
        assert_eq!(got[1][2].top.len(), 3);
    }

    #[test]
    fn host_selection_equals_masked_argmax_with_ties() {
        // Values with many exact ties.
        let data: Vec<f32> = (0..3 * 500)
            .map(|i| ((i * 7919) % 23) as f32 * 0.5)
            .collect();
        let t = Tensor::from_vec(data, (3, 500), &candle_core::Device::Cpu).unwrap();
        for k in [1, 5, 20, 500, 600] {
            assert_eq!(
                top_k_rows(&t, k).unwrap(),
                top_k_masked(&t, k.min(500)).unwrap(),
                "k {k}"
            );
        }
    }
}
