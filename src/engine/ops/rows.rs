//! Row operations on CUDA without per-launch uploads (candle's `index_select` and broadcast
//! adds upload their dims from the host on every call, which a captured CUDA graph would replay
//! from a freed buffer, see [`crate::engine::graphs`]): rows of a table gathered to f32 by
//! device-held ids (embeddings, rotary tables) and a bias added to f32 rows in place. The CPU
//! implementations define what the kernels (`gather_rows_*`, `add_row_bias` in `fused.cu`)
//! compute; the CPU tests run them.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::engine::ops::fused::{contiguous, f32_slice};

struct GatherRows;

struct AddRowBias;

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cols) = l1.shape().dims2()?;
        let CpuStorage::U32(ids) = s2 else {
            candle_core::bail!("fused: gather ids must be u32");
        };
        let ids = contiguous(ids, l2, "gather ids")?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("fused: row {bad} is outside a table of {n} rows");
        }
        let mut out = Vec::with_capacity(ids.len() * cols);
        let rows = ids
            .iter()
            .map(|&i| i as usize * cols..(i as usize + 1) * cols);
        match s1 {
            CpuStorage::F32(t) => {
                let t = contiguous(t, l1, "table")?;
                rows.for_each(|r| out.extend_from_slice(&t[r]));
            }
            CpuStorage::BF16(t) => {
                let t = contiguous(t, l1, "table")?;
                rows.for_each(|r| out.extend(t[r].iter().map(|v| v.to_f32())));
            }
            other => candle_core::bail!(
                "fused: gather table must be f32 or bf16, got {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, cols) = l1.shape().dims2()?;
        let rows = l2.shape().elem_count();
        let storage = cuda::gather_rows(s1, l1, s2, l2, (rows, cols, n))?;
        Ok((storage, Shape::from((rows, cols))))
    }
}

impl candle_core::InplaceOp2 for AddRowBias {
    fn name(&self) -> &'static str {
        "add-row-bias"
    }

    fn cpu_fwd(&self, y: &mut CpuStorage, yl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<()> {
        let b = f32_slice(b, bl, "bias")?;
        let CpuStorage::F32(y) = y else {
            candle_core::bail!("fused: biased rows must be f32");
        };
        let Some((lo, hi)) = yl.contiguous_offsets() else {
            candle_core::bail!("fused: biased rows must be contiguous");
        };
        for row in y[lo..hi].chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        yl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        cuda::add_row_bias(y, yl, b, bl)
    }
}

/// `y + b` for f32 rows `y` `[T, n]` and an f32 bias `[n]`, added in place into `y` (which
/// nothing else may hold): one launch with no per-launch upload, unlike a broadcast add.
pub fn add_row_bias(y: Tensor, b: &Tensor) -> Result<Tensor> {
    let n = b.elem_count();
    if y.dtype() != DType::F32 || y.rank() != 2 || y.dim(1)? != n || !y.is_contiguous() {
        candle_core::bail!("fused: a bias of {n} values needs contiguous f32 rows of {n}");
    }
    y.inplace_op2(&b.contiguous()?, &AddRowBias)?;
    Ok(y)
}

/// Rows `ids` (u32 `[rows]`) of a `[n, cols]` table (f32 or bf16) as f32 `[rows, cols]`: what
/// `table.index_select(ids, 0)?.to_dtype(F32)` gives, in one launch that reads the ids on the
/// device (ids at or above `n` are an error on the CPU and zero rows on CUDA).
pub fn gather_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    table.apply_op2_no_bwd(ids, &GatherRows)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Result};

    use crate::engine::ops::fused::cuda::PTX;

    /// `add_row_bias` over contiguous f32 rows `y` and a bias of their width.
    pub fn add_row_bias(
        y: &mut CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        let dev = y.device().clone();
        let (Some((lo, hi)), Some((b0, b1))) = (yl.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("fused: biased rows and bias must be contiguous");
        };
        let bias = b.as_cuda_slice::<f32>()?.slice(b0..b1);
        let rows = y.as_cuda_slice_mut::<f32>()?;
        let mut rows = rows.slice_mut(lo..hi);
        let (n, total) = ((b1 - b0) as i32, hi - lo);
        let func = dev.get_or_load_custom_func("add_row_bias", "pruneserve_fused", PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&mut rows).arg(&bias).arg(&n).arg(&total);
        // SAFETY: the arguments match `add_row_bias` in fused.cu; `total` is the rows' length.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    /// `gather_rows_{f32|bf16}` (named by the table's dtype) over `rows` ids into f32 rows.
    pub fn gather_rows(
        table: &CudaStorage,
        tl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
        (rows, cols, n): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        use crate::engine::attention::cuda::storage_view;
        let dev = table.device().clone();
        let ids = storage_view::<u32>(ids, il, "gather ids")?;
        let cfg = LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel writes all rows * cols values.
        let dst = unsafe { dev.alloc::<f32>(rows * cols)? };
        let (cols, n) = (cols as i32, n as i32);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let t = storage_view::<$t>(table, tl, "gather table")?;
                let func = dev.get_or_load_custom_func($name, "pruneserve_fused", PTX)?;
                let mut b = func.builder();
                b.arg(&t);
                b.arg(&ids);
                b.arg(&dst);
                b.arg(&cols);
                b.arg(&n);
                // SAFETY: the argument list matches the kernel's signature in fused.cu.
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match table.dtype() {
            DType::F32 => run!(f32, "gather_rows_f32"),
            DType::BF16 => run!(half::bf16, "gather_rows_bf16"),
            other => candle_core::bail!("fused: gather table must be f32 or bf16, got {other:?}"),
        }
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::fused::tests::{max_diff, randn};
    use candle_core::Device;

    #[test]
    fn gather_rows_matches_index_select_and_refuses_rows_outside_the_table() {
        let table = randn(&[6, 5], 7);
        let ids = Tensor::new(&[4u32, 0, 4, 5], &Device::Cpu).unwrap();
        let want = table.index_select(&ids, 0).unwrap();
        assert_eq!(max_diff(&gather_rows(&table, &ids).unwrap(), &want), 0.0);
        let bf = table.to_dtype(DType::BF16).unwrap();
        let got = gather_rows(&bf, &ids).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = bf
            .index_select(&ids, 0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        let outside = Tensor::new(&[6u32], &Device::Cpu).unwrap();
        assert!(gather_rows(&table, &outside).is_err());
    }

    #[test]
    fn add_row_bias_matches_a_broadcast_add() {
        let (y, b) = (randn(&[3, 8], 8), randn(&[8], 9));
        let want = y.broadcast_add(&b).unwrap();
        let got = add_row_bias(y.copy().unwrap(), &b).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        assert!(add_row_bias(y, &randn(&[7], 1)).is_err());
    }
}
