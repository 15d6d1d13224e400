//! The adapters of one packed forward ([`StepLora`]): rows grouped by adapter, run as candle GEMMs
//! (a subset of rows through `index_select`/`index_add`), or on CUDA from one slot table for the
//! whole step (`cuda.rs`), which decode graphs write into a fixed buffer.

use std::sync::Arc;

use candle_core::{Device, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{Group, LoraAdapter};

/// Steps of at most this many rows use the CUDA kernels even with a single adapter (two launches
/// per group, where launches dominate); longer ones run it as cuBLAS GEMMs accumulating into the
/// projection's output, which measured faster from 64 rows up (docs/benchmarks.md). Steps that
/// mix adapters always use the kernels.
#[cfg(feature = "cuda")]
const KERNEL_ROWS: usize = 16;

/// The adapters of one packed forward, each with the rows that use it (`None`: every row); on
/// CUDA, mixed or short steps go through one slot table instead.
#[derive(Debug, Clone, Default)]
pub struct StepLora {
    groups: Vec<(Arc<LoraAdapter>, Option<Tensor>)>,
    #[cfg(feature = "cuda")]
    table: Option<cuda::LoraTable>,
}

/// The distinct adapters of a step's rows in order of first use, each row's slot among them, and
/// each slot's rows.
type Slots = (Vec<Arc<LoraAdapter>>, Vec<Option<usize>>, Vec<Vec<u32>>);

fn slots_of(rows: &[Option<Arc<LoraAdapter>>]) -> Slots {
    let mut slots: Vec<Arc<LoraAdapter>> = Vec::new();
    let mut row_slots = Vec::with_capacity(rows.len());
    let mut members: Vec<Vec<u32>> = Vec::new();
    for (i, a) in rows.iter().enumerate() {
        let slot = a
            .as_ref()
            .map(|a| match slots.iter().position(|s| Arc::ptr_eq(s, a)) {
                Some(k) => k,
                None => {
                    slots.push(a.clone());
                    members.push(Vec::new());
                    slots.len() - 1
                }
            });
        if let Some(k) = slot {
            members[k].push(i as u32);
        }
        row_slots.push(slot);
    }
    (slots, row_slots, members)
}

impl StepLora {
    /// Groups packed rows by adapter: `rows[i]` is the adapter of packed row `i`.
    pub fn new(rows: &[Option<Arc<LoraAdapter>>], device: &Device) -> candle_core::Result<Self> {
        let (slots, row_slots, members) = slots_of(rows);
        #[cfg(feature = "cuda")]
        if device.is_cuda()
            && !slots.is_empty()
            && slots.iter().all(|a| !a.cuda_entries.is_empty())
            && (rows.len() <= KERNEL_ROWS || members[0].len() < rows.len())
        {
            let layers = slots[0].layers.len();
            return Ok(Self {
                groups: Vec::new(),
                table: Some(cuda::LoraTable::new(slots, &row_slots, layers, device)?),
            });
        }
        #[cfg(not(feature = "cuda"))]
        let _ = row_slots;
        let groups = slots
            .into_iter()
            .zip(members)
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

    /// The slot table of a decode graph's step ([`cuda::LoraTable::in_buffer`]): `rows[i]` is
    /// the adapter of padded row `i`; `shape` is the graph's (slot capacity, rank).
    #[cfg(feature = "cuda")]
    pub fn graphed(
        rows: &[Option<Arc<LoraAdapter>>],
        buffer: &Tensor,
        layers: usize,
        shape: (usize, usize),
    ) -> candle_core::Result<Self> {
        let (slots, row_slots, _) = slots_of(rows);
        Ok(Self {
            groups: Vec::new(),
            table: Some(cuda::LoraTable::in_buffer(
                buffer, slots, &row_slots, layers, shape,
            )?),
        })
    }

    /// The (slot capacity, rank) of a decode graph serving these rows' adapters: the number of
    /// distinct adapters and their widest rank, each rounded up to a power of two (rank from 16,
    /// at most 1,536),
    /// so that steps over similar adapters share graphs. `None` when an adapter cannot run from
    /// the slot table (not bf16 on CUDA); `Some((0, 0))` when no row has one.
    #[cfg(feature = "cuda")]
    pub fn graph_shape(rows: &[Option<Arc<LoraAdapter>>]) -> Option<(usize, usize)> {
        let (slots, _, _) = slots_of(rows);
        if slots.is_empty() {
            return Some((0, 0));
        }
        let mut rank = 0;
        for a in &slots {
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
        let rank = rank.max(16).next_power_of_two().min(1536);
        Some((slots.len().next_power_of_two(), rank))
    }

    /// `y` plus every adapter's delta of `x` on its rows, for `group` of base layer `layer`.
    pub fn add(
        &self,
        mut y: Tensor,
        x: &Tensor,
        layer: usize,
        group: Group,
    ) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            return table.add(y, x, layer, group);
        }
        for (adapter, rows) in &self.groups {
            let Some(delta) = adapter.layer(layer).and_then(|l| group.of(l)) else {
                continue;
            };
            y = match rows {
                None => delta.add_to(y, x)?,
                Some(idx) => {
                    let d = delta.apply(&x.index_select(idx, 0)?)?;
                    y.index_add(idx, &d, 0)?
                }
            };
        }
        Ok(y)
    }
}
