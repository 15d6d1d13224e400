//! One adapted projection or packed group of them ([`Delta`]): `A` stacked, `B` block-diagonal
//! with the scale folded in ([`pack`]), applied as [`linear_f32`] computes projections; and the
//! CUDA slot table's word naming each packed module's ranks ([`segment_word`]).

use candle_core::{DType, Device, Tensor};

use super::peft::Module;
use super::{AdapterError, ModuleWeights};
use crate::engine::ops::gemm::{linear_f32, linear_rows, linear_rows_accumulate, ExactRows};

/// `x · Aᵀ · Bᵀ` for one projection (or one packed group of them).
#[derive(Debug, Clone)]
pub struct Delta {
    /// `[R, in]`.
    pub(super) a: Tensor,
    /// `[out, R]`, scale folded in; block-diagonal for packed groups.
    pub(super) b: Tensor,
    /// Per packed module, in order: (its last output column + 1, its last rank + 1); output
    /// columns of a module have non-zero `B` only at that module's ranks (read by the CUDA
    /// slot table, [`segment_word`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) blocks: Vec<(usize, usize)>,
}

impl Delta {
    /// The rows shrunk: `x · Aᵀ` in the dtype of `x`.
    fn shrink(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear_f32(x, &self.a, None)?.to_dtype(x.dtype())
    }

    /// The f32 delta `[T, out]` of rows `x` `[T, in]` (in the step's activation dtype).
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear_f32(&self.shrink(x)?, &self.b, None)
    }

    /// (in, out) of the projection group.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        Ok((self.a.dim(1)?, self.b.dim(0)?))
    }

    /// `y` plus the delta of `x`, accumulated in place where the device allows it; an f32 `x`
    /// (a prompt step's rows) is taken compensated, and so are its shrunk rows, on the `exact`
    /// rows only, as the base projections take it ([`linear_rows`]).
    pub fn add_to(&self, y: Tensor, x: &Tensor, exact: &ExactRows) -> candle_core::Result<Tensor> {
        linear_rows_accumulate(y, &self.shrunk_rows(x, exact)?, &self.b, exact)
    }

    /// The f32 delta `[T, out]` of rows `x`, with the precision of [`Self::add_to`], written
    /// fresh (for a projection to accumulate into).
    pub fn fresh(&self, x: &Tensor, exact: &ExactRows) -> candle_core::Result<Tensor> {
        linear_rows(&self.shrunk_rows(x, exact)?, &self.b, None, exact)
    }

    /// `x · Aᵀ` in the dtype of `x`, compensated on the `exact` rows of an f32 `x`.
    fn shrunk_rows(&self, x: &Tensor, exact: &ExactRows) -> candle_core::Result<Tensor> {
        linear_rows(x, &self.a, None, exact)?.to_dtype(x.dtype())
    }
}

/// `Entry::seg` of lora.cu for a packed group's `blocks` ([`Delta`]): which ranks the output
/// columns of each module take, for the CUDA expand to skip the zero blocks of a block-diagonal
/// `B`. Bit 63 set, then the first two boundaries (columns / 16 in bits 0-15 and 24-39, ranks / 8
/// in bits 16-23 and 40-47); 0 (every column takes all ranks, always correct) for one module,
/// more than three, or boundaries the kernel cannot use (columns not a multiple of 16, ranks not
/// of 8, or too wide for the fields).
pub fn segment_word(blocks: &[(usize, usize)]) -> u64 {
    let [(o1, r1), (o2, r2), ..] = blocks else {
        return 0;
    };
    let fits = |o: usize, r: usize| {
        o.is_multiple_of(16) && r.is_multiple_of(8) && o / 16 <= 0xffff && r / 8 <= 0xff
    };
    if blocks.len() > 3 || !fits(*o1, *r1) || !fits(*o2, *r2) {
        return 0;
    }
    let field = |v: usize| v as u64;
    (1 << 63) | field(o1 / 16) | field(r1 / 8) << 16 | field(o2 / 16) << 24 | field(r2 / 8) << 40
}

/// Packs modules sharing one input into one delta: `A` stacked, `B` block-diagonal. `None` when
/// no module of the group is adapted.
pub(super) fn pack(
    group: &[(Module, usize, Option<&ModuleWeights>)],
    dtype: DType,
    device: &Device,
) -> Result<Option<Delta>, AdapterError> {
    let ranks: Vec<usize> = group
        .iter()
        .map(|(_, _, w)| w.map_or(0, |w| w.a.dim(0).unwrap_or(0)))
        .collect();
    // The total is padded with zero rows/columns to a multiple of 8 (the CUDA BGMV kernels load
    // 8 values at a time), on CUDA of 16 (the tensor-core path takes 16-rank fragments); zeros
    // add nothing. (The CPU keeps 8: at 16, tests/lora.rs saw a batched request's logprobs move
    // by more than 1e-5 from the same request alone.)
    let used: usize = ranks.iter().sum();
    if used == 0 {
        return Ok(None);
    }
    let total = used.next_multiple_of(if device.is_cuda() { 16 } else { 8 });
    let mut a_parts = Vec::new();
    let mut b_rows = Vec::new();
    let mut before = 0;
    let mut blocks = Vec::with_capacity(group.len());
    let mut columns = 0;
    for ((_, out, w), r) in group.iter().zip(&ranks) {
        columns += out;
        blocks.push((columns, before + r));
        match w {
            Some(w) => {
                a_parts.push(w.a.clone());
                let mut row = Vec::new();
                if before > 0 {
                    row.push(Tensor::zeros((*out, before), DType::F32, &Device::Cpu)?);
                }
                row.push((&w.b * w.scale)?);
                if total - before - r > 0 {
                    row.push(Tensor::zeros(
                        (*out, total - before - r),
                        DType::F32,
                        &Device::Cpu,
                    )?);
                }
                b_rows.push(Tensor::cat(&row, 1)?);
            }
            None => b_rows.push(Tensor::zeros((*out, total), DType::F32, &Device::Cpu)?),
        }
        before += r;
    }
    if total > used {
        let inp = a_parts[0].dim(1)?;
        a_parts.push(Tensor::zeros(
            (total - used, inp),
            DType::F32,
            &Device::Cpu,
        )?);
    }
    let place = |t: Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(dtype)?.to_device(device)?.contiguous()
    };
    Ok(Some(Delta {
        a: place(Tensor::cat(&a_parts, 0)?)?,
        b: place(Tensor::cat(&b_rows, 0)?)?,
        blocks,
    }))
}

#[cfg(test)]
mod segment_tests {
    use super::*;
    use crate::engine::adapters::ModuleWeights;

    /// lora.cu's `seg_ranks`: the ranks `[lo, hi)` output column `o` takes, of `r`.
    fn ranks_of(word: u64, r: usize, o: usize) -> (usize, usize) {
        if word >> 63 == 0 {
            return (0, r);
        }
        let field = |shift: u32, mask: u64| ((word >> shift) & mask) as usize;
        let (o1, r1) = (16 * field(0, 0xffff), 8 * field(16, 0xff));
        let (o2, r2) = (16 * field(24, 0xffff), 8 * field(40, 0xff));
        match o {
            o if o < o1 => (0, r1),
            o if o < o2 => (r1, r2),
            _ => (r2, r),
        }
    }

    /// A packed q|k|v delta (k not adapted) names, for every output column, exactly the ranks
    /// where its row of `B` is non-zero; boundaries the kernel cannot use give 0 (all ranks).
    #[test]
    fn packed_groups_name_each_modules_ranks() {
        let weights = |out: usize, r: usize| ModuleWeights {
            a: Tensor::ones((r, 64), DType::F32, &Device::Cpu).unwrap(),
            b: Tensor::ones((out, r), DType::F32, &Device::Cpu).unwrap(),
            scale: 1.0,
        };
        let (q, v) = (weights(4096, 64), weights(1024, 32));
        let group = [
            (Module::Q, 4096, Some(&q)),
            (Module::K, 1024, None),
            (Module::V, 1024, Some(&v)),
        ];
        let d = pack(&group, DType::F32, &Device::Cpu).unwrap().unwrap();
        let word = segment_word(&d.blocks);
        assert_ne!(word, 0);
        let r = d.a.dim(0).unwrap();
        let b = d.b.to_vec2::<f32>().unwrap();
        for o in [0, 4095, 4096, 5119, 5120, 6143] {
            let (lo, hi) = ranks_of(word, r, o);
            for (k, value) in b[o].iter().enumerate() {
                assert_eq!(*value != 0.0, (lo..hi).contains(&k), "column {o}, rank {k}");
            }
        }
        assert_eq!(segment_word(&[(4100, 64), (5120, 96)]), 0);
        assert_eq!(segment_word(&[(4096, 12), (5120, 24)]), 0);
        assert_eq!(segment_word(&[(4096, 64)]), 0);
    }
}
