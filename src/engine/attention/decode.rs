//! The decode attention kernels (decode.cu, decode_mma.cuh): one query token per sequence
//! against its paged KV history, grouped-query aware (a thread block per kv head serves its
//! whole group of query heads, so each cached key and value is read once per group), with the
//! semantics of [`crate::engine::attention::attend`] (sliding windows, score soft-capping);
//! checked against it by `pruneserve selftest --device cuda` (`selftest/decode.rs`, and every
//! model check).
//! - `paged_decode_mma` (bf16 or fp8 caches; head size 64 or 128, or 256 with groups up to 4;
//!   the default): every warp keeps its own online softmax over its blocks, both products on
//!   tensor cores (a block's 16 keys against the group's queries as one 16-row tile);
//!   partitions of 128 to 512 tokens by how many (sequence, kv head) pairs the step has, up to
//!   1,024 for few pairs over long contexts (`partition.rs`; `PRUNESERVE_DECODE_PART`
//!   forces one).
//! - `paged_decode_split` (the same shapes and partitions, `PRUNESERVE_DECODE_KERNEL=scalar`):
//!   the same walk with scalar FMAs, which bound it at about 13 instructions per cached value.
//! - `paged_decode` (any other shape, f32 caches, or `PRUNESERVE_DECODE_KERNEL=shared`):
//!   partitions of 128 tokens, one shared-memory softmax per partition.
//!
//! All read fp8 E4M3 caches too (`--kv-cache-dtype fp8`: bf16 queries and outputs, the `_fp8`
//! instantiations).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::engine::attention::cuda::{cuda_view, storage_view};
use crate::engine::attention::partition::split_partition;
use crate::engine::attention::AttnParams;

const DECODE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
/// Tokens per partition of `paged_decode` (PART in decode.cu).
const PARTITION: usize = 128;
const MAX_GROUP: usize = 8;
const MAX_HEAD_DIM: usize = 256;
const THREADS: u32 = 128;

/// Which decode kernel a step asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// `paged_decode_mma` (tensor cores, the split kernel's partitions) where it applies (head
    /// size 64 or 128, or 256 with groups of up to 4); else `paged_decode`.
    Split,
    /// `paged_decode_mma` loading each block's fragments straight from the cache to registers
    /// (the kernel of session 18) instead of staging blocks in shared memory, for A/B runs and
    /// the selftest.
    SplitDirect,
    /// `paged_decode_split` instead (scalar FMAs: the kernel before session 17, for A/B runs
    /// and the selftest).
    SplitScalar,
    /// `paged_decode` always.
    Shared,
}

/// Every kernel choice with its name in `PRUNESERVE_DECODE_KERNEL` and the selftest.
pub const DECODE_KERNELS: [(&str, DecodeKernel); 4] = [
    ("mma", DecodeKernel::Split),
    ("mma-direct", DecodeKernel::SplitDirect),
    ("scalar", DecodeKernel::SplitScalar),
    ("shared", DecodeKernel::Shared),
];

impl DecodeKernel {
    /// [`DecodeKernel::Split`], unless `PRUNESERVE_DECODE_KERNEL` names another of
    /// [`DECODE_KERNELS`] (A/B runs).
    pub fn configured() -> Self {
        static KERNEL: std::sync::LazyLock<DecodeKernel> = std::sync::LazyLock::new(|| {
            let asked = std::env::var("PRUNESERVE_DECODE_KERNEL").unwrap_or_default();
            DECODE_KERNELS
                .iter()
                .find(|(name, _)| *name == asked)
                .map_or(DecodeKernel::Split, |(_, k)| *k)
        });
        *KERNEL
    }

    /// The function to launch, its partition's tokens, and whether it is one of the split walk's
    /// kernels (`paged_decode_split`, `paged_decode_mma`), for a step of `pairs` (sequence, kv
    /// head) pairs over up to `max_context` tokens on a device of `sms` multiprocessors.
    fn function(
        self,
        suffix: &str,
        (group, hd): (usize, usize),
        (pairs, max_context): (usize, usize),
        sms: usize,
    ) -> (String, usize, bool) {
        let g = if group <= 4 { 4 } else { 8 };
        let split_shape = hd == 64 || hd == 128 || (hd == 256 && g == 4);
        let split_name = match (suffix, self) {
            (_, DecodeKernel::Shared) => None,
            ("bf16", DecodeKernel::SplitScalar) => Some("paged_decode_split"),
            ("bf16", DecodeKernel::SplitDirect) => Some("paged_decode_mma_direct"),
            ("bf16", _) => Some("paged_decode_mma"),
            ("bf16_fp8", DecodeKernel::Split) => Some("paged_decode_mma_fp8"),
            ("bf16_fp8", DecodeKernel::SplitDirect) => Some("paged_decode_mma_fp8_direct"),
            ("bf16_fp8", _) => Some("paged_decode_split_fp8"),
            _ => None,
        };
        if let (Some(split), true) = (split_name, split_shape) {
            // `split_partition`'s length, or PRUNESERVE_DECODE_PART's (a multiple of 16; other
            // values are ignored) for A/B measurements.
            static PART: std::sync::LazyLock<Option<usize>> = std::sync::LazyLock::new(|| {
                std::env::var("PRUNESERVE_DECODE_PART")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|p: &usize| *p >= 16 && p.is_multiple_of(16))
            });
            let part = PART.unwrap_or_else(|| split_partition(pairs, max_context, sms));
            return (format!("{split}_g{g}_d{hd}"), part, true);
        }
        let d = match hd {
            0..=64 => 64,
            65..=128 => 128,
            _ => 256,
        };
        (format!("paged_decode_{suffix}_g{g}_d{d}"), PARTITION, false)
    }
}

/// The device's multiprocessor count, read once per process (one GPU model per server).
fn multiprocessors(dev: &CudaDevice) -> Result<usize> {
    static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(n) = SMS.get() {
        return Ok(*n);
    }
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let attr = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    let n = dev.cuda_stream().context().attribute(attr).w()?.max(1) as usize;
    Ok(*SMS.get_or_init(|| n))
}

struct PagedDecode {
    key_cache: Tensor,
    value_cache: Tensor,
    /// `[seqs, max_blocks]` u32.
    tables: Tensor,
    /// `[seqs]` u32.
    context_lens: Tensor,
    max_context: usize,
    params: AttnParams,
    kernel: DecodeKernel,
}

/// Attention of the decode queries `q` (`[seqs, heads, head_dim]`, the caches' dtype, or bf16
/// with fp8 caches) against their cached histories; `[seqs, heads, head_dim]` in `q`'s dtype.
/// `kernel`:
/// [`DecodeKernel::configured`] on the engine's path.
pub fn paged_decode(
    q: &Tensor,
    (key_cache, value_cache): (&Tensor, &Tensor),
    (tables, context_lens): (&Tensor, &Tensor),
    max_context: usize,
    params: &AttnParams,
    kernel: DecodeKernel,
) -> Result<Tensor> {
    let group = params.num_heads / params.num_kv_heads;
    if group > MAX_GROUP || params.head_dim > MAX_HEAD_DIM || !params.head_dim.is_multiple_of(8) {
        candle_core::bail!(
            "paged decode supports up to {MAX_GROUP} query heads per kv head and head_dim up to \
             {MAX_HEAD_DIM} (a multiple of 8), got {group} and {}",
            params.head_dim
        );
    }
    q.apply_op1_no_bwd(&PagedDecode {
        key_cache: key_cache.clone(),
        value_cache: value_cache.clone(),
        tables: tables.contiguous()?,
        context_lens: context_lens.clone(),
        max_context,
        params: *params,
        kernel,
    })
}

impl PagedDecode {
    /// Launches the kernels for queries of `T` over caches of `C`; `suffix` names the
    /// instantiation, `out_suffix` the combine kernel's (by `T`).
    fn run<T, C>(
        &self,
        dev: &CudaDevice,
        (q, ql): (&CudaStorage, &Layout),
        (suffix, out_suffix): (&str, &str),
    ) -> Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        C: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let (seqs, heads, hd) = ql.shape().dims3()?;
        let q = storage_view::<T>(q, ql, "queries")?;
        let (kc, kl) = self.key_cache.storage_and_layout();
        let (vc, vl) = self.value_cache.storage_and_layout();
        let (tb, tl) = self.tables.storage_and_layout();
        let (cl, cll) = self.context_lens.storage_and_layout();
        let kc = cuda_view::<C>(&kc, kl, "key cache")?;
        let vc = cuda_view::<C>(&vc, vl, "value cache")?;
        let tables = cuda_view::<u32>(&tb, tl, "block tables")?;
        let ctx = cuda_view::<u32>(&cl, cll, "context lengths")?;
        let max_blocks = tl.shape().dims2()?.1;
        let p = &self.params;
        let sms = multiprocessors(dev)?;
        let (name, part, split) = self.kernel.function(
            suffix,
            (heads / p.num_kv_heads, hd),
            (seqs * p.num_kv_heads, self.max_context),
            sms,
        );
        let parts = self.max_context.div_ceil(part).max(1);
        // SAFETY: the kernels write every output element before it is read (the partial
        // buffers only when there are several partitions).
        let out = unsafe { dev.alloc::<T>(seqs * heads * hd)? };
        let partial = if parts > 1 { parts * seqs * heads } else { 1 };
        let (part_out, part_max, part_sum) = unsafe {
            (
                dev.alloc::<f32>(partial * hd)?,
                dev.alloc::<f32>(partial)?,
                dev.alloc::<f32>(partial)?,
            )
        };
        let func = dev.get_or_load_custom_func(&name, "pruneserve_decode", DECODE_PTX)?;
        // `paged_decode_split` and `paged_decode_mma` take no head size (their instantiation's)
        // and end with `part`.
        let (heads_i, kv_i, hd_i) = (heads as i32, p.num_kv_heads as i32, hd as i32);
        let (max_blocks, window) = (max_blocks as i32, p.window.unwrap_or(0) as i32);
        let (scale, softcap, part_i) =
            (p.scale as f32, p.softcap.unwrap_or(0.0) as f32, part as i32);
        let mut b = func.builder();
        b.arg(&q).arg(&kc).arg(&vc).arg(&tables).arg(&ctx);
        b.arg(&out).arg(&part_out).arg(&part_max).arg(&part_sum);
        b.arg(&heads_i).arg(&kv_i);
        if !split {
            b.arg(&hd_i);
        }
        b.arg(&max_blocks).arg(&window).arg(&scale).arg(&softcap);
        if split {
            b.arg(&part_i);
        }
        let cfg = LaunchConfig {
            grid_dim: (p.num_kv_heads as u32, seqs as u32, parts as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `paged_decode_*` in attention.cu; every index the kernel
        // reads is below the context lengths and block-table sizes uploaded for this step.
        unsafe { b.launch(cfg) }.w()?;
        if parts > 1 {
            let func = dev.get_or_load_custom_func(
                &format!("paged_decode_combine_{out_suffix}"),
                "pruneserve_decode",
                DECODE_PTX,
            )?;
            let mut b = func.builder();
            let (h, d, n) = (heads as i32, hd as i32, parts as i32);
            b.arg(&part_out).arg(&part_max).arg(&part_sum).arg(&out);
            b.arg(&h).arg(&d).arg(&n);
            let cfg = LaunchConfig {
                grid_dim: (heads as u32, seqs as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match `paged_decode_combine_*` in attention.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for PagedDecode {
    fn name(&self) -> &'static str {
        "paged-decode"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let out = match (q.dtype(), self.key_cache.dtype()) {
            (DType::BF16, DType::BF16) => {
                self.run::<half::bf16, half::bf16>(&dev, (q, ql), ("bf16", "bf16"))?
            }
            (DType::BF16, DType::F8E4M3) => {
                self.run::<half::bf16, float8::F8E4M3>(&dev, (q, ql), ("bf16_fp8", "bf16"))?
            }
            (DType::F32, DType::F32) => self.run::<f32, f32>(&dev, (q, ql), ("f32", "f32"))?,
            (q, c) => candle_core::bail!("paged decode: unsupported dtypes {q:?} over {c:?}"),
        };
        Ok((out, ql.shape().clone()))
    }
}
