//! Device buffers of the CUDA paged cache written from the host: the fixed inputs a captured
//! decode graph reads its cache indices from ([`GraphKvInputs`], filled by
//! [`KvCache::begin_padded_decode`](crate::engine::kv::KvCache)), and the raw copies into them.

use candle_core::{DType, Device, Tensor};

/// The fixed device buffers a captured decode graph reads its cache indices from
/// ([`crate::engine::kv::KvCache::begin_padded_decode`] writes them before each replay): `[plans, rows]` i64 slots,
/// `[plans, rows, max_blocks]` u32 block tables and `[rows]` u32 context lengths, for plans of up
/// to `plans` positions.
pub struct GraphKvInputs {
    pub rows: usize,
    pub max_blocks: usize,
    pub(super) slots: Tensor,
    pub(super) tables: Tensor,
    pub(super) context_lens: Tensor,
}

impl GraphKvInputs {
    pub fn new(
        device: &Device,
        plans: usize,
        rows: usize,
        max_blocks: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            rows,
            max_blocks,
            slots: Tensor::zeros((plans, rows), DType::I64, device)?,
            tables: Tensor::zeros((plans, rows, max_blocks), DType::U32, device)?,
            context_lens: Tensor::ones(rows, DType::U32, device)?,
        })
    }
}

/// The device address of a contiguous tensor's first element.
pub(crate) fn base_ptr<T: candle_core::cuda_backend::CudaDType>(
    s: &candle_core::CudaStorage,
    layout: &candle_core::Layout,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let view = crate::engine::attention::cuda::storage_view::<T>(s, layout, "device buffer")?;
    let (ptr, _sync) = view.device_ptr(stream);
    Ok(ptr)
}

/// Copies `src` into the first elements of the contiguous CUDA tensor `dst` of the same element
/// type, ordered on candle's stream after the work already queued (a captured graph reading
/// `dst` sees the new values on its next replay).
pub fn write_into<T>(dst: &Tensor, src: &[T]) -> candle_core::Result<()>
where
    T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
{
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async;
    use candle_core::cuda_backend::WrapErr;
    if src.len() > dst.elem_count() {
        candle_core::bail!(
            "{} values do not fit a buffer of {}",
            src.len(),
            dst.elem_count()
        );
    }
    let (storage, layout) = dst.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        candle_core::bail!("the buffer is not on a CUDA device");
    };
    let stream = s.device().cuda_stream();
    let ptr = base_ptr::<T>(s, layout, &stream)?;
    // SAFETY: the destination holds at least `src.len()` elements of `T` (checked above) and
    // lives while the copy runs (the tensor is borrowed and freed stream-ordered); a pageable
    // source is staged by the driver before the call returns.
    unsafe { memcpy_htod_async(ptr, src, stream.cu_stream()) }.w()
}
