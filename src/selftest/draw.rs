//! The device draw kernel (`draw_f32` in sampling.cu) against the host sampler on the same
//! logits and uniform numbers, at Llama-3's vocabulary size (128,256 ids), where the engine checks'
//! small vocabularies do not reach: flat, peaked and heavily tied logits (every value a multiple of
//! 0.5, so the truncation boundaries fall inside runs of equal values) under the paper's
//! sampling and top-k / top-p / min-p mixes, drawn in one step of every row (a block per row) and
//! in steps of four rows (a cluster of blocks per row). Tokens must be equal and logprobs within
//! 1e-4. The kernel's time for one row (both ways) and for 256 rows is reported (informational).
//! The prompt-scoring kernel (`score_pick_f32`) is checked the same way against the CPU's candle
//! log-softmax.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::prefill::values;
use super::{Check, SelftestError};
use crate::checkpoint::CheckpointError;
use crate::engine::sample::sampler::{DeviceDraw, Sampler, SamplingParams};
use crate::engine::sample::scoring::{draw_rows, score_spans, set_cluster_draws, ScoreSpan};

const VOCAB: usize = 128_256;
const SEEDS: u64 = 4;

/// (temperature, top_p, top_k, min_p).
const SETTINGS: [(f32, f32, usize, f32); 6] = [
    (0.9, 0.95, 0, 0.0),
    (1.0, 1.0, 50, 0.0),
    (0.7, 0.8, 0, 0.05),
    (1.3, 1.0, 0, 0.0),
    (1.0, 0.9, 1000, 0.0),
    (0.5, 0.5, 0, 0.2),
];

/// A row of logits in one of three shapes.
fn logits_row(style: usize, seed: u64) -> Vec<f32> {
    values(VOCAB, seed)
        .into_iter()
        .map(|v| match style {
            0 => v * 1.5,
            1 => v * 8.0,
            _ => (v * 4.0).round() / 2.0,
        })
        .collect()
}

/// Host and device picks for every (shape, setting, seed) row: (rows, tokens differing, largest
/// logprob difference).
fn compare(cuda: &Device) -> candle_core::Result<(usize, usize, f32)> {
    let (mut rows, mut draws, mut want) = (Vec::new(), Vec::new(), Vec::new());
    for style in 0..3 {
        for (k, &(temperature, top_p, top_k, min_p)) in SETTINGS.iter().enumerate() {
            for seed in 0..SEEDS {
                let params = SamplingParams {
                    temperature,
                    top_p,
                    top_k,
                    min_p,
                    seed: Some(seed * 101 + k as u64),
                    ..SamplingParams::default()
                };
                let row = logits_row(style, 1000 + seed * 7 + k as u64);
                want.push(Sampler::new(params.clone()).sample(&row, &[], &[]));
                let u = Sampler::new(params.clone()).next_uniform();
                draws.push(DeviceDraw::new(&params, u));
                rows.extend(row);
            }
        }
    }
    let n = draws.len();
    let logits = Tensor::from_vec(rows, (n, VOCAB), cuda)?;
    // All rows in one step (a block per row), then steps of SEEDS rows (a cluster per row).
    let mut got = draw_rows(&logits, &draws)?;
    for at in (0..n).step_by(SEEDS as usize) {
        let step = logits.narrow(0, at, SEEDS as usize)?;
        got.extend(draw_rows(&step, &draws[at..at + SEEDS as usize])?);
    }
    let want: Vec<_> = want.iter().chain(&want).collect();
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.token != w.token)
        .count();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g.logprob - w.logprob).abs())
        .fold(0f32, f32::max);
    Ok((2 * n, differ, worst))
}

/// Milliseconds of one `draw_rows` call over `rows` rows of paper-sampled flat logits (the best
/// of three, after a warm-up).
fn time_draws(cuda: &Device, rows: usize) -> candle_core::Result<f64> {
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        ..SamplingParams::default()
    };
    let logits: Vec<f32> = (0..rows as u64).flat_map(|r| logits_row(0, r)).collect();
    let logits = Tensor::from_vec(logits, (rows, VOCAB), cuda)?;
    let draws: Vec<_> = (0..rows)
        .map(|r| DeviceDraw::new(&params, (r as f64 + 0.5) / rows as f64))
        .collect();
    draw_rows(&logits, &draws)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        draw_rows(&logits, &draws)?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// The check, and the informational timing.
pub(super) fn draw_kernel_checks(cuda: &Device) -> Result<Vec<Check>, SelftestError> {
    let (n, differ, worst) = compare(cuda).map_err(CheckpointError::from)?;
    let check = Check {
        name: format!(
            "device draws vs the host sampler over {VOCAB} ids (flat, peaked and tied logits; \
             tokens equal, logprobs within 1e-4)"
        ),
        passed: differ == 0 && worst <= 1e-4,
        informational: false,
        detail: format!("{n} rows: {differ} tokens differ; max |dlogprob| {worst:.1e}"),
    };
    let one = time_draws(cuda, 1).map_err(CheckpointError::from)?;
    set_cluster_draws(false);
    let one_block = time_draws(cuda, 1);
    set_cluster_draws(true);
    let one_block = one_block.map_err(CheckpointError::from)?;
    let many = time_draws(cuda, 256).map_err(CheckpointError::from)?;
    let timing = Check {
        name: format!("device draw time over {VOCAB} ids (T 0.9, top_p 0.95)"),
        passed: true,
        informational: true,
        detail: format!(
            "1 row {one:.2} ms (a block per row: {one_block:.2}); 256 rows {many:.2} ms (best of \
             3, with the readback)"
        ),
    };
    Ok(vec![check, timing])
}

/// Prompt scores on CUDA (one `score_pick_f32` launch for the spans of at most one alternative,
/// candle ops for the span of five) against an f64 log-softmax of the same logits: flat, peaked
/// and tied rows, targets spread over the vocabulary. Each alternative must have the logit of the
/// reference's alternative of its rank (equal logits may come in either order) and every logprob
/// must be within 1e-4.
pub(super) fn score_kernel_check(cuda: &Device) -> Result<Check, SelftestError> {
    let (rows, differ, worst) = compare_scores(cuda).map_err(CheckpointError::from)?;
    Ok(Check {
        name: format!(
            "prompt scores on CUDA vs an f64 log-softmax over {VOCAB} ids (top 0, 1 and 5; \
             alternatives' logits equal, logprobs within 1e-4)"
        ),
        passed: differ == 0 && worst <= 1e-4,
        informational: false,
        detail: format!("{rows} rows: {differ} alternatives differ; max |dlogprob| {worst:.1e}"),
    })
}

/// (scored rows, alternatives whose logits differ from the reference's, largest logprob
/// difference).
fn compare_scores(cuda: &Device) -> candle_core::Result<(usize, usize, f64)> {
    let n = 12;
    let rows: Vec<Vec<f32>> = (0..n as u64)
        .map(|r| logits_row(r as usize % 3, 500 + r))
        .collect();
    let targets: Vec<u32> = (0..n as u32)
        .map(|r| (r * 40_009 + 7) % VOCAB as u32)
        .collect();
    // Spans: rows 0..4 with no alternative, 4..9 with one, 9..12 with five.
    let spans = [(0, 4, 0), (4, 5, 1), (9, 3, 5)].map(|(at, len, top_k)| ScoreSpan {
        at,
        targets: &targets[at..at + len],
        top_k,
    });
    let logits = Tensor::from_vec(rows.concat(), (n, VOCAB), cuda)?;
    let got: Vec<_> = score_spans(&logits, &spans)?
        .into_iter()
        .flatten()
        .collect();
    let (mut differ, mut worst) = (got.len().abs_diff(n), 0f64);
    let top_k = spans
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.top_k, s.targets.len()));
    for (((row, &target), g), k) in rows.iter().zip(&targets).zip(&got).zip(top_k) {
        differ += g.top.len().abs_diff(k);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        worst = worst.max((g.logprob as f64 - (row[target as usize] as f64 - lse)).abs());
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for ((id, lp), want) in g.top.iter().zip(&sorted) {
            differ += usize::from(row[*id as usize] != *want);
            worst = worst.max((*lp as f64 - (*want as f64 - lse)).abs());
        }
    }
    Ok((n, differ, worst))
}
