//! CUDA graphs for decode steps (as vLLM's `cudagraph_capture_sizes`): a decode-only step of a
//! plan is padded to a bucket of rows and of context, its inputs (token ids, positions, cache
//! slots, block tables, context lengths) are written into fixed device buffers, and the step's
//! ~500 launches replay from one captured graph instead of being launched one by one.
//!
//! Contract:
//! - A key (plan layers, rows bucket, context bucket) runs eagerly over its fixed buffers the
//!   first time it is seen (loading every kernel and sizing cuBLAS's workspace), is captured the
//!   second time, and replays from then on. The eager run and the replay launch the same kernels
//!   on the same shapes, so they give the same numbers; padded rows only change the GEMMs' row
//!   count, as any other batch composition does.
//! - Nothing inside a capture reads host data or synchronizes, and every tensor created inside it
//!   is dropped inside it (the graph allocates and frees its own intermediates); the final hidden
//!   rows are copied into a fixed output buffer.
//! - A capture that fails ends the capture, marks its key as eager-only and runs the step eagerly:
//!   graphs are a speed path, never a reason for a step to fail.
//! - LoRA adapters run from a slot table in a fixed buffer (`adapters/cuda.rs`), sized by the
//!   key's slot capacity and rank (powers of two): a graph replays for any adapters that fit, as
//!   the kernels read each row's adapter from the table when they run.
//! - Steps with prompt rows, overlays, taps or shared hidden states, adapters not in bf16 on
//!   CUDA, steps above the largest bucket, and runs with `PRUNESERVE_PHASE_TIMES` stay eager.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::{DType, Device, Tensor};

use crate::engine::adapters::{cuda::table_len, LoraAdapter, StepLora, StepSlots, MAX_GRAPH_RANK};
use crate::engine::kv::buffers::{write_into, GraphKvInputs};
use crate::engine::kv::{ChunkRef, KvCache};
use crate::engine::model::DecoderModel;
use crate::plan::LayerPlan;

/// Rows buckets up to `max_rows`: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32.
pub fn row_buckets(max_rows: usize) -> Vec<usize> {
    let mut b = vec![1, 2, 4];
    b.extend((8..=64).step_by(8));
    b.extend((96..=max_rows.max(96)).step_by(32));
    b.retain(|&r| r <= max_rows);
    b
}

/// The context bucket of a step whose longest row attends to `context` tokens: the next power of
/// two from 256 (decode partitions are 128 tokens, blocks 16).
fn context_bucket(context: usize) -> usize {
    context.max(256).next_power_of_two()
}

/// Graphs kept at most; further keys run eagerly.
const MAX_GRAPHS: usize = 512;

/// Plan layers, rows bucket, context bucket, LoRA (slot capacity, rank) (`(0, 0)`: none).
type GraphKey = (Vec<usize>, usize, usize, (usize, usize));

/// A captured graph, owned by one engine.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized; the
// graph is only reached through `&mut DecodeGraphs`, owned by one engine loop at a time.
unsafe impl Send for Graph {}

enum State {
    /// Ran eagerly once; captured on the next step with this key.
    Warm,
    Captured(Graph),
    /// The capture failed: this key stays eager.
    Eager,
}

/// The fixed buffers of one (rows, context) bucket, shared by every plan's graphs.
struct Inputs {
    ids: Tensor,
    positions: Tensor,
    kv: GraphKvInputs,
    /// LoRA slot tables by slot capacity, each with its shrunk-rows scratch (f32, room for
    /// every row at the widest graph rank, so that no graph ever points at a replaced one).
    lora: HashMap<usize, (Tensor, Tensor)>,
    /// The step's final-normed hidden rows, allocated by the first eager run.
    out: Option<Tensor>,
}

impl Inputs {
    fn new(
        device: &Device,
        max_plan: usize,
        rows: usize,
        context: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            ids: Tensor::zeros(rows, DType::U32, device)?,
            positions: Tensor::zeros(rows, DType::U32, device)?,
            kv: GraphKvInputs::new(device, max_plan, rows, context / 16)?,
            lora: HashMap::new(),
            out: None,
        })
    }

    /// The step's adapters in this bucket's slot table of the key's (capacity, rank); no
    /// adapters when the capacity is 0.
    fn lora_table(
        &mut self,
        mut slots: StepSlots,
        max_plan: usize,
        shape: (usize, usize),
    ) -> candle_core::Result<StepLora> {
        let (capacity, _) = shape;
        if capacity == 0 {
            return Ok(StepLora::default());
        }
        let rows = self.ids.elem_count();
        let buffers = match self.lora.entry(capacity) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let device = self.ids.device();
                let words = table_len(rows, max_plan, capacity);
                e.insert((
                    Tensor::zeros(words, DType::I64, device)?,
                    Tensor::zeros(rows * MAX_GRAPH_RANK, DType::F32, device)?,
                ))
            }
        };
        slots.pad_to(rows);
        StepLora::graphed(slots, buffers, max_plan, shape)
    }
}

/// Decode steps replayed from graphs, and graphs captured (read by `selftest`).
#[derive(Debug, Default, Clone, Copy)]
pub struct GraphStats {
    pub replays: u64,
    pub captures: u64,
}

pub struct DecodeGraphs {
    buckets: Vec<usize>,
    inputs: HashMap<(usize, usize), Inputs>,
    graphs: HashMap<GraphKey, State>,
    stats: GraphStats,
    /// Synchronized replay time since the last report (`PRUNESERVE_GRAPH_TIMES`).
    replay_time: std::time::Duration,
}

impl DecodeGraphs {
    /// Graphs for decode steps of up to `max_rows` rows (0: none, every step eager).
    pub fn new(max_rows: usize) -> Self {
        Self {
            buckets: if max_rows == 0 {
                Vec::new()
            } else {
                row_buckets(max_rows)
            },
            inputs: HashMap::new(),
            graphs: HashMap::new(),
            stats: GraphStats::default(),
            replay_time: std::time::Duration::ZERO,
        }
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// The final-normed hidden rows `[chunks, hidden]` of a decode-only step run through the
    /// graph path, or `None` when the step is not one it takes (the caller runs it eagerly).
    /// `adapters[i]` is the LoRA adapter of chunk `i`.
    pub fn decode(
        &mut self,
        model: &DecoderModel,
        plan: &LayerPlan,
        (tokens, adapters): (&[u32], &[Option<Arc<LoraAdapter>>]),
        chunks: &[ChunkRef],
        cache: &mut dyn KvCache,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = chunks.len();
        let eligible = model.device().is_cuda()
            && !crate::engine::instrument::phase_times::enabled()
            && chunks.iter().all(|c| c.len == 1 && !c.scored);
        let Some(&rows) = self.buckets.iter().find(|&&b| b >= n).filter(|_| eligible) else {
            return Ok(None);
        };
        let slots = StepSlots::of(adapters);
        let Some(lora_shape) = slots.graph_shape() else {
            return Ok(None);
        };
        let longest = chunks.iter().map(|c| c.start + 1).max().unwrap_or(1);
        let context = context_bucket(longest);
        let key = (plan.layers().to_vec(), rows, context, lora_shape);
        if !self.graphs.contains_key(&key) && self.graphs.len() >= MAX_GRAPHS {
            return Ok(None);
        }
        let device = model.device().clone();
        let max_plan = model.config().num_hidden_layers;
        let inputs = match self.inputs.entry((rows, context)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Inputs::new(&device, max_plan, rows, context)?)
            }
        };
        let mut ids = vec![0u32; rows];
        ids[..n].copy_from_slice(tokens);
        let mut positions = vec![0u32; rows];
        for (p, c) in positions.iter_mut().zip(chunks) {
            *p = c.start as u32;
        }
        if !cache.begin_padded_decode(chunks, plan.layers().len(), &inputs.kv)? {
            return Ok(None);
        }
        write_into(&inputs.ids, &ids)?;
        write_into(&inputs.positions, &positions)?;
        let lora = inputs.lora_table(slots, max_plan, lora_shape)?;
        let padded: Vec<ChunkRef> = (0..rows)
            .map(|r| ChunkRef {
                seq: chunks.get(r).map_or(u64::MAX, |c| c.seq),
                offset: r,
                len: 1,
                start: positions[r] as usize,
                scored: false,
            })
            .collect();
        let run = |inputs: &mut Inputs, cache: &mut dyn KvCache| -> candle_core::Result<()> {
            let h = model.decode_hidden(
                plan,
                (&inputs.ids, &inputs.positions),
                &padded,
                cache,
                lora.clone(),
            )?;
            match &inputs.out {
                Some(out) => out.slice_set(&h, 0, 0),
                None => {
                    inputs.out = Some(h.copy()?);
                    Ok(())
                }
            }
        };
        let state = self.graphs.remove(&key);
        let next = advance(
            state,
            &device,
            (&mut self.stats, &mut self.replay_time),
            &key,
            || run(&mut *inputs, &mut *cache),
        )?;
        self.graphs.insert(key, next);
        let out = inputs
            .out
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("decode graph: no output buffer".into()))?;
        Ok(Some(out.narrow(0, 0, n)?))
    }
}

/// Runs a key's step by its state and returns the next state: eagerly the first time (`run`),
/// captured the second, replayed after; a capture that fails runs eagerly and stays eager.
fn advance(
    state: Option<State>,
    device: &Device,
    (stats, replay_time): (&mut GraphStats, &mut std::time::Duration),
    key: &GraphKey,
    mut run: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<State> {
    let (rows, context) = (key.1, key.2);
    Ok(match state {
        None => {
            run()?;
            State::Warm
        }
        Some(State::Eager) => {
            run()?;
            State::Eager
        }
        Some(State::Warm) => match capture(device, &mut run) {
            Ok(graph) => {
                graph.launch().map_err(candle_core::Error::wrap)?;
                stats.captures += 1;
                tracing::debug!(
                    rows,
                    context,
                    plan_len = key.0.len(),
                    "decode graph captured"
                );
                State::Captured(Graph(graph))
            }
            Err(e) => {
                tracing::warn!("decode graph capture failed, rows {rows}, context {context}: {e}; running eagerly");
                run()?;
                State::Eager
            }
        },
        Some(State::Captured(graph)) => {
            replay(device, &graph, stats, replay_time)?;
            State::Captured(graph)
        }
    })
}

/// Launches a captured graph. With `PRUNESERVE_GRAPH_TIMES=1` the device is synchronized
/// around it and the mean replay time is logged every 1,000 replays (the GPU time of a
/// decode step's layers, against the step's wall time in the step log).
fn replay(
    device: &Device,
    graph: &Graph,
    stats: &mut GraphStats,
    replay_time: &mut std::time::Duration,
) -> candle_core::Result<()> {
    static TIMED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("PRUNESERVE_GRAPH_TIMES").is_ok_and(|v| v == "1")
    });
    let started = if *TIMED {
        device.synchronize()?;
        Some(Instant::now())
    } else {
        None
    };
    graph.0.launch().map_err(candle_core::Error::wrap)?;
    stats.replays += 1;
    if let Some(started) = started {
        device.synchronize()?;
        *replay_time += started.elapsed();
        if stats.replays.is_multiple_of(1000) {
            let ms = replay_time.as_secs_f64() * 1e3 / 1000.0;
            tracing::info!("decode graphs: {ms:.3} ms per replay over the last 1000");
            *replay_time = std::time::Duration::ZERO;
        }
    }
    Ok(())
}

/// Captures the launches `f` queues on the device's stream into a graph (not yet launched).
/// On any failure the capture is ended and the context's recorded error cleared, so the stream
/// runs eagerly again.
fn capture(
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<()>,
) -> candle_core::Result<CudaGraph> {
    let Device::Cuda(cuda) = device else {
        candle_core::bail!("decode graphs need a CUDA device");
    };
    let stream = cuda.cuda_stream();
    let started = Instant::now();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(candle_core::Error::wrap)?;
    let ran = f();
    let ended = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    // Errors recorded while capturing (frees of an invalidated capture) must not fail later steps.
    let recorded = stream.context().check_err();
    ran?;
    let graph = ended
        .map_err(candle_core::Error::wrap)?
        .ok_or_else(|| candle_core::Error::Msg("the capture recorded nothing".into()))?;
    recorded.map_err(candle_core::Error::wrap)?;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "graph instantiated"
    );
    Ok(graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_row_count_up_to_the_largest() {
        let b = row_buckets(256);
        assert_eq!(&b[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(*b.last().unwrap(), 256);
        for n in 1..=256 {
            let r = b.iter().find(|&&r| r >= n).unwrap();
            assert!(*r - n < 32, "{n} rows padded to {r}");
        }
        assert_eq!(row_buckets(20), vec![1, 2, 4, 8, 16]);
        assert_eq!(context_bucket(1), 256);
        assert_eq!(context_bucket(257), 512);
    }
}
