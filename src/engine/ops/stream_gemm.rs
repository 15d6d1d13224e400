//! Weight-streaming projections for steps of up to [`MAX_ROWS`] rows on CUDA (`stream_gemm.cu`):
//! `y[t, n] = x[t, k] · w[n, k]ᵀ (+ y)` with bf16 `x` and `w`, f32 products, sums and `y`, the
//! product [`super::gemm`]'s CPU path defines. Decode steps of a few dozen rows are bound by
//! reading the weights once; cuBLAS leaves most of the GPU idle on narrow outputs there (the 8B
//! shape's o projection: 32 column tiles for 132 multiprocessors), while this kernel splits the
//! (column tile, k slice) items evenly over as many blocks as fit on the GPU (stream-K), so every
//! multiprocessor streams weights for the whole launch.
//!
//! Contract:
//! - [`try_launch`] runs the kernel and returns `true`, or returns `false` without launching
//!   when it does not apply (more than [`MAX_ROWS`] rows, `beta` other than 0 or 1, `k` not a
//!   multiple of 8 or rows not 16-byte aligned, a shape past the kernel's 32-bit item arithmetic,
//!   or turned off): the caller then runs cuBLAS.
//! - Results are deterministic: tiles split between blocks are summed in block order by the
//!   last block to finish, whatever the timing. They differ from cuBLAS's in summation order.
//! - Each launch takes a workspace (two partial tiles per block) and zeroed tile counters from
//!   candle's stream; nothing is read from the host during the launch (graph capture is safe).
//! - On by default; `PRUNESERVE_STREAM_GEMM=0` turns it off (cuBLAS for every row count, the
//!   A/B switch), and [`set_enabled`] does the same at run time for the selftest's timings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

/// The most rows a launch takes; more go to cuBLAS.
pub(crate) const MAX_ROWS: usize = 64;
/// Output columns of a tile, k of a slice and threads of a block (as in stream_gemm.cu).
const TILE_N: usize = 64;
const TILE_K: usize = 128;
const THREADS: u32 = 256;

static ENABLED: LazyLock<AtomicBool> = LazyLock::new(|| {
    AtomicBool::new(std::env::var("PRUNESERVE_STREAM_GEMM").map_or(true, |v| v != "0"))
});

/// Turns the kernel on or off for every later projection of this process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether projections of up to [`MAX_ROWS`] rows take the kernel.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The kernel's row tile (n8 tiles of 8 rows) and pipeline stages for `t` rows: about 100 KB of
/// shared memory a block, so two blocks share a multiprocessor.
fn variant(t: usize) -> (usize, usize) {
    match t {
        0..=8 => (1, 5),
        9..=16 => (2, 5),
        17..=32 => (4, 4),
        _ => (8, 3),
    }
}

/// Shared memory of a block of `nb` n8 tiles and `stages` stages: per stage a 64 x 128 weight
/// tile and `8 nb` rows of 128 x values, bf16; then the second k half's f32 sums of a tile.
fn smem_bytes(nb: usize, stages: usize) -> usize {
    stages * (TILE_N * TILE_K * 2 + 8 * nb * TILE_K * 2) + TILE_N * 8 * nb * 4
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::try_launch;

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUdevice_attribute, CUfunction_attribute_enum,
    };
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::Result;

    use super::{enabled, smem_bytes, variant, MAX_ROWS, THREADS, TILE_K, TILE_N};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/stream_gemm.ptx"));

    /// Blocks resident on the whole GPU at once, by (device ordinal, n8 tiles).
    static RESIDENT: LazyLock<Mutex<HashMap<(usize, usize), usize>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    /// `y = x · wᵀ + beta · y` by `stream_gemm_{nb}` when it applies (see the module's contract);
    /// `false` when it does not and nothing was launched.
    pub(crate) fn try_launch(
        dev: &CudaDevice,
        (xp, wp, yp): (u64, u64, u64),
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<bool> {
        let aligned = xp % 16 == 0 && wp % 16 == 0 && k.is_multiple_of(8);
        if !enabled() || t == 0 || t > MAX_ROWS || n == 0 || k == 0 || !aligned {
            return Ok(false);
        }
        if beta != 0.0 && beta != 1.0 {
            return Ok(false);
        }
        let (nb, stages) = variant(t);
        let smem = smem_bytes(nb, stages);
        let func = dev.get_or_load_custom_func(
            &format!("stream_gemm_{nb}"),
            "pruneserve_stream_gemm",
            PTX,
        )?;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let tiles = n.div_ceil(TILE_N);
        let total = tiles * k.div_ceil(TILE_K);
        let resident = {
            let key = (dev.cuda_stream().context().ordinal(), nb);
            let mut known = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
            match known.get(&key) {
                Some(&r) => r,
                None => {
                    let per_sm = func
                        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
                        .w()? as usize;
                    let sms = dev
                        .cuda_stream()
                        .context()
                        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                        .w()? as usize;
                    let r = (per_sm * sms).max(1);
                    known.insert(key, r);
                    r
                }
            }
        };
        // Every block needs at least one item (a tile's counter waits for each of its blocks),
        // and the kernel's item arithmetic is 32-bit.
        let blocks = resident.min(total);
        if blocks.saturating_mul(total) >= i32::MAX as usize {
            return Ok(false);
        }
        // SAFETY: a block writes its slots before any block reads them (the tile counters).
        let partial = unsafe { dev.alloc::<f32>(2 * blocks * 8 * nb * TILE_N)? };
        let counters = dev.alloc_zeros::<u32>(tiles)?;
        let (t32, n32, k32, accumulate) = (t as i32, n as i32, k as i32, i32::from(beta != 0.0));
        let mut b = func.builder();
        b.arg(&xp)
            .arg(&wp)
            .arg(&yp)
            .arg(&partial)
            .arg(&counters)
            .arg(&t32)
            .arg(&n32)
            .arg(&k32)
            .arg(&accumulate);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match `stream_gemm_*` in stream_gemm.cu; x holds t rows of k, w n
        // rows of k and y t rows of n (the caller's views), rows 16-byte aligned (checked above);
        // `partial` holds two tiles of 8 nb x 64 f32 per block and `counters` one zeroed word
        // per column tile; all on candle's stream.
        unsafe { b.launch(cfg) }.w()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_cover_every_row_count_within_two_blocks_a_multiprocessor() {
        for t in 1..=MAX_ROWS {
            let (nb, stages) = variant(t);
            assert!(8 * nb >= t, "{t} rows in {nb} n8 tiles");
            assert!(nb == 1 || 8 * nb / 2 < t, "{t} rows take the smallest tile");
            // Two blocks fit in an H100/H200 multiprocessor's 227 KB.
            assert!(2 * smem_bytes(nb, stages) <= 227 * 1024, "{t} rows");
            assert!(stages >= 3);
        }
    }
}
