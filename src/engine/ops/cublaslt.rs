//! Decode-sized projections through cuBLASLt (CUDA only): `y[t, n] = x[t, k] · w[n, k]ᵀ (+ y)`
//! with bf16 `x` and `w`, f32 compute and `y`, the product [`super::gemm`]'s CPU path defines.
//! cuBLAS's `GemmEx` picks the same kernel as cuBLASLt's heuristic for most decode shapes but not
//! all: on the 8B shape's gate|up projection at 256 rows it takes 102 µs where cuBLASLt's first
//! choice takes 93.5 (`bench/cublaslt_probe.cu`, docs/benchmarks.md session 20), and a decode step
//! of 256 rows runs 32 of them.
//!
//! Contract:
//! - [`try_matmul`] runs the product and returns `true`, or returns `false` without launching
//!   when it does not apply (more than [`MAX_ROWS`] rows, turned off, a stream being captured that
//!   has no cuBLASLt state yet, or no algorithm for the shape): the caller then runs `GemmEx`.
//! - The algorithm is cuBLASLt's heuristic first choice for the shape, the operands' alignments
//!   and a 32 MiB workspace, never a timed search, so a given GPU and library always compute the
//!   same sums (runs and restarts agree bit for bit).
//! - One handle and one workspace per CUDA stream, created outside any capture (the first
//!   projection on a stream runs eagerly: the engine's warm-up); descriptors and algorithms are
//!   cached per (rows, n, k, accumulate, alignments). Products on one stream are ordered, so they
//!   share the workspace; captured graphs keep pointing at it, and it lives as long as the process.
//! - On by default; `PRUNESERVE_GEMM=cublas` sends every projection to `GemmEx` (the A/B switch),
//!   as [`set_enabled`] does at run time for the selftest's timings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

/// The most rows a product takes here; more (prompt steps) go to `GemmEx`.
pub const MAX_ROWS: usize = 512;

static ENABLED: LazyLock<AtomicBool> = LazyLock::new(|| {
    AtomicBool::new(std::env::var("PRUNESERVE_GEMM").map_or(true, |v| v != "cublas"))
});

/// Turns the cuBLASLt path on or off for every later projection of this process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether projections of up to [`MAX_ROWS`] rows take cuBLASLt.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The largest power of two up to 256 dividing `ptr` (cuBLASLt's alignment preferences).
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    1u32 << ptr.trailing_zeros().min(8)
}

#[cfg(feature = "cuda")]
pub(crate) use cuda::try_matmul;

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{LazyLock, Mutex};

    use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{Error, Result};

    use super::{alignment, enabled, MAX_ROWS};

    const WORKSPACE: usize = 32 << 20;

    /// (rows, n, k, accumulate, alignments of w, x, y).
    type Key = (usize, usize, usize, bool, [u32; 3]);

    /// A shape's descriptors and algorithm.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        w: sys::cublasLtMatrixLayout_t,
        x: sys::cublasLtMatrixLayout_t,
        y: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: created by `Plan::new` and destroyed only here.
            unsafe {
                let _ = result::destroy_matrix_layout(self.w);
                let _ = result::destroy_matrix_layout(self.x);
                let _ = result::destroy_matrix_layout(self.y);
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }

    /// A stream's handle, workspace and plans.
    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        /// `None`: cuBLASLt has no algorithm for the key (`GemmEx` runs it).
        plans: HashMap<Key, Option<Plan>>,
    }

    // SAFETY: the handle and descriptors are only used under the `STATE` mutex.
    unsafe impl Send for Lt {}

    /// By the stream's address.
    static STATE: LazyLock<Mutex<HashMap<usize, Lt>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    fn lt_err(e: result::CublasError) -> Error {
        Error::wrap(e)
    }

    impl Plan {
        /// The column-major view `GemmEx` takes too: `yᵀ [n, t] = op_T(w [k, n]) · xᵀ [k, t]`.
        fn new(handle: sys::cublasLtHandle_t, key: &Key) -> Result<Option<Self>> {
            let &(t, n, k, _, [aw, ax, ay]) = key;
            use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
            let desc = result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                CUDA_R_32F,
            )
            .map_err(lt_err)?;
            let layout = |ty, rows: usize, cols: usize| {
                result::create_matrix_layout(ty, rows as u64, cols as u64, rows as i64)
            };
            let plan = Plan {
                desc,
                w: layout(CUDA_R_16BF, k, n).map_err(lt_err)?,
                x: layout(CUDA_R_16BF, k, t).map_err(lt_err)?,
                y: layout(CUDA_R_32F, n, t).map_err(lt_err)?,
                // SAFETY: plain data, overwritten by the heuristic below before any use.
                algo: unsafe { std::mem::zeroed() },
            };
            let transpose = cublas_sys::cublasOperation_t::CUBLAS_OP_T;
            // SAFETY: a live descriptor; the attribute's value is a cublasOperation_t.
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&transpose) as *const _ as *const c_void,
                    std::mem::size_of::<cublas_sys::cublasOperation_t>(),
                )
                .map_err(lt_err)?;
            }
            let pref = result::create_matmul_pref().map_err(lt_err)?;
            let heuristic = (|| {
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                let workspace = WORKSPACE as u64;
                // SAFETY: a live preference; each value has the attribute's type (u64 / u32).
                unsafe {
                    result::set_matmul_pref_attribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        (&workspace) as *const _ as *const c_void,
                        8,
                    )?;
                    for (attr, align) in [
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aw),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ax),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ay),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ay),
                    ] {
                        result::set_matmul_pref_attribute(
                            pref,
                            attr,
                            (&align) as *const _ as *const c_void,
                            4,
                        )?;
                    }
                    result::get_matmul_algo_heuristic(
                        handle, plan.desc, plan.w, plan.x, plan.y, plan.y, pref,
                    )
                }
            })();
            // SAFETY: created above, not used after this.
            unsafe {
                let _ = result::destroy_matmul_pref(pref);
            }
            match heuristic {
                Ok(h) if h.workspaceSize <= WORKSPACE => {
                    let mut plan = plan;
                    plan.algo = h.algo;
                    Ok(Some(plan))
                }
                _ => Ok(None),
            }
        }
    }

    /// `y = x · wᵀ + beta · y` through cuBLASLt when it applies (see the module's contract);
    /// `false` when it does not and nothing was launched.
    pub(crate) fn try_matmul(
        dev: &CudaDevice,
        (xp, wp, yp): (u64, u64, u64),
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<bool> {
        if !enabled() || t == 0 || t > MAX_ROWS || n == 0 || k == 0 {
            return Ok(false);
        }
        let stream = dev.cuda_stream();
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        let id = stream.cu_stream() as usize;
        let lt = match state.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let capture = stream.capture_status().w()?;
                if capture != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                    return Ok(false);
                }
                let handle = result::create_handle().map_err(lt_err)?;
                // SAFETY: scratch for cuBLASLt only, never read by us.
                let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }.w()?;
                e.insert(Lt {
                    handle,
                    workspace,
                    plans: HashMap::new(),
                })
            }
        };
        let key: Key = (
            t,
            n,
            k,
            beta != 0.0,
            [alignment(wp), alignment(xp), alignment(yp)],
        );
        let plan = match lt.plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let key = *e.key();
                e.insert(Plan::new(lt.handle, &key)?)
            }
        };
        let Some(plan) = plan else {
            return Ok(false);
        };
        let (ws, _guard) = lt.workspace.device_ptr(&stream);
        let alpha = 1f32;
        // SAFETY: the plan's layouts describe the caller's x (t rows of k), w (n rows of k) and
        // y (t rows of n), valid on this stream; the workspace belongs to this stream.
        unsafe {
            result::matmul(
                lt.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                wp as *const c_void,
                plan.w,
                xp as *const c_void,
                plan.x,
                yp as *const c_void,
                plan.y,
                yp as *mut c_void,
                plan.y,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_err)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256_dividing_the_address() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0), 256);
    }
}
