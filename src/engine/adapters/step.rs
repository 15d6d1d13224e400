//! The adapters of one packed forward ([`StepLora`]): rows grouped by adapter, run as candle GEMMs
//! (a subset of rows through `index_select`/`index_add`), or on CUDA from one slot table for the
//! whole step (`cuda.rs`), which decode graphs write into a fixed buffer.

use std::sync::Arc;

use candle_core::{Device, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Group, LoraAdapter};
use crate::engine::ops::gemm::ExactRows;

/// Steps of at most this many rows use the CUDA kernels even with a single adapter (two launches
/// per group, where launches dominate); longer ones run it as cuBLAS GEMMs (the delta written
/// first and the projection accumulating into it, [`StepLora::fresh_delta`]), which measured
/// faster from 64 rows up (docs/benchmarks.md). Steps that mix adapters always use the kernels.
#[cfg(feature = "cuda")]
const KERNEL_ROWS: usize = 16;

/// The widest packed rank a decode graph serves (`--max-lora-rank` 512 on q|k|v); a graph's
/// shrunk-rows scratch holds this many per row.
pub const MAX_GRAPH_RANK: usize = 1536;

/// The adapters of one packed forward, each with the rows that use it (`None`: every row); on
/// CUDA, mixed or short steps go through one slot table instead.
#[derive(Debug, Clone, Default)]
pub struct StepLora {
    groups: Vec<(Arc<LoraAdapter>, Option<Tensor>)>,
    #[cfg(feature = "cuda")]
    table: Option<cuda::LoraTable>,
}

/// A step's rows grouped by adapter: the distinct adapters in order of first use (slots), each
/// row's slot, and each slot's rows in order.
pub struct StepSlots {
    pub(super) adapters: Vec<Arc<LoraAdapter>>,
    pub(super) row_slots: Vec<Option<usize>>,
    pub(super) members: Vec<Vec<u32>>,
}

impl StepSlots {
    /// `rows[i]` is the adapter of packed row `i`.
    pub fn of(rows: &[Option<Arc<LoraAdapter>>]) -> Self {
        let mut adapters: Vec<Arc<LoraAdapter>> = Vec::new();
        let mut row_slots = Vec::with_capacity(rows.len());
        let mut members: Vec<Vec<u32>> = Vec::new();
        for (i, a) in rows.iter().enumerate() {
            let slot = a
                .as_ref()
                .map(|a| match adapters.iter().position(|s| Arc::ptr_eq(s, a)) {
                    Some(k) => k,
                    None => {
                        adapters.push(a.clone());
                        members.push(Vec::new());
                        adapters.len() - 1
                    }
                });
            if let Some(k) = slot {
                members[k].push(i as u32);
            }
            row_slots.push(slot);
        }
        Self {
            adapters,
            row_slots,
            members,
        }
    }

    /// The (slot capacity, rank) of a decode graph serving these adapters: their number and
    /// widest rank, each rounded up to a power of two (rank from 16, at most 1,536), so that
    /// steps over similar adapters share graphs. `None` when an adapter cannot run from the slot
    /// table (not bf16 on CUDA); `Some((0, 0))` when no row has one.
    #[cfg(feature = "cuda")]
    pub fn graph_shape(&self) -> Option<(usize, usize)> {
        if self.adapters.is_empty() {
            return Some((0, 0));
        }
        let mut rank = 0;
        for a in &self.adapters {
            let widest = a
                .cuda_entries
                .iter()
                .flatten()
                .map(|e| e[2] as usize)
                .max()?;
            rank = rank.max(widest);
        }
        // Packed ranks are at most 1,536 (--max-lora-rank 512 on q|k|v), which the BGMV expand
        // holds in shared memory for 8 rows; the next power of two would not fit.
        let rank = rank.max(16).next_power_of_two().min(MAX_GRAPH_RANK);
        Some((self.adapters.len().next_power_of_two(), rank))
    }

    /// Pads the step with rows that use no adapter, up to `rows` rows.
    pub fn pad_to(&mut self, rows: usize) {
        self.row_slots.resize(rows.max(self.row_slots.len()), None);
    }
}

impl StepLora {
    /// Groups packed rows by adapter: `rows[i]` is the adapter of packed row `i`.
    pub fn new(rows: &[Option<Arc<LoraAdapter>>], device: &Device) -> candle_core::Result<Self> {
        let slots = StepSlots::of(rows);
        #[cfg(feature = "cuda")]
        if device.is_cuda()
            && !slots.adapters.is_empty()
            && slots.adapters.iter().all(|a| !a.cuda_entries.is_empty())
            && (rows.len() <= KERNEL_ROWS || slots.members[0].len() < rows.len())
        {
            let layers = slots.adapters[0].layers.len();
            return Ok(Self {
                groups: Vec::new(),
                table: Some(cuda::LoraTable::new(slots, layers, device)?),
            });
        }
        let groups = slots
            .adapters
            .into_iter()
            .zip(slots.members)
            .map(|(a, r)| {
                let all = r.len() == rows.len();
                let idx = (!all)
                    .then(|| Tensor::new(r.as_slice(), device))
                    .transpose()?;
                Ok((a, idx))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            groups,
            #[cfg(feature = "cuda")]
            table: None,
        })
    }

    /// The slot table of a decode graph's step ([`cuda::LoraTable::in_buffer`]): `slots` of its
    /// padded rows; `buffers` the graph's fixed table and shrunk-rows scratch; `shape` is the
    /// graph's (slot capacity, rank).
    #[cfg(feature = "cuda")]
    pub fn graphed(
        slots: StepSlots,
        buffers: &(Tensor, Tensor),
        layers: usize,
        shape: (usize, usize),
    ) -> candle_core::Result<Self> {
        Ok(Self {
            groups: Vec::new(),
            table: Some(cuda::LoraTable::in_buffer(buffers, slots, layers, shape)?),
        })
    }

    /// Starts the adapters' part of `group` of base layer `layer` for rows `x` (with `out` output
    /// columns) where it can run beside the base projection launched next (the slot-table's
    /// tensor-core shrink, on CUDA); [`Self::add`] for the same group, called next, finishes it.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn prefetch(&self, x: &Tensor, at: (usize, Group), out: usize) -> candle_core::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            return table.prefetch(x, at, out);
        }
        Ok(())
    }

    /// The delta of `x` for `group` of base layer `layer`, as f32 `[T, out]` written fresh, when
    /// one adapter takes every row of the step through cuBLAS on CUDA: the base projection then
    /// accumulates into it (beta = 1), so the adapter writes the projection's `[T, out]` once
    /// instead of reading and rewriting it after the projection (at 2,048 prompt rows, 470 MB
    /// a layer for gate|up alone). `None` everywhere else, where [`Self::prefetch`] and
    /// [`Self::add`] apply the adapters.
    pub fn fresh_delta(
        &self,
        x: &Tensor,
        (layer, group): (usize, Group),
        exact: &ExactRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let [(adapter, None)] = self.groups.as_slice() else {
            return Ok(None);
        };
        if !x.device().is_cuda() {
            return Ok(None);
        }
        match adapter.layer(layer).and_then(|l| group.of(l)) {
            Some(delta) => delta.fresh(x, exact).map(Some),
            None => Ok(None),
        }
    }

    /// `y` plus every adapter's delta of `x` on its rows, for `group` of base layer `layer`; an
    /// f32 `x` is compensated on the `exact` rows (all rows on the slot-table and row-subset
    /// paths).
    pub fn add(
        &self,
        mut y: Tensor,
        x: &Tensor,
        (layer, group): (usize, Group),
        exact: &ExactRows,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            return table.add(y, x, (layer, group));
        }
        for (adapter, rows) in &self.groups {
            let Some(delta) = adapter.layer(layer).and_then(|l| group.of(l)) else {
                continue;
            };
            y = match rows {
                None => delta.add_to(y, x, exact)?,
                Some(idx) => {
                    let d = delta.apply(&x.index_select(idx, 0)?)?;
                    y.index_add(idx, &d, 0)?
                }
            };
        }
        Ok(y)
    }
}
