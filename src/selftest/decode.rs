//! The decode attention kernels against the CPU attention ([`attend`], candle ops in f32) on
//! random bf16 caches: every kernel choice ([`DECODE_KERNELS`]) over shapes that reach each of
//! the split kernel's partition sizes (128, 256 and 512 tokens by the step's (sequence, kv head)
//! pairs), groups of 2 to 8 query heads, head sizes 64, 128 and 256, a sliding window with
//! soft-capping, and contexts of 1 to 1,400 tokens in block tables that share physical blocks.
//! The reference runs on the same bf16 values in f32; what is left is the rounding of the bf16
//! output (at most 2^-9 of values below 2), so the limit is 5e-3. The same cases run again over
//! fp8 E4M3 caches (`--kv-cache-dtype fp8`) holding values rounded to E4M3, against the
//! reference on those values; there the `mma` kernels (`paged_decode_mma_fp8`, staged or
//! direct) multiply in f16 and `scalar` is the split kernel's scalar path.

use candle_core::{DType, Device, Tensor};

use super::prefill::{test_params, values};
use super::{Check, SelftestError};
use crate::checkpoint::CheckpointError;
use crate::engine::attention::cuda::BLOCK_SIZE;
use crate::engine::attention::decode::{paged_decode, DECODE_KERNELS};
use crate::engine::attention::{attend, MaskCache};

/// (head size, query heads, kv heads, window, soft cap, sequences).
type Case = (usize, usize, usize, Option<usize>, Option<f64>, usize);

const CASES: [Case; 5] = [
    (128, 32, 8, None, None, 130),
    (64, 16, 4, Some(100), Some(30.0), 80),
    (128, 16, 2, None, None, 20),
    (64, 9, 3, None, None, 7),
    (256, 8, 4, Some(48), Some(50.0), 12),
];
const PHYSICAL_BLOCKS: usize = 200;
const MAX_CONTEXT: usize = 1400;

/// Sequence `i`'s context length and its `j`-th block.
fn context(i: usize) -> usize {
    1 + (i * 389 + 17) % MAX_CONTEXT
}
fn block(i: usize, j: usize) -> usize {
    (i * 31 + j * 17 + 5) % PHYSICAL_BLOCKS
}

/// Random values exactly representable in `cache` (bf16 or fp8 E4M3).
fn cache_values(n: usize, seed: u64, cache: DType) -> Vec<f32> {
    values(n, seed)
        .into_iter()
        .map(|v| match cache {
            DType::F8E4M3 => float8::F8E4M3::from_f32(v).to_f32(),
            _ => half::bf16::from_f32(v).to_f32(),
        })
        .collect()
}

/// Max |kernel - reference| over every sequence of one case, for each kernel choice.
fn run_case(
    cuda: &Device,
    (hd, heads, kv_heads, window, softcap, seqs): Case,
    cache: DType,
) -> candle_core::Result<[f32; DECODE_KERNELS.len()]> {
    let params = test_params(hd, (heads, kv_heads), window, softcap);
    // The pool in token order [block, slot, kv head, dim], and in the caches' layouts (X
    // elements a 16-byte vector).
    let x = 16 / cache.size_in_bytes();
    let pool = PHYSICAL_BLOCKS * BLOCK_SIZE * kv_heads * hd;
    let (keys, vals) = (cache_values(pool, 11, cache), cache_values(pool, 12, cache));
    let at =
        |b: usize, t: usize, h: usize, d: usize| ((b * BLOCK_SIZE + t) * kv_heads + h) * hd + d;
    let (mut kc, mut vc) = (vec![0f32; pool], vec![0f32; pool]);
    for b in 0..PHYSICAL_BLOCKS {
        for t in 0..BLOCK_SIZE {
            for h in 0..kv_heads {
                for d in 0..hd {
                    let head = b * kv_heads + h;
                    kc[((head * (hd / x) + d / x) * BLOCK_SIZE + t) * x + d % x] =
                        keys[at(b, t, h, d)];
                    vc[(head * hd + d) * BLOCK_SIZE + t] = vals[at(b, t, h, d)];
                }
            }
        }
    }
    let max_blocks = MAX_CONTEXT.div_ceil(BLOCK_SIZE);
    let tables: Vec<u32> = (0..seqs)
        .flat_map(|i| (0..max_blocks).map(move |j| block(i, j) as u32))
        .collect();
    let lens: Vec<u32> = (0..seqs).map(|i| context(i) as u32).collect();
    let q = cache_values(seqs * heads * hd, 13, DType::BF16);
    let cpu = Device::Cpu;
    let on_cuda = |v: Vec<f32>| -> candle_core::Result<Tensor> {
        Tensor::from_vec(v, pool, &cpu)?
            .to_dtype(cache)?
            .to_device(cuda)
    };
    let caches = (on_cuda(kc)?, on_cuda(vc)?);
    let tables = Tensor::from_vec(tables, (seqs, max_blocks), cuda)?;
    let lens = Tensor::from_vec(lens, seqs, cuda)?;
    let q_cpu = Tensor::from_vec(q, (seqs, heads, hd), &cpu)?;
    let q_cuda = q_cpu.to_dtype(DType::BF16)?.to_device(cuda)?;
    let max_context = (0..seqs).map(context).max().unwrap_or(1);
    let mut outs = Vec::new();
    for (_, kernel) in DECODE_KERNELS {
        let out = paged_decode(
            &q_cuda,
            (&caches.0, &caches.1),
            (&tables, &lens),
            max_context,
            &params,
            kernel,
        )?;
        outs.push(out.to_dtype(DType::F32)?.to_device(&cpu)?);
    }
    let mut errs = [0f32; DECODE_KERNELS.len()];
    let mut masks = MaskCache::default();
    for i in 0..seqs {
        let ctx = context(i);
        let gather = |src: &[f32]| -> candle_core::Result<Tensor> {
            let mut rows = vec![0f32; kv_heads * ctx * hd];
            for p in 0..ctx {
                for h in 0..kv_heads {
                    let from = at(block(i, p / BLOCK_SIZE), p % BLOCK_SIZE, h, 0);
                    let to = (h * ctx + p) * hd;
                    rows[to..to + hd].copy_from_slice(&src[from..from + hd]);
                }
            }
            Tensor::from_vec(rows, (kv_heads, ctx, hd), &cpu)
        };
        let q_i = q_cpu.narrow(0, i, 1)?;
        let want = attend(
            &q_i,
            &gather(&keys)?,
            &gather(&vals)?,
            ctx - 1,
            &params,
            &mut masks,
        )?
        .flatten_all()?;
        for (err, out) in errs.iter_mut().zip(&outs) {
            let d = (out.narrow(0, i, 1)?.flatten_all()? - &want)?
                .abs()?
                .max(0)?;
            *err = err.max(d.to_scalar::<f32>()?);
        }
        masks.clear();
    }
    Ok(errs)
}

/// One check over every case and each kernel choice, on caches of `cache` (bf16 or fp8).
pub(super) fn decode_check(cuda: &Device, cache: DType) -> Result<Check, SelftestError> {
    let (mut worst, mut detail) = (0f32, Vec::new());
    for case in CASES {
        let errs = run_case(cuda, case, cache).map_err(CheckpointError::from)?;
        let each: Vec<String> = DECODE_KERNELS
            .iter()
            .zip(errs)
            .map(|((name, _), err)| format!("{name} {err:.1e}"))
            .collect();
        detail.push(format!(
            "hd {} heads {}/{} seqs {}: {}",
            case.0,
            case.1,
            case.2,
            case.5,
            each.join(", ")
        ));
        worst = errs.into_iter().fold(worst, f32::max);
    }
    Ok(Check {
        name: format!(
            "decode attention kernels vs CPU attention on {cache:?} caches (within 5e-3)"
        ),
        passed: worst <= 5e-3,
        informational: false,
        detail: detail.join("; "),
    })
}
