//! The tensor-core path of [`super::cuda::LoraTable::add`] for bf16 rows (decode steps):
//! `lora.cu`'s `lora_shrink_mma` and `lora_expand_mma` over the table's tiles (rows sorted by
//! slot, at most [`TILE`] of one slot each). Shrink splits `in` across blocks and the last block
//! of each (tile, 16 ranks) adds the splits in order; expand adds `h · Bᵀ` into the projection's
//! f32 output with h as bf16 hi + lo halves: about f32's precision, and the same numbers for a
//! row whatever the other rows of its step. The candle path in `mod.rs` defines what they
//! compute; `selftest` checks them against it on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

use crate::engine::attention::cuda::storage_view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
/// Rows per tile (`TILE` in lora.cu).
pub const TILE: usize = 64;
/// `in` per shrink block (`SHRINK_PARTS` of `WARP_K` in lora.cu), columns per expand block, and
/// 16-row slices per tile.
const SHRINK_K: usize = 512;
const EXPAND_COLS: usize = 64;
const SLICES: usize = TILE / 16;

/// Steps of at most this many rows keep the BGMV kernels (`lora_shrink_bf16`, `lora_expand`):
/// at one row they decoded 203 tok/s on the 8B shape against 192 through this path
/// (docs/benchmarks.md, session 12).
const BGMV_ROWS: usize = 8;

/// Whether the tensor-core path serves input rows `x` and an output of `out` columns: bf16 rows,
/// more than [`BGMV_ROWS`] of them, widths multiples of 16 (a fragment).
pub fn takes(x: &Tensor, out: usize) -> Result<bool> {
    let (rows, inp) = x.dims2()?;
    Ok(x.dtype() == DType::BF16
        && rows > BGMV_ROWS
        && inp.is_multiple_of(16)
        && out.is_multiple_of(16))
}

/// `y += delta(x)` for one projection group: `entries` is the word offset of the group's slot
/// entries in the table, `tiles` the offset of its tiles and their capacity.
pub struct Mma {
    pub rows: usize,
    pub entries: usize,
    pub tiles: (usize, usize),
    /// Ranks the launches cover (a multiple of 16, at least every slot's R).
    pub rmax: usize,
}

impl InplaceOp3 for Mma {
    fn name(&self) -> &'static str {
        "lora-mma"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("lora-mma runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        ys: &mut CudaStorage,
        yl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
    ) -> Result<()> {
        let (t, out) = yl.shape().dims2()?;
        let (xt, inp) = xl.shape().dims2()?;
        let contiguous = yl.start_offset() == 0 && yl.is_contiguous() && xl.start_offset() == 0;
        if t != self.rows || xt != t || !contiguous || !self.rmax.is_multiple_of(16) {
            candle_core::bail!(
                "lora-mma: [{xt}, {inp}] -> [{t}, {out}] rows at rank {} (want {} rows, contiguous, rank a multiple of 16)",
                self.rmax,
                self.rows
            );
        }
        let dev = xs.device().clone();
        let x = storage_view::<half::bf16>(xs, xl, "LoRA input")?;
        let meta = storage_view::<i64>(ms, ml, "LoRA table")?;
        let y = ys.as_cuda_slice_mut::<f32>()?;
        let splits = inp.div_ceil(SHRINK_K);
        let rows_cap = t + 16;
        let (tiles_at, max_tiles) = self.tiles;
        let rank_blocks = self.rmax / 16;
        // SAFETY: shrink writes every (split, sorted row, rank) of the rows and ranks in use
        // before the last block of their tile reads them; nothing else reads `part`.
        let part = unsafe { dev.alloc::<f32>(splits * rows_cap * self.rmax)? };
        // SAFETY: shrink writes h for every tile row and rank below its slot's R, all that
        // expand reads.
        let h = unsafe { dev.alloc::<f32>(rows_cap * self.rmax)? };
        let counters = dev.alloc_zeros::<u64>(max_tiles * rank_blocks)?;
        let ints = |v: usize| v as i32;
        let (entries, tiles_at, max_tiles_i) =
            (ints(self.entries), ints(tiles_at), ints(max_tiles));
        let (inp_i, rmax_i, cap_i, out_i) = (ints(inp), ints(self.rmax), ints(rows_cap), ints(out));

        let func = dev.get_or_load_custom_func("lora_shrink_mma", "pruneserve_lora", PTX)?;
        let mut b = func.builder();
        b.arg(&x)
            .arg(&meta)
            .arg(&entries)
            .arg(&tiles_at)
            .arg(&max_tiles_i);
        b.arg(&inp_i)
            .arg(&rmax_i)
            .arg(&cap_i)
            .arg(&part)
            .arg(&counters)
            .arg(&h);
        let cfg = LaunchConfig {
            grid_dim: (max_tiles as u32, rank_blocks as u32, splits as u32),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `lora_shrink_mma`; x is [t, inp] bf16 with inp a multiple
        // of 16; the table's tiles hold sorted rows below t, its entries point into adapter
        // tensors this step holds, each [R, inp] with R <= rmax; part holds splits * rows_cap *
        // rmax floats, h rows_cap * rmax, counters one per (tile, rank block), zeroed.
        unsafe { b.launch(cfg) }.w()?;

        let func = dev.get_or_load_custom_func("lora_expand_mma", "pruneserve_lora", PTX)?;
        let mut b = func.builder();
        b.arg(&h)
            .arg(&meta)
            .arg(&entries)
            .arg(&tiles_at)
            .arg(&max_tiles_i);
        b.arg(&out_i).arg(&rmax_i).arg(y);
        let cfg = LaunchConfig {
            grid_dim: (
                max_tiles as u32,
                out.div_ceil(EXPAND_COLS) as u32,
                SLICES as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `lora_expand_mma`; y is [t, out] f32, out a multiple of
        // 16, and each of its elements is updated by one thread; B is [out, R] with R <= rmax.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
