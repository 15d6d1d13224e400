//! The CUDA path of [`super::StepLora`]: one slot table per step (uploaded, or written into a
//! decode graph's fixed buffer) serves every row with its own adapter in two launches per packed
//! projection group: bf16 rows of longer steps on tensor cores (`mma.rs`, over the table's tiles
//! of rows sorted by adapter), the rest through `lora.cu`'s BGMV kernels (Punica's split). The
//! candle path in `mod.rs` defines what they compute; `selftest` checks both against it.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{
    CpuStorage, CustomOp2, DType, Device, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
};

use super::{mma, Delta, Group, LoraAdapter, StepSlots, GROUPS};
use crate::engine::attention::cuda::storage_view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
/// Rows per block of the shrink kernel, warps (splitting `in`) per block, rows per expand block.
const SHRINK_ROWS: usize = 4;
const SHRINK_WARPS: usize = 8;
const EXPAND_ROWS: usize = 8;
const EXPAND_THREADS: usize = 256;
/// A slot-table entry: A pointer, B pointer, R.
pub type Entry = [u64; 3];

/// The device address of a contiguous bf16 tensor's first element, which the BGMV kernels' 16-byte
/// loads need 16-byte aligned (device allocations are).
fn device_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        candle_core::bail!("LoRA tables hold CUDA tensors only");
    };
    let stream = s.device().cuda_stream();
    let ptr = crate::engine::kv::buffers::base_ptr::<half::bf16>(s, layout, &stream)?;
    if !ptr.is_multiple_of(16) {
        candle_core::bail!("a LoRA tensor at {ptr:#x} is not 16-byte aligned");
    }
    Ok(ptr)
}

/// Each layer's entries per group (zeros where the adapter leaves the group alone), computed once
/// when an adapter is loaded; the tensors they point into live as long as the adapter.
pub fn entries(layers: &[Option<super::LayerLora>]) -> Result<Vec<[Entry; GROUPS]>> {
    let entry = |d: Option<&Delta>| -> Result<Entry> {
        match d {
            Some(d) => Ok([device_ptr(&d.a)?, device_ptr(&d.b)?, d.a.dim(0)? as u64]),
            None => Ok([0; 3]),
        }
    };
    layers
        .iter()
        .map(|l| {
            let mut out = [[0u64; 3]; GROUPS];
            if let Some(l) = l {
                for (g, e) in Group::ALL.iter().zip(out.iter_mut()) {
                    *e = entry(g.of(l))?;
                }
            }
            Ok(out)
        })
        .collect()
}

/// Tiles of the tensor-core path (`lora.cu`): rows of one slot, at most [`mma::TILE`] each.
fn max_tiles(rows: usize, capacity: usize) -> usize {
    rows.div_ceil(mma::TILE) + capacity
}

/// Where the tiles start in a table of `rows` rows and `capacity` slots over `layers` base
/// layers: after the row slots and the entries.
fn tiles_at(rows: usize, layers: usize, capacity: usize) -> usize {
    rows + layers * GROUPS * capacity * 3
}

/// The i64 words of a table of `rows` rows and `capacity` slots over `layers` base layers.
pub fn table_len(rows: usize, layers: usize, capacity: usize) -> usize {
    tiles_at(rows, layers, capacity) + 2 + 3 * max_tiles(rows, capacity) + rows
}

/// A table's words and the widest R per layer and group: the row slots (`-1`: none), the
/// `[layer][group][slot]` entries (zeros past the adapters), then the tiles of the tensor-core
/// path: their count, the adapted rows' count, `{slot, start, rows}` per tile (zeros past them)
/// and the rows sorted by slot.
fn table_words(
    step: &StepSlots,
    layers: usize,
    capacity: usize,
) -> (Vec<i64>, Vec<[usize; GROUPS]>) {
    let (slots, row_slots) = (&step.adapters, &step.row_slots);
    let rows = row_slots.len();
    let mut meta = Vec::with_capacity(table_len(rows, layers, capacity));
    meta.extend(row_slots.iter().map(|s| s.map_or(-1, |s| s as i64)));
    let mut rmax = vec![[0usize; GROUPS]; layers];
    for (layer, widest) in rmax.iter_mut().enumerate() {
        for (g, w) in widest.iter_mut().enumerate() {
            for k in 0..capacity {
                let e = slots
                    .get(k)
                    .and_then(|a| a.cuda_entries.get(layer))
                    .map_or([0; 3], |l| l[g]);
                *w = (*w).max(e[2] as usize);
                meta.extend(e.map(|w| w as i64));
            }
        }
    }
    let mut order: Vec<i64> = Vec::with_capacity(rows);
    let mut tiles = Vec::new();
    for (k, members) in step.members.iter().enumerate() {
        let first = order.len();
        order.extend(members.iter().map(|&t| t as i64));
        for start in (first..order.len()).step_by(mma::TILE) {
            let n = (order.len() - start).min(mma::TILE);
            tiles.extend([k as i64, start as i64, n as i64]);
        }
    }
    meta.extend([(tiles.len() / 3) as i64, order.len() as i64]);
    meta.extend(&tiles);
    meta.resize(meta.len() + 3 * max_tiles(rows, capacity) - tiles.len(), 0);
    meta.extend(&order);
    meta.resize(table_len(rows, layers, capacity), 0);
    (meta, rmax)
}

/// One step's rows and slots on the device.
#[derive(Debug, Clone)]
pub struct LoraTable {
    /// i64 words: the row slots (`-1`: none), then `[layer][group][slot]` entries.
    meta: Tensor,
    rows: usize,
    slots: usize,
    /// Tile slots of the tensor-core path.
    max_tiles: usize,
    /// Widest R per layer and group among the slots (0: no slot adapts it).
    rmax: Vec<[usize; GROUPS]>,
    /// Keeps the tensors the table points into alive.
    _adapters: Vec<Arc<LoraAdapter>>,
}

impl LoraTable {
    /// The table of a step's rows grouped by adapter, uploaded.
    pub fn new(step: StepSlots, layers: usize, device: &Device) -> Result<Self> {
        let (rows, slots) = (step.row_slots.len(), step.adapters.len());
        let (meta, rmax) = table_words(&step, layers, slots);
        let len = meta.len();
        Ok(Self {
            meta: Tensor::from_vec(meta, len, device)?,
            rows,
            slots,
            max_tiles: max_tiles(rows, slots),
            rmax,
            _adapters: step.adapters,
        })
    }

    /// The table of a decode graph: written into `buffer` (a fixed input of
    /// [`table_len`]`(rows, layers, capacity)` i64 words) with room for `capacity` slots, and
    /// launching every layer and group at rank `rank`, so that its launches depend only on
    /// (rows, capacity, rank) and a captured graph replays them for any adapters that fit.
    pub fn in_buffer(
        buffer: &Tensor,
        step: StepSlots,
        layers: usize,
        (capacity, rank): (usize, usize),
    ) -> Result<Self> {
        let (rows, slots) = (step.row_slots.len(), step.adapters.len());
        let (meta, widest) = table_words(&step, layers, capacity);
        let wider = widest.iter().flatten().any(|&r| r > rank);
        if slots > capacity || wider || meta.len() != buffer.elem_count() {
            candle_core::bail!(
                "a LoRA table of {slots} slots does not fit a graph's table of {capacity} slots, rank {rank}"
            );
        }
        crate::engine::kv::buffers::write_into(buffer, &meta)?;
        Ok(Self {
            meta: buffer.clone(),
            rows,
            slots: capacity,
            max_tiles: max_tiles(rows, capacity),
            rmax: vec![[rank; GROUPS]; layers],
            _adapters: step.adapters,
        })
    }

    /// `y` plus each row's adapter delta of `x` for `group` of base layer `layer`.
    pub fn add(&self, y: Tensor, x: &Tensor, layer: usize, group: Group) -> Result<Tensor> {
        let g = group as usize;
        let rmax = self.rmax.get(layer).map_or(0, |r| r[g]);
        if rmax == 0 {
            return Ok(y);
        }
        let entries = self.rows + (layer * GROUPS + g) * self.slots * 3;
        let x = fresh(x)?;
        let out = y.dim(1)?;
        if mma::takes(&x, out)? {
            let y = fresh(&y)?;
            let op = mma::Mma {
                rows: self.rows,
                entries,
                tiles: (
                    tiles_at(self.rows, self.rmax.len(), self.slots),
                    self.max_tiles,
                ),
                rmax,
            };
            y.inplace_op3(&x, &self.meta, &op)?;
            return Ok(y);
        }
        let h = x.apply_op2_no_bwd(
            &self.meta,
            &Shrink {
                rows: self.rows,
                entries,
                rmax,
            },
        )?;
        let y = fresh(&y)?;
        y.inplace_op3(
            &h,
            &self.meta,
            &Expand {
                rows: self.rows,
                entries,
                rmax,
            },
        )?;
        Ok(y)
    }
}

/// A row-major copy starting at offset 0, as the kernels index raw pointers.
fn fresh(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

struct Shrink {
    rows: usize,
    entries: usize,
    rmax: usize,
}

impl CustomOp2 for Shrink {
    fn name(&self) -> &'static str {
        "lora-shrink"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lora-shrink runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (t, inp) = xl.shape().dims2()?;
        if t != self.rows || !inp.is_multiple_of(8) {
            candle_core::bail!(
                "lora-shrink: {t} rows of width {inp} (want {} rows, width a multiple of 8)",
                self.rows
            );
        }
        let dev = xs.device().clone();
        let meta = storage_view::<i64>(ms, ml, "LoRA table")?;
        // SAFETY: the kernel writes every element of [rows, rmax].
        let h = unsafe { dev.alloc::<f32>(t * self.rmax)? };
        let (rows, entries, width, rmax) =
            (t as i32, self.entries as i32, inp as i32, self.rmax as i32);
        let cfg = LaunchConfig {
            grid_dim: (t.div_ceil(SHRINK_ROWS) as u32, self.rmax as u32, 1),
            block_dim: (32 * SHRINK_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let xf = (xs.dtype() == DType::F32)
            .then(|| storage_view::<f32>(xs, xl, "LoRA input"))
            .transpose()?;
        let xb = (xs.dtype() == DType::BF16)
            .then(|| storage_view::<half::bf16>(xs, xl, "LoRA input"))
            .transpose()?;
        let name = if xf.is_some() {
            "lora_shrink_f32"
        } else {
            "lora_shrink_bf16"
        };
        let func = dev.get_or_load_custom_func(name, "pruneserve_lora", PTX)?;
        let mut b = func.builder();
        match (&xf, &xb) {
            (Some(x), _) => b.arg(x),
            (_, Some(x)) => b.arg(x),
            _ => candle_core::bail!("lora-shrink: unsupported input dtype {:?}", xs.dtype()),
        };
        b.arg(&meta)
            .arg(&rows)
            .arg(&entries)
            .arg(&width)
            .arg(&rmax)
            .arg(&h);
        // SAFETY: the arguments match `lora_shrink_*` in lora.cu; the table's pointers are into
        // adapter tensors this step holds, each [R, width] with R <= rmax.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(h, dev),
            Shape::from((t, self.rmax)),
        ))
    }
}

struct Expand {
    rows: usize,
    entries: usize,
    rmax: usize,
}

impl InplaceOp3 for Expand {
    fn name(&self) -> &'static str {
        "lora-expand"
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
        candle_core::bail!("lora-expand runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        ys: &mut CudaStorage,
        yl: &Layout,
        hs: &CudaStorage,
        hl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
    ) -> Result<()> {
        let (t, out) = yl.shape().dims2()?;
        if t != self.rows || yl.start_offset() != 0 || !yl.is_contiguous() {
            candle_core::bail!(
                "lora-expand: the output must be [{}, n], contiguous",
                self.rows
            );
        }
        let dev = hs.device().clone();
        let h = storage_view::<f32>(hs, hl, "shrunk rows")?;
        let meta = storage_view::<i64>(ms, ml, "LoRA table")?;
        let y = ys.as_cuda_slice_mut::<f32>()?;
        let func = dev.get_or_load_custom_func("lora_expand", "pruneserve_lora", PTX)?;
        let (rows, entries, width, rmax) =
            (t as i32, self.entries as i32, out as i32, self.rmax as i32);
        let mut b = func.builder();
        b.arg(&h)
            .arg(&meta)
            .arg(&rows)
            .arg(&entries)
            .arg(&width)
            .arg(&rmax)
            .arg(y);
        let cfg = LaunchConfig {
            grid_dim: (
                out.div_ceil(EXPAND_THREADS) as u32,
                t.div_ceil(EXPAND_ROWS) as u32,
                1,
            ),
            block_dim: (EXPAND_THREADS as u32, 1, 1),
            shared_mem_bytes: (EXPAND_ROWS * self.rmax * 4) as u32,
        };
        // SAFETY: the arguments match `lora_expand` in lora.cu; each output element is written
        // by one thread; B rows are [out, R] with R <= rmax.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
