//! How long the decode attention kernels take at the steady state's shape (informational): 256
//! sequences of the 8B shape's attention (32 query heads over 8 kv heads of 128), contexts of
//! 600 to 1,000 tokens in distinct blocks (so the caches, 0.4 GB of fp8 or 0.8 GB of bf16 a
//! layer, cannot stay in L2), on bf16 and fp8 caches, each kernel choice. A whole decode step's
//! time moves by several percent between runs of one binary (session 18); this times the kernel
//! alone: ten launches back to back between two synchronizations, the best of three such runs,
//! and the bytes of keys and values it reads per second.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::prefill::test_params;
use super::Check;
use crate::engine::attention::cuda::BLOCK_SIZE;
use crate::engine::attention::decode::{paged_decode, DECODE_KERNELS};

const SEQS: usize = 256;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
pub(super) const LAUNCHES: usize = 10;
const MAX_CONTEXT: usize = 1000;

/// Sequence `i`'s context: 600 to [`MAX_CONTEXT`] tokens.
fn context(i: usize) -> usize {
    600 + (i * 157) % (MAX_CONTEXT - 599)
}

/// Microseconds per launch of `launch` (called with the launch's index): the best of three runs
/// of [`LAUNCHES`] back to back between two synchronizations.
pub(super) fn best_micros(
    cuda: &Device,
    mut launch: impl FnMut(usize) -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        cuda.synchronize()?;
        let t = Instant::now();
        for i in 0..LAUNCHES {
            launch(i)?;
        }
        cuda.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / LAUNCHES as f64);
    }
    Ok(best)
}

/// One line per cache type: each kernel's µs per launch and the TB/s of cache it reads.
fn timings(cuda: &Device, cache: DType) -> candle_core::Result<String> {
    let max_blocks = MAX_CONTEXT.div_ceil(BLOCK_SIZE);
    let blocks = SEQS * max_blocks;
    let per_block = BLOCK_SIZE * KV_HEADS * HEAD_DIM;
    // Values need not be checked here (decode_check does): constant caches and queries, cast on
    // the host (candle's CUDA cast to fp8 fails, see engine::kv::fp8).
    let cache_tensor = || -> candle_core::Result<Tensor> {
        Tensor::full(0.25f32, blocks * per_block, &Device::Cpu)?
            .to_dtype(cache)?
            .to_device(cuda)
    };
    let (kc, vc) = (cache_tensor()?, cache_tensor()?);
    let table: Vec<u32> = (0..(SEQS * max_blocks) as u32).collect();
    let tables = Tensor::from_vec(table, (SEQS, max_blocks), cuda)?;
    let lens: Vec<u32> = (0..SEQS).map(|i| context(i) as u32).collect();
    let lens = Tensor::from_vec(lens, SEQS, cuda)?;
    let q = Tensor::full(0.5f32, (SEQS, HEADS, HEAD_DIM), cuda)?.to_dtype(DType::BF16)?;
    let max_context = (0..SEQS).map(context).max().unwrap_or(1);
    let tokens: usize = (0..SEQS).map(context).sum();
    let bytes = (tokens * KV_HEADS * HEAD_DIM * 2 * cache.size_in_bytes()) as f64;
    let params = test_params(HEAD_DIM, (HEADS, KV_HEADS), None, None);
    let mut parts = Vec::new();
    for (name, kernel) in DECODE_KERNELS {
        let us = best_micros(cuda, |_| {
            paged_decode(
                &q,
                (&kc, &vc),
                (&tables, &lens),
                max_context,
                &params,
                kernel,
            )
            .map(|_| ())
        })?;
        parts.push(format!(
            "{name} {us:.1} us ({:.2} TB/s)",
            bytes / (us * 1e-6) / 1e12
        ));
    }
    Ok(format!(
        "{cache:?} caches, {:.0} MB read: {}",
        bytes / 1e6,
        parts.join(", ")
    ))
}

/// An informational timing check of `lines` (one `; `-joined detail), or, when they could not be
/// measured, a failed check naming the error (the selftest goes on either way).
pub(super) fn timing_check(name: String, lines: candle_core::Result<Vec<String>>) -> Check {
    match lines {
        Ok(lines) => Check {
            name,
            passed: true,
            informational: true,
            detail: lines.join("; "),
        },
        Err(e) => Check {
            name,
            passed: false,
            informational: false,
            detail: format!("could not be timed: {e}"),
        },
    }
}

/// The informational timing over bf16 and fp8 caches ([`timing_check`]).
pub(super) fn decode_timing_check(cuda: &Device) -> Check {
    let name = format!(
        "decode attention time, {SEQS} sequences of 600-1,000 tokens, {HEADS}/{KV_HEADS} heads of \
         {HEAD_DIM} (best of 3 x {LAUNCHES} launches)"
    );
    let lines = [DType::BF16, DType::F8E4M3]
        .into_iter()
        .map(|cache| timings(cuda, cache))
        .collect();
    timing_check(name, lines)
}
