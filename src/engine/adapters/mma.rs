//! The tensor-core path of [`super::cuda::LoraTable::add`] for bf16 rows (decode steps):
//! `lora.cu`'s `lora_shrink_mma*` and `lora_expand_mma` over the table's tiles (rows sorted by
//! slot, at most [`TILE`] of one slot each). Shrink gives each block 16 rows and 16 ranks over a
//! part of `in`, the parts of one (rows, ranks) a thread-block cluster on sm_90 whose first block
//! adds them in order; expand adds `h · Bᵀ` into the projection's f32 output with h as bf16 hi +
//! lo halves (about f32's precision), over only the ranks a packed module's columns hold. A row
//! gets the same numbers whatever the other rows of its step. The candle path in `mod.rs`
//! defines what they compute; `selftest` checks them against it on the CPU.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};

use crate::engine::attention::cuda::{cuda_view, storage_view};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
/// Rows per tile (`TILE` in lora.cu).
pub const TILE: usize = 64;
/// Threads per shrink block (`SHRINK_WARPS` in lora.cu); output columns and threads per expand
/// block (`EXPAND_WARPS`).
const SHRINK_THREADS: usize = 256;
const EXPAND_COLS: usize = 128;
const EXPAND_THREADS: usize = 256;
/// 16-row slices per tile (`SLICES`).
const SLICES: usize = TILE / 16;
/// Inputs wider than this split across 8 blocks of a cluster, others across 4 (measured on the
/// H200 at 8B shapes, docs/benchmarks.md session 14).
const WIDE_IN: usize = 8192;

/// Whether the tensor-core path serves input rows `x` and an output of `out` columns: bf16 rows
/// (any number: replayed in graphs on the H200 at 8B shapes, rank 64 on all seven projections,
/// one layer's kernels took 33.7 µs at one row against 35.9 for the BGMV kernels, and 34.1
/// against 85.1 at eight; docs/benchmarks.md session 14), widths multiples of 16 (a fragment).
pub fn takes(x: &Tensor, out: usize) -> Result<bool> {
    let (_, inp) = x.dims2()?;
    Ok(x.dtype() == DType::BF16 && inp.is_multiple_of(16) && out.is_multiple_of(16))
}

/// Where one projection group's launches find their rows and slots: `entries` is the word offset
/// of the group's slot entries in the table, `tiles` the offset of its tiles and their capacity,
/// `rmax` the ranks the launches cover (a multiple of 16, at least every slot's R), `scratch`
/// (f32, at least rows * rmax) the shrunk rows, written by shrink and read by expand.
#[derive(Clone)]
pub struct Launch {
    pub rows: usize,
    pub entries: usize,
    pub tiles: (usize, usize),
    pub rmax: usize,
    pub meta: Tensor,
    pub scratch: Tensor,
}

/// `scratch = x · Aᵀ` for each row's slot (an in-place op on `x` that only reads it), on `stream`
/// when given (the side stream, see [`side_stream`]) and on candle's stream otherwise.
pub struct Shrink {
    pub at: Launch,
    pub stream: Option<Arc<CudaStream>>,
}

/// `y += scratch · Bᵀ` for each row's slot, on candle's stream.
pub struct Expand(pub Launch);

/// The stream that runs shrinks beside the base projection of the same rows: one per candle
/// stream, made once. The launcher joins it to candle's stream before a shrink (so it sees its
/// input) and candle's stream to it before the expand.
pub fn side_stream(main: &Arc<CudaStream>) -> Result<Arc<CudaStream>> {
    /// Side streams by their candle stream's handle.
    type Streams = Vec<(usize, Arc<CudaStream>)>;
    static SIDE: OnceLock<Mutex<Streams>> = OnceLock::new();
    let key = main.cu_stream() as usize;
    let mut streams = SIDE
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("the LoRA side streams' lock is poisoned".into()))?;
    if let Some((_, s)) = streams.iter().find(|(k, _)| *k == key) {
        return Ok(s.clone());
    }
    let side = main.context().new_stream().w()?;
    streams.push((key, side.clone()));
    Ok(side)
}

impl Launch {
    /// The scratch's view, checked to hold `rows` rows at `rmax`.
    fn scratch_view<'a>(
        &self,
        storage: &'a candle_core::Storage,
        layout: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        let h = cuda_view::<f32>(storage, layout, "LoRA scratch")?;
        if h.len() < self.rows * self.rmax {
            candle_core::bail!(
                "lora-mma: a scratch of {} floats for {} rows at rank {}",
                h.len(),
                self.rows,
                self.rmax
            );
        }
        Ok(h)
    }

    fn words(&self) -> (i32, i32, i32, i32) {
        let (tiles_at, max_tiles) = self.tiles;
        (
            self.entries as i32,
            tiles_at as i32,
            max_tiles as i32,
            self.rmax as i32,
        )
    }
}

impl InplaceOp1 for Shrink {
    fn name(&self) -> &'static str {
        "lora-mma-shrink"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(inplace 1);

    fn cuda_fwd(&self, xs: &mut CudaStorage, xl: &Layout) -> Result<()> {
        let at = &self.at;
        let (t, inp) = xl.shape().dims2()?;
        if t != at.rows
            || xl.start_offset() != 0
            || !xl.is_contiguous()
            || !at.rmax.is_multiple_of(16)
        {
            candle_core::bail!(
                "lora-mma-shrink: [{t}, {inp}] rows at rank {} (want {} rows, contiguous, rank a multiple of 16)",
                at.rmax,
                at.rows
            );
        }
        let dev = xs.device().clone();
        let x = storage_view::<half::bf16>(xs, xl, "LoRA input")?;
        let (ms, ml) = at.meta.storage_and_layout();
        let meta = cuda_view::<i64>(&ms, ml, "LoRA table")?;
        let (ss, sl) = at.scratch.storage_and_layout();
        let h = at.scratch_view(&ss, sl)?;
        let (entries, tiles_at, max_tiles, rmax) = at.words();
        let inp_i = inp as i32;
        let (name, split) = if inp > WIDE_IN {
            ("lora_shrink_mma8", 8)
        } else {
            ("lora_shrink_mma4", 4)
        };
        let func = dev
            .get_or_load_custom_func(name, "pruneserve_lora", PTX)?
            .into_cuda_function();
        let main = dev.cuda_stream();
        let stream = self.stream.as_ref().unwrap_or(&main);
        let mut b = stream.launch_builder(&func);
        b.arg(&x)
            .arg(&meta)
            .arg(&entries)
            .arg(&tiles_at)
            .arg(&max_tiles);
        b.arg(&inp_i).arg(&rmax).arg(&h);
        let cfg = LaunchConfig {
            grid_dim: ((at.tiles.1 * SLICES) as u32, (at.rmax / 16) as u32, split),
            block_dim: (SHRINK_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `lora_shrink_mma4`/`8` (a cluster of `split` blocks along
        // z, the grid's z); x is [t, inp] bf16 with inp a multiple of 16; the table's tiles hold
        // sorted rows below t, its entries point into adapter tensors the step holds, each
        // [R, inp] with R <= rmax; h (checked) holds t * rmax floats and is the table's own
        // scratch, which only this group's shrink and expand touch until the next group's
        // shrink, ordered after this expand (on the side stream, by the launcher's joins).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp2 for Expand {
    fn name(&self) -> &'static str {
        "lora-mma-expand"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(inplace 2);

    fn cuda_fwd(
        &self,
        ys: &mut CudaStorage,
        yl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
    ) -> Result<()> {
        let at = &self.0;
        let (t, out) = yl.shape().dims2()?;
        if t != at.rows || yl.start_offset() != 0 || !yl.is_contiguous() || !out.is_multiple_of(16)
        {
            candle_core::bail!(
                "lora-mma-expand: the output must be [{}, n] with n a multiple of 16, contiguous",
                at.rows
            );
        }
        let dev = ys.device().clone();
        let meta = storage_view::<i64>(ms, ml, "LoRA table")?;
        let (ss, sl) = at.scratch.storage_and_layout();
        let h = at.scratch_view(&ss, sl)?;
        let y = ys.as_cuda_slice_mut::<f32>()?;
        let (entries, tiles_at, max_tiles, rmax) = at.words();
        let out_i = out as i32;
        let func = dev.get_or_load_custom_func("lora_expand_mma", "pruneserve_lora", PTX)?;
        let mut b = func.builder();
        b.arg(&h)
            .arg(&meta)
            .arg(&entries)
            .arg(&tiles_at)
            .arg(&max_tiles);
        b.arg(&out_i).arg(&rmax).arg(y);
        let cfg = LaunchConfig {
            grid_dim: (at.tiles.1 as u32, out.div_ceil(EXPAND_COLS) as u32, 1),
            block_dim: (EXPAND_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `lora_expand_mma`; y is [t, out] f32, out a multiple of
        // 16, and each of its elements is updated by one thread; B is [out, R] with R <= rmax,
        // and the entry's segments name column and rank boundaries inside it; h holds what this
        // group's shrink wrote (the launcher joined its stream first).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
