//! The CUDA path of [`super::StepLora`]: one slot table per step (uploaded, or written into a
//! decode graph's fixed buffer) serves every row with its own adapter in two launches per packed
//! projection group: bf16 rows of longer steps on tensor cores (`mma.rs`, over the table's tiles
//! of rows sorted by adapter), the rest through `lora.cu`'s BGMV kernels (Punica's split). The
//! candle path in `mod.rs` defines what they compute; `selftest` checks both against it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CustomOp2, DType, Device, InplaceOp3, Layout, Result, Shape, Storage, Tensor};

use super::{mma, Delta, Group, LoraAdapter, StepSlots, GROUPS};
use crate::engine::attention::cuda::storage_view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
/// Rows per block of the shrink kernel, warps (splitting `in`) per block, rows per expand block.
const SHRINK_ROWS: usize = 4;
const SHRINK_WARPS: usize = 8;
const EXPAND_ROWS: usize = 8;
const EXPAND_THREADS: usize = 256;
/// A slot-table entry: A pointer, B pointer, R, the ranks of each packed module's columns
/// ([`super::segment_word`]).
pub type Entry = [u64; ENTRY_WORDS];
const ENTRY_WORDS: usize = 4;
/// Steps of at most this many rows run each group's shrink on the side stream beside the base
/// projection; longer ones in line, where the side stream measured slower (8B shape, H200,
/// graphs, decode-only steps: the adapter cost 28 µs a layer at one row with the side stream
/// against 48 in line, 35-38 against 42-45 at 16 rows, 55-57 against 47-53 at 64;
/// docs/benchmarks.md, session 15).
const SIDE_STREAM_MAX_ROWS: usize = 32;

/// Loads every kernel of lora.cu on `device` (the driver JIT-compiles the module once), so that
/// the first step with an adapter does not wait for it. Nothing on a CPU device.
pub fn preload(device: &Device) -> Result<()> {
    let Device::Cuda(dev) = device else {
        return Ok(());
    };
    for name in [
        "lora_shrink_f32",
        "lora_shrink_bf16",
        "lora_expand",
        "lora_shrink_mma4",
        "lora_shrink_mma8",
        "lora_expand_mma",
    ] {
        dev.get_or_load_custom_func(name, "pruneserve_lora", PTX)?;
    }
    Ok(())
}

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
            Some(d) => Ok([
                device_ptr(&d.a)?,
                device_ptr(&d.b)?,
                d.a.dim(0)? as u64,
                super::segment_word(&d.blocks),
            ]),
            None => Ok([0; ENTRY_WORDS]),
        }
    };
    layers
        .iter()
        .map(|l| {
            let mut out = [[0u64; ENTRY_WORDS]; GROUPS];
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
    rows + layers * GROUPS * capacity * ENTRY_WORDS
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
                    .map_or([0; ENTRY_WORDS], |l| l[g]);
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
    /// f32 room for every row's shrunk values at the widest R, reused by every group of the step
    /// (the launches run in order on one stream), so a decode graph allocates nothing for them.
    scratch: Tensor,
    /// The group whose shrink [`LoraTable::prefetch`] started on the side stream
    /// ([`pending_key`]; 0: none), which [`LoraTable::add`] joins before its expand.
    pending: Arc<AtomicUsize>,
    /// Keeps the tensors the table points into alive.
    _adapters: Vec<Arc<LoraAdapter>>,
}

impl LoraTable {
    /// The table of a step's rows grouped by adapter, uploaded.
    pub fn new(step: StepSlots, layers: usize, device: &Device) -> Result<Self> {
        let (rows, slots) = (step.row_slots.len(), step.adapters.len());
        let (meta, rmax) = table_words(&step, layers, slots);
        let len = meta.len();
        let widest = rmax.iter().flatten().copied().max().unwrap_or(0);
        Ok(Self {
            meta: Tensor::from_vec(meta, len, device)?,
            rows,
            slots,
            max_tiles: max_tiles(rows, slots),
            rmax,
            scratch: Tensor::zeros(rows * widest.max(1), DType::F32, device)?,
            pending: Arc::default(),
            _adapters: step.adapters,
        })
    }

    /// The table of a decode graph: written into `buffer` (a fixed input of
    /// [`table_len`]`(rows, layers, capacity)` i64 words) with room for `capacity` slots, and
    /// launching every layer and group at rank `rank`, so that its launches depend only on
    /// (rows, capacity, rank) and a captured graph replays them for any adapters that fit;
    /// `scratch` (fixed too, f32, at least rows * rank) takes the shrunk rows.
    pub fn in_buffer(
        (buffer, scratch): &(Tensor, Tensor),
        step: StepSlots,
        layers: usize,
        (capacity, rank): (usize, usize),
    ) -> Result<Self> {
        let (rows, slots) = (step.row_slots.len(), step.adapters.len());
        let (meta, widest) = table_words(&step, layers, capacity);
        let wider = widest.iter().flatten().any(|&r| r > rank);
        if slots > capacity
            || wider
            || meta.len() != buffer.elem_count()
            || scratch.elem_count() < rows * rank
        {
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
            scratch: scratch.clone(),
            pending: Arc::default(),
            _adapters: step.adapters,
        })
    }

    /// The widest R the launches of `group` of base layer `layer` cover (0: no slot adapts it)
    /// and the word offset of the group's slot entries in the table.
    fn group_at(&self, (layer, group): (usize, Group)) -> (usize, usize) {
        let g = group as usize;
        let rmax = self.rmax.get(layer).map_or(0, |r| r[g]);
        (
            rmax,
            self.rows + (layer * GROUPS + g) * self.slots * ENTRY_WORDS,
        )
    }

    /// The tensor-core launches of `group` of base layer `layer`, when the group is adapted and
    /// rows `x` and `out` output columns fit that path.
    fn mma_launch(
        &self,
        x: &Tensor,
        (layer, group): (usize, Group),
        out: usize,
    ) -> Result<Option<mma::Launch>> {
        let (rmax, entries) = self.group_at((layer, group));
        if rmax == 0 || !mma::takes(x, out)? {
            return Ok(None);
        }
        Ok(Some(mma::Launch {
            rows: self.rows,
            entries,
            tiles: (
                tiles_at(self.rows, self.rmax.len(), self.slots),
                self.max_tiles,
            ),
            rmax,
            meta: self.meta.clone(),
            scratch: self.scratch.clone(),
        }))
    }

    /// Starts the shrink of rows `x` for `group` of `layer` (with `out` output columns) on the
    /// side stream, so that it runs beside the base projection launched next; [`Self::add`]
    /// for the same group finishes it. Nothing when the group is not on the tensor-core path or
    /// `x` is not already laid out as the kernel reads it (`add` then does it all), for steps of
    /// more than [`SIDE_STREAM_MAX_ROWS`] rows, and with `PRUNESERVE_LORA_SIDE_STREAM=0` (every
    /// shrink in line, for A/B measurements).
    pub fn prefetch(&self, x: &Tensor, at: (usize, Group), out: usize) -> Result<()> {
        static SIDE: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            std::env::var("PRUNESERVE_LORA_SIDE_STREAM").map_or(true, |v| v != "0")
        });
        if !*SIDE || self.rows > SIDE_STREAM_MAX_ROWS || !is_fresh(x) {
            return Ok(());
        }
        let Some(launch) = self.mma_launch(x, at, out)? else {
            return Ok(());
        };
        let Device::Cuda(dev) = x.device() else {
            return Ok(());
        };
        let main = dev.cuda_stream();
        let side = mma::side_stream(&main)?;
        // The side stream waits for everything queued so far: `x`, and the previous group's
        // expand that reads the same scratch.
        side.join(&main).w()?;
        x.inplace_op1(&mma::Shrink {
            at: launch,
            stream: Some(side),
        })?;
        self.pending.store(pending_key(at), Ordering::Relaxed);
        Ok(())
    }

    /// `y` plus each row's adapter delta of `x` for `group` of base layer `layer`.
    pub fn add(&self, y: Tensor, x: &Tensor, (layer, group): (usize, Group)) -> Result<Tensor> {
        let (rmax, entries) = self.group_at((layer, group));
        if rmax == 0 {
            return Ok(y);
        }
        let out = y.dim(1)?;
        let prefetched = self.pending.swap(0, Ordering::Relaxed) == pending_key((layer, group));
        if let Some(launch) = self.mma_launch(x, (layer, group), out)? {
            let y = fresh(&y)?;
            match (prefetched, x.device()) {
                (true, Device::Cuda(dev)) => {
                    let main = dev.cuda_stream();
                    let side = mma::side_stream(&main)?;
                    main.join(&side).w()?;
                }
                _ => fresh(x)?.inplace_op1(&mma::Shrink {
                    at: launch.clone(),
                    stream: None,
                })?,
            }
            y.inplace_op2(&self.meta, &mma::Expand(launch))?;
            return Ok(y);
        }
        let x = fresh(x)?;
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

/// Whether `t` is row-major from offset 0, as the kernels index raw pointers.
fn is_fresh(t: &Tensor) -> bool {
    t.is_contiguous() && t.layout().start_offset() == 0
}

/// `t`, or a row-major copy starting at offset 0.
fn fresh(t: &Tensor) -> Result<Tensor> {
    if is_fresh(t) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// [`LoraTable::pending`]'s value for a group of a layer.
fn pending_key((layer, group): (usize, Group)) -> usize {
    layer * GROUPS + group as usize + 1
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

    crate::engine::ops::cuda_only_cpu_fwd!(2);

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

    crate::engine::ops::cuda_only_cpu_fwd!(inplace 3);

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
