//! The CUDA attention kernels of prompt steps and the decode path's rotary write (attention.cu),
//! with the semantics of [`crate::engine::attention::attend`] (sliding windows, score
//! soft-capping) and checked against it by `pruneserve selftest --device cuda` (the decode
//! kernels are in [`super::decode`]):
//! - [`rope_into_cache`]: a decode step's rotary embedding and paged-cache write in one launch;
//! - [`prefill_attention`]: every prompt chunk of a step in one launch, causal with an online
//!   softmax (no score matrix in memory): on tensor cores (`prefill_mma`, bf16 terms and f32
//!   accumulation; three terms per product for scored chunks, one for the others; fresh chunks
//!   and chunks continuing a gathered history), or f32 FMA throughout (`prefill_attention_f32`,
//!   fresh chunks; f32 caches).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use crate::engine::attention::AttnParams;
use crate::engine::ops::gemm::cuda::split_terms;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// Tokens per cache block the kernel is built for (BS).
pub const BLOCK_SIZE: usize = 16;
const THREADS: u32 = 128;
const MAX_HEAD_DIM: usize = 256;

/// The contiguous elements of CUDA storage as a view of `T`.
pub(crate) fn storage_view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("CUDA kernel: {what} must be contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// [`storage_view`] of a tensor's storage (as `storage_and_layout` gives it).
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        candle_core::bail!("CUDA kernel: {what} must be on the CUDA device");
    };
    storage_view(s, layout, what)
}

/// Every value of the contiguous f32 or bf16 storage rounded to fp8 E4M3 and widened back
/// (`round_fp8` in attention.cu): what an fp8 pool stores. The op and its CPU reference are
/// [`crate::engine::kv::fp8::KvCacheDtype::round`].
pub(crate) fn round_fp8(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    fn run<T>(s: &CudaStorage, l: &Layout, name: &str) -> Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let dev = s.device().clone();
        let input = storage_view::<T>(s, l, "values to round")?;
        let n = input.len();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n.max(1))? };
        let func = dev.get_or_load_custom_func(name, "pruneserve_attention", PTX)?;
        let mut b = func.builder();
        b.arg(&input).arg(&out).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 4096) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `round_fp8_*` in attention.cu; both buffers hold n
        // elements.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    match s.dtype() {
        DType::F32 => run::<f32>(s, l, "round_fp8_f32"),
        DType::BF16 => run::<half::bf16>(s, l, "round_fp8_bf16"),
        other => candle_core::bail!("round_fp8: unsupported dtype {other:?}"),
    }
}

struct RopeCache {
    cos: Tensor,
    sin: Tensor,
    /// `[T]` i64 (may start at an offset).
    slots: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    params: AttnParams,
}

/// The rotary embedding of a decode step's packed f32 q|k|v projection rows `qkv` with the keys
/// and values written straight into the paged caches at `slots` (`[T]` i64, < 0: not written),
/// in one launch (`rope_cache` in attention.cu); returns the queries `[T, heads, head_dim]` in the
/// caches' dtype (bf16 over fp8 caches). Stores the same values as
/// [`crate::engine::ops::fused::rope_heads`] followed by `reshape_and_cache`, which the CPU
/// engine's path and prompt steps take.
pub fn rope_into_cache(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    slots: &Tensor,
    (key_cache, value_cache): (&Tensor, &Tensor),
    params: &AttnParams,
) -> Result<Tensor> {
    qkv.apply_op1_no_bwd(&RopeCache {
        cos: cos.clone(),
        sin: sin.clone(),
        slots: slots.clone(),
        key_cache: key_cache.clone(),
        value_cache: value_cache.clone(),
        params: *params,
    })
}

impl RopeCache {
    /// Queries of `T`, caches of `C`; `suffix` names the kernel's instantiation.
    fn run<T, C>(&self, qkv: (&CudaStorage, &Layout), suffix: &str) -> Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
        C: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let dev = qkv.0.device().clone();
        let p = &self.params;
        let (rows, cols) = qkv.1.shape().dims2()?;
        if cols != (p.num_heads + 2 * p.num_kv_heads) * p.head_dim {
            candle_core::bail!("rope_cache: {cols} columns do not hold q|k|v heads");
        }
        let qkv = storage_view::<f32>(qkv.0, qkv.1, "q|k|v rows")?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (sls, sll) = self.slots.storage_and_layout();
        let (kc, kl) = self.key_cache.storage_and_layout();
        let (vc, vl) = self.value_cache.storage_and_layout();
        let cos = cuda_view::<f32>(&cs, cl, "cos")?;
        let sin = cuda_view::<f32>(&ss, sl, "sin")?;
        let slots = cuda_view::<i64>(&sls, sll, "slots")?;
        let kc = cuda_view::<C>(&kc, kl, "key cache")?;
        let vc = cuda_view::<C>(&vc, vl, "value cache")?;
        if slots.len() != rows || cos.len() != rows * p.head_dim / 2 {
            candle_core::bail!("rope_cache: slots or rotary rows do not match {rows} rows");
        }
        // SAFETY: the kernel writes every query element.
        let q = unsafe { dev.alloc::<T>(rows * p.num_heads * p.head_dim)? };
        let func = dev.get_or_load_custom_func(
            &format!("rope_cache_{suffix}"),
            "pruneserve_attention",
            PTX,
        )?;
        let (h, kvh, hd) = (p.num_heads as i32, p.num_kv_heads as i32, p.head_dim as i32);
        let mut b = func.builder();
        b.arg(&qkv)
            .arg(&cos)
            .arg(&sin)
            .arg(&slots)
            .arg(&kc)
            .arg(&vc)
            .arg(&q);
        b.arg(&h).arg(&kvh).arg(&hd);
        let pairs = (p.num_heads + 2 * p.num_kv_heads) * p.head_dim / 2;
        let cfg = LaunchConfig {
            grid_dim: (
                rows.max(1) as u32,
                pairs.div_ceil(THREADS as usize) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `rope_cache_*` in attention.cu. The caches are written
        // through shared views, as reshape_and_cache writes them: only at the step's own slots
        // (reserved for these rows, below the block count), ordered on candle's one stream
        // before any kernel reading them.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(q, dev))
    }
}

impl CustomOp1 for RopeCache {
    fn name(&self) -> &'static str {
        "rope-cache"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, qkv: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = &self.params;
        let shape = Shape::from((l.shape().dims2()?.0, p.num_heads, p.head_dim));
        let out = match self.key_cache.dtype() {
            DType::BF16 => self.run::<half::bf16, half::bf16>((qkv, l), "bf16")?,
            DType::F8E4M3 => self.run::<half::bf16, float8::F8E4M3>((qkv, l), "bf16_fp8")?,
            DType::F32 => self.run::<f32, f32>((qkv, l), "f32")?,
            other => candle_core::bail!("rope_cache: unsupported cache dtype {other:?}"),
        };
        Ok((out, shape))
    }
}

/// One prompt chunk for [`prefill_attention`]: its `len` query rows from `q_row0` in the step's
/// packed queries, at absolute positions `start..start + len`; its keys and values (positions
/// `0..start + len`) from row `k_row0` of `k`/`v`; its output from row `out0`. `exact` chunks
/// are computed at 16 significant bits (scored prompts), the others on bf16-rounded inputs.
#[derive(Debug, Clone, Copy)]
pub struct PrefillChunk {
    pub q_row0: usize,
    pub len: usize,
    pub k_row0: usize,
    pub start: usize,
    pub out0: usize,
    pub exact: bool,
}

/// Which prefill kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// f32 FMA throughout; fresh chunks only (`start` 0, keys at the queries' rows).
    Simt,
    /// Tensor cores (mma.sync, bf16 terms, f32 accumulation); fresh and continued chunks.
    Mma,
}

impl PrefillKernel {
    /// The tensor-core kernel, unless `PRUNESERVE_PREFILL_KERNEL=simt` asks for the f32 one
    /// (kept for A/B measurements; f32 caches always use it).
    pub fn for_bf16() -> Self {
        static KERNEL: std::sync::OnceLock<PrefillKernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(
            || match std::env::var("PRUNESERVE_PREFILL_KERNEL").as_deref() {
                Ok("simt") => Self::Simt,
                _ => Self::Mma,
            },
        )
    }
}

struct PrefillAttention {
    /// `[n, 6]` u32: q_row0, len, k_row0, start, out0, exact.
    chunks: Tensor,
    n_chunks: usize,
    max_len: usize,
    /// Whether any chunk is exact (three-term products: lo terms and their tiles), and whether
    /// any is not.
    any_exact: bool,
    any_one_term: bool,
    out_rows: usize,
    params: AttnParams,
    kernel: PrefillKernel,
}

/// Causal attention of each chunk's rows of the f32 queries `q` (`[T, heads, hd]`) to its keys
/// and values in `k`, `v` (`[*, kv_heads, hd]`, f32); `[out_rows, heads * hd]` f32, chunk by
/// chunk at their `out0` (rows no chunk covers are left unwritten).
pub fn prefill_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    chunks: &[PrefillChunk],
    out_rows: usize,
    params: &AttnParams,
    kernel: PrefillKernel,
) -> Result<Tensor> {
    if params.head_dim > MAX_HEAD_DIM || !params.head_dim.is_multiple_of(16) {
        candle_core::bail!(
            "prefill attention supports head_dim up to {MAX_HEAD_DIM} (a multiple of 16), got {}",
            params.head_dim
        );
    }
    if kernel == PrefillKernel::Simt && chunks.iter().any(|c| c.start > 0 || c.k_row0 != c.q_row0) {
        candle_core::bail!("the f32 prefill kernel takes fresh chunks only");
    }
    let flat: Vec<u32> = chunks
        .iter()
        .flat_map(|c| {
            [
                c.q_row0,
                c.len,
                c.k_row0,
                c.start,
                c.out0,
                usize::from(c.exact),
            ]
            .map(|x| x as u32)
        })
        .collect();
    let op = PrefillAttention {
        chunks: Tensor::from_vec(flat, (chunks.len(), 6), q.device())?,
        n_chunks: chunks.len(),
        max_len: chunks.iter().map(|c| c.len).max().unwrap_or(0),
        any_exact: chunks.iter().any(|c| c.exact),
        any_one_term: chunks.iter().any(|c| !c.exact),
        out_rows,
        params: *params,
        kernel,
    };
    // The tensor-core kernel reads queries four floats at a time: their start must be aligned.
    let q = if q.layout().start_offset() % 4 == 0 {
        q.contiguous()?
    } else {
        q.copy()?
    };
    q.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// Query rows per block of the tensor-core kernel (MMA_ROWS), and its instantiations: head
/// size bound D and key tile BC (prefill_mma_d{D} in attention.cu).
const MMA_ROWS: usize = 64;
const MMA_THREADS: u32 = 128;

fn mma_shape(hd: usize) -> (usize, usize) {
    match hd {
        0..=64 => (64, 64),
        65..=128 => (128, 64),
        _ => (256, 32),
    }
}

/// Dynamic shared memory of prefill_mma for one kind of chunk (`MmaTiles<D, BC, EXACT>::BYTES`
/// in attention.cu): the query tile and the key|value tiles in flight (two of one bf16 term, or
/// one of two terms for exact chunks), rows padded by 8 elements; the query tile shares the
/// key tiles' memory when its fragments stay in registers (one-term chunks, D <= 128).
fn mma_smem_bytes(d: usize, bc: usize, exact: bool) -> usize {
    let (terms, stages) = if exact { (2, 1) } else { (1, 2) };
    let q = terms * MMA_ROWS * (d + 8);
    let tiles = stages * 2 * terms * bc * (d + 8);
    let elems = if d <= 128 && !exact {
        q.max(tiles)
    } else {
        q + tiles
    };
    2 * elems
}

/// One launch of a prefill kernel: its name, grid width (query tiles), threads and dynamic
/// shared memory.
struct PrefillLaunch {
    name: String,
    grid_x: usize,
    threads: u32,
    smem: usize,
}

impl PrefillAttention {
    /// The launches this step's chunks take: the f32 kernel once, or the tensor-core kernel of
    /// each kind of chunk present (one-term, exact), each skipping the other kind's chunks.
    fn launches(&self, hd: usize) -> Vec<PrefillLaunch> {
        match self.kernel {
            PrefillKernel::Simt => {
                let rows_per_tile = if hd <= 128 { 32 } else { 16 };
                vec![PrefillLaunch {
                    name: "prefill_attention_f32".to_string(),
                    grid_x: self.max_len.div_ceil(rows_per_tile),
                    threads: 256,
                    smem: 0,
                }]
            }
            PrefillKernel::Mma => {
                let (d, bc) = mma_shape(hd);
                [(false, self.any_one_term), (true, self.any_exact)]
                    .into_iter()
                    .filter(|&(_, present)| present)
                    .map(|(exact, _)| PrefillLaunch {
                        name: if exact {
                            format!("prefill_mma_exact_d{d}")
                        } else {
                            format!("prefill_mma_d{d}")
                        },
                        grid_x: self.max_len.div_ceil(MMA_ROWS),
                        threads: MMA_THREADS,
                        smem: mma_smem_bytes(d, bc, exact),
                    })
                    .collect()
            }
        }
    }
}

impl candle_core::CustomOp3 for PrefillAttention {
    fn name(&self) -> &'static str {
        "prefill-attention"
    }

    crate::engine::ops::cuda_only_cpu_fwd!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let q = storage_view::<f32>(qs, ql, "queries")?;
        let k = storage_view::<f32>(ks, kl, "keys")?;
        let v = storage_view::<f32>(vs, vl, "values")?;
        let p = &self.params;
        let (heads, hd) = (p.num_heads, p.head_dim);
        let (cg, cl) = self.chunks.storage_and_layout();
        let chunks = cuda_view::<u32>(&cg, cl, "chunk table")?;
        // SAFETY: the kernel writes every row the chunks cover; the caller reads only those.
        let out = unsafe { dev.alloc::<f32>(self.out_rows.max(1) * heads * hd)? };
        // The tensor-core kernels stage keys and values from their bf16 terms (the lo terms
        // only for exact chunks).
        let terms = match self.kernel {
            PrefillKernel::Mma => {
                let lo = self.any_exact;
                Some((
                    split_terms(&dev, &k, lo)?,
                    split_terms(&dev, &v, lo)?,
                    k.len(),
                ))
            }
            PrefillKernel::Simt => None,
        };
        let ints = [
            heads as i32,
            p.num_kv_heads as i32,
            hd as i32,
            p.window.unwrap_or(0) as i32,
        ];
        let floats = [p.scale as f32, p.softcap.unwrap_or(0.0) as f32];
        for launch in self.launches(hd) {
            let func = dev.get_or_load_custom_func(&launch.name, "pruneserve_attention", PTX)?;
            if launch.smem > 0 {
                use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
                func.set_attribute(
                    Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    launch.smem as i32,
                )
                .w()?;
            }
            let mut b = func.builder();
            b.arg(&q);
            match &terms {
                Some((kt, vt, len)) => b.arg(kt).arg(vt).arg(len),
                None => b.arg(&k).arg(&v),
            };
            b.arg(&out).arg(&chunks);
            for i in &ints {
                b.arg(i);
            }
            for f in &floats {
                b.arg(f);
            }
            let cfg = LaunchConfig {
                grid_dim: (launch.grid_x as u32, heads as u32, self.n_chunks as u32),
                block_dim: (launch.threads, 1, 1),
                shared_mem_bytes: launch.smem as u32,
            };
            // SAFETY: the arguments match `prefill_attention_f32` and `prefill_mma{,_exact}_d*`
            // in attention.cu; chunk rows lie inside q/k/v and output rows inside `out` (each
            // launch writes the rows of its kind's chunks); the dynamic shared memory is what the
            // instantiation's tiles take (allowed above).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((self.out_rows, heads * hd)),
        ))
    }
}
