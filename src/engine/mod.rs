//! The inference engine: model weights, KV cache and sampler behind a batched step API. A step runs
//! prefill chunks and decode tokens of many sequences at once; sequences join and leave between
//! steps and may run different layer plans of the same base.

pub mod adapters;
pub mod attention;
pub mod batch;
#[cfg(feature = "cuda")]
pub mod graphs;
pub mod instrument;
pub mod kv;
pub mod model;
pub mod ops;
mod outputs;
mod prefix_reuse;
pub mod sample;
mod shared_prefix;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::plan::LayerPlan;
use adapters::{LoraAdapter, StepLora};
use instrument::taps::LayerTap;
use kv::{ChunkRef, KvCache, KvError, KvUsage};
use model::overlay::ModelOverlay;
use model::DecoderModel;
use model::Extras;
use sample::sampler::Sampled;
use sample::scoring::TokenScore;

/// Identifies a sequence inside one engine.
pub type SeqId = u64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("context too long: {len} tokens requested, the model's limit is {max}")]
    ContextTooLong { len: usize, max: usize },
    #[error("token id {id} is out of range (vocabulary size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the plan is over a {plan}-layer base but the model has {model} layers")]
    PlanMismatch { plan: usize, model: usize },
    #[error("empty input for sequence {0}")]
    EmptyInput(SeqId),
    #[error("sequence {seq}: {targets} score targets for {tokens} tokens")]
    ScoreTargets {
        seq: SeqId,
        targets: usize,
        tokens: usize,
    },
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("tensor computation failed: {0}")]
    Compute(#[source] Arc<candle_core::Error>),
    #[error("sequence {0} was not run")]
    NotRun(SeqId),
    #[error("sequence {0} was lost")]
    Lost(SeqId),
    /// A panic in the engine loop failed the sequences in flight; the loop was restarted.
    #[error("the engine failed while running this request and was restarted: {0}")]
    Crashed(String),
    /// The base's engine is not running (see `/health`).
    #[error("the engine is unavailable: {0}")]
    Unavailable(String),
    #[error("cannot start an engine thread: {0}")]
    Thread(#[source] Arc<std::io::Error>),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Compute(Arc::new(e))
    }
}

/// Capacity settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Longest sequence accepted; defaults to the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// On CUDA: bytes of the paged KV pool (replaces `kv_blocks`).
    pub kv_cache_bytes: Option<usize>,
    /// Keep finished sequences' prefixes for reuse ([`kv::prefix`]; both caches).
    pub prefix_caching: bool,
    /// On CUDA: draw sampled tokens on the device (`serve --sampler`).
    pub device_sampling: bool,
    /// On CUDA: decode steps of up to this many rows replay captured graphs ([`graphs`]); 0
    /// runs every step eagerly (`serve --enforce-eager`).
    pub cuda_graph_max_batch: usize,
    /// What the KV cache holds (`serve --kv-cache-dtype`).
    pub kv_cache_dtype: kv::fp8::KvCacheDtype,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kv_blocks: 4096,
            block_size: 16,
            max_model_len: None,
            kv_cache_bytes: None,
            prefix_caching: false,
            device_sampling: false,
            cuda_graph_max_batch: 256,
            kv_cache_dtype: kv::fp8::KvCacheDtype::Auto,
        }
    }
}

/// Score these targets at the item's positions (`targets[i]` follows `tokens[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSpec {
    pub targets: Vec<u32>,
    pub top_k: usize,
}

/// One sequence's work in a step: feed `tokens`, optionally score them, optionally return the
/// last position's logits (for sampling).
#[derive(Debug, Clone)]
pub struct StepItem {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub score: Option<ScoreSpec>,
    pub want_logits: bool,
    /// With `want_logits`: pick the argmax on the device and return it (with its logprob and
    /// this many top logprobs) instead of the logits row, so only a few numbers leave the device.
    pub greedy_top: Option<usize>,
    /// With `want_logits` and no `greedy_top`: draw the next token on the device with these
    /// settings (only when [`Engine::draws_on_device`]) instead of returning the logits row.
    pub draw: Option<sample::sampler::DeviceDraw>,
}

#[derive(Debug, Clone)]
pub struct StepOutput {
    pub seq: SeqId,
    pub scores: Vec<TokenScore>,
    pub logits: Option<Vec<f32>>,
    /// The token picked on the device: the greedy pick of items with `greedy_top`, the draw of
    /// items with `draw`.
    pub greedy: Option<Sampled>,
}

/// What a sequence runs: a plan over the base's layers, optionally through an overlay's
/// replacement tensors and a LoRA adapter.
#[derive(Clone)]
pub struct RunSpec {
    pub plan: Arc<LayerPlan>,
    pub overlay: Option<Arc<ModelOverlay>>,
    pub lora: Option<Arc<LoraAdapter>>,
}

impl From<Arc<LayerPlan>> for RunSpec {
    fn from(plan: Arc<LayerPlan>) -> Self {
        Self {
            plan,
            overlay: None,
            lora: None,
        }
    }
}

impl RunSpec {
    /// Sequences that can share one packed forward: the same plan and the same overlay (adapters
    /// mix within a forward).
    fn same_forward(&self, other: &RunSpec) -> bool {
        let same_overlay = match (&self.overlay, &other.overlay) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_overlay && (Arc::ptr_eq(&self.plan, &other.plan) || *self.plan == *other.plan)
    }
}

struct SeqState {
    spec: RunSpec,
    len: usize,
}

pub struct Engine {
    model: Arc<DecoderModel>,
    cache: Box<dyn KvCache>,
    seqs: HashMap<SeqId, SeqState>,
    max_len: usize,
    /// Prompt tokens looked up in the prefix cache, and those found.
    prefix_queries: u64,
    prefix_hits: u64,
    device_sampling: bool,
    /// Fresh prompts of plans sharing leading layers run those layers once per step
    /// ([`shared_prefix`]; with prefix caching, on caches that can share KV).
    share_hidden: bool,
    /// Rows times plan positions not recomputed thanks to that.
    shared_layer_rows: u64,
    #[cfg(feature = "cuda")]
    graphs: graphs::DecodeGraphs,
}

impl Engine {
    pub fn new(model: Arc<DecoderModel>, cache: Box<dyn KvCache>, opts: &EngineOptions) -> Self {
        let model_max = model.config().max_position_embeddings;
        let max_len = opts.max_model_len.map_or(model_max, |m| m.min(model_max));
        Self {
            model,
            share_hidden: opts.prefix_caching && cache.shares_kv(),
            shared_layer_rows: 0,
            cache,
            seqs: HashMap::new(),
            max_len,
            prefix_queries: 0,
            prefix_hits: 0,
            device_sampling: opts.device_sampling,
            #[cfg(feature = "cuda")]
            graphs: graphs::DecodeGraphs::new(opts.cuda_graph_max_batch),
        }
    }

    /// What decode steps did on the graph path (CUDA).
    #[cfg(feature = "cuda")]
    pub fn graph_stats(&self) -> graphs::GraphStats {
        self.graphs.stats()
    }

    /// Whether step items may carry a [`StepItem::draw`] (CUDA with `device_sampling`).
    pub fn draws_on_device(&self) -> bool {
        self.device_sampling && self.model.device().is_cuda()
    }

    /// An engine with the CPU KV cache.
    pub fn with_contiguous_cache(model: Arc<DecoderModel>, opts: &EngineOptions) -> Self {
        let mut cache = kv::ContiguousKvCache::new(opts.kv_blocks, opts.block_size, model.dtype())
            .with_kv_dtype(opts.kv_cache_dtype);
        if opts.prefix_caching {
            cache = cache.with_prefix_caching();
        }
        Self::new(model, Box::new(cache), opts)
    }

    /// The paged cache on a CUDA model (with the `cuda` feature), the contiguous one otherwise.
    pub fn for_device(model: Arc<DecoderModel>, opts: &EngineOptions) -> Result<Self, EngineError> {
        #[cfg(feature = "cuda")]
        if model.device().is_cuda() {
            let cfg = model.config();
            let (kv_heads, head_dim) = (cfg.num_key_value_heads, cfg.head_dim);
            let stored = opts.kv_cache_dtype.storage(model.dtype(), model.device());
            let blocks = match opts.kv_cache_bytes {
                Some(bytes) => kv::paged::PagedKvCache::blocks_for_bytes(
                    bytes,
                    opts.block_size,
                    kv_heads,
                    head_dim,
                    stored,
                ),
                None => opts.kv_blocks * cfg.num_hidden_layers,
            };
            let mut cache = kv::paged::PagedKvCache::new(
                model.device(),
                (model.dtype(), stored),
                blocks,
                opts.block_size,
                kv_heads,
                head_dim,
            )?;
            if opts.prefix_caching {
                cache = cache.with_prefix_caching();
            }
            return Ok(Self::new(model, Box::new(cache), opts));
        }
        Ok(Self::with_contiguous_cache(model, opts))
    }

    pub fn model(&self) -> &Arc<DecoderModel> {
        &self.model
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn kv_usage(&self) -> KvUsage {
        self.cache.usage()
    }

    pub fn kv_capacity(&self) -> kv::KvCapacity {
        self.cache.capacity()
    }

    /// Reserves KV room for `total_len` tokens of `seq` up front (admission control), or fails
    /// without side effects.
    pub fn reserve(&mut self, seq: SeqId, total_len: usize) -> Result<(), EngineError> {
        Ok(self.cache.reserve(seq, total_len)?)
    }

    /// Registers a sequence that will run `spec` (a plan, or a plan with extras).
    pub fn add_sequence(
        &mut self,
        seq: SeqId,
        spec: impl Into<RunSpec>,
    ) -> Result<(), EngineError> {
        let spec = spec.into();
        let layers = self.model.config().num_hidden_layers;
        if spec.plan.base_layers() != layers {
            return Err(EngineError::PlanMismatch {
                plan: spec.plan.base_layers(),
                model: layers,
            });
        }
        self.cache.allocate(seq, spec.plan.layers().len())?;
        self.seqs.insert(seq, SeqState { spec, len: 0 });
        Ok(())
    }

    /// Frees a sequence and its KV blocks.
    pub fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
        self.cache.release(seq);
    }

    /// Checks an item and reserves its KV room.
    fn admit(&mut self, item: &StepItem) -> Result<(), EngineError> {
        let vocab = self.model.config().vocab_size;
        let state = self
            .seqs
            .get(&item.seq)
            .ok_or(KvError::UnknownSequence(item.seq))?;
        if item.tokens.is_empty() {
            return Err(EngineError::EmptyInput(item.seq));
        }
        if let Some(&id) = item.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { id, vocab });
        }
        if let Some(s) = &item.score {
            if s.targets.len() > item.tokens.len() {
                return Err(EngineError::ScoreTargets {
                    seq: item.seq,
                    targets: s.targets.len(),
                    tokens: item.tokens.len(),
                });
            }
            if let Some(&id) = s.targets.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange { id, vocab });
            }
        }
        let total = state.len + item.tokens.len();
        if total > self.max_len {
            return Err(EngineError::ContextTooLong {
                len: total,
                max: self.max_len,
            });
        }
        self.cache.reserve(item.seq, total)?;
        Ok(())
    }

    /// Runs one step. Results come back in item order; a failing item does not affect the others.
    pub fn step(&mut self, items: &[StepItem]) -> Vec<Result<StepOutput, EngineError>> {
        self.step_with_tap(items, None)
    }

    pub fn step_with_tap<'t>(
        &mut self,
        items: &[StepItem],
        mut tap: Option<&mut (dyn LayerTap + 't)>,
    ) -> Vec<Result<StepOutput, EngineError>> {
        let mut results: Vec<Option<Result<StepOutput, EngineError>>> = items
            .iter()
            .map(|it| self.admit(it).err().map(Err))
            .collect();
        // Group admitted items by plan and overlay: one packed forward each.
        let mut groups: Vec<(RunSpec, Vec<usize>)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let spec = &self.seqs[&it.seq].spec;
            match groups.iter_mut().find(|(s, _)| s.same_forward(spec)) {
                Some((_, members)) => members.push(i),
                None => groups.push((spec.clone(), vec![i])),
            }
        }
        let share = self.plan_sharing(items, &groups, tap.is_none());
        let mut captured: HashMap<(usize, usize), Tensor> = HashMap::new();
        for &g in &share.order {
            let (spec, members) = &groups[g];
            let (forked, whole): (Vec<usize>, Vec<usize>) = members
                .iter()
                .copied()
                .partition(|i| share.forks.contains_key(i));
            let mut capture = share.captures_from(spec, items, &whole);
            let t: Option<&mut dyn LayerTap> = if capture.is_empty() {
                tap.as_deref_mut()
            } else {
                Some(&mut capture)
            };
            let outcome = self.run_group(spec, items, &whole, t, None);
            self.record(items, &whole, outcome, &mut results);
            captured.extend(capture.got.drain());
            let (runs, unshared) = self.fork_runs(items, &forked, &share, &captured);
            for run in runs {
                let start = Some((run.depth, &run.hidden));
                let outcome = self.run_group(spec, items, &run.items, None, start);
                self.record(items, &run.items, outcome, &mut results);
            }
            let outcome = self.run_group(spec, items, &unshared, None, None);
            self.record(items, &unshared, outcome, &mut results);
        }
        results
            .into_iter()
            .zip(items)
            .map(|(r, it)| r.unwrap_or(Err(EngineError::NotRun(it.seq))))
            .collect()
    }

    /// Stores a group's outcome per item (and advances the sequences that ran).
    fn record(
        &mut self,
        items: &[StepItem],
        members: &[usize],
        outcome: Result<Vec<StepOutput>, EngineError>,
        results: &mut [Option<Result<StepOutput, EngineError>>],
    ) {
        match outcome {
            Ok(outs) => {
                for (i, out) in members.iter().zip(outs) {
                    if let Some(s) = self.seqs.get_mut(&items[*i].seq) {
                        s.len += items[*i].tokens.len();
                    }
                    results[*i] = Some(Ok(out));
                }
            }
            Err(e) => {
                for i in members {
                    results[*i] = Some(Err(e.clone()));
                }
            }
        }
    }

    /// The hidden rows of a plain decode step through a captured graph ([`graphs`]), or `None`
    /// when it runs eagerly.
    fn decode_graphed(
        &mut self,
        plan: &LayerPlan,
        rows: (&[u32], &[Option<Arc<LoraAdapter>>]),
        chunks: &[ChunkRef],
    ) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        {
            self.graphs
                .decode(&self.model, plan, rows, chunks, self.cache.as_mut())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (plan, rows, chunks);
            Ok(None)
        }
    }

    /// One packed forward of `members` (same plan and overlay), from the embeddings or, with
    /// `start = (depth, x)`, from hidden states `x` after the plan's first `depth` positions.
    fn run_group<'t>(
        &mut self,
        spec: &RunSpec,
        items: &[StepItem],
        members: &[usize],
        tap: Option<&mut (dyn LayerTap + 't)>,
        start: Option<(usize, &Tensor)>,
    ) -> Result<Vec<StepOutput>, EngineError> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut tokens = Vec::new();
        let mut chunks = Vec::with_capacity(members.len());
        let mut row_adapters = Vec::new();
        for &i in members {
            let it = &items[i];
            let seq = &self.seqs[&it.seq];
            chunks.push(ChunkRef {
                seq: it.seq,
                offset: tokens.len(),
                len: it.tokens.len(),
                start: seq.len,
                scored: it.score.is_some(),
            });
            tokens.extend_from_slice(&it.tokens);
            row_adapters.extend(std::iter::repeat_n(&seq.spec.lora, it.tokens.len()).cloned());
        }
        let plain = tap.is_none() && start.is_none() && spec.overlay.is_none();
        let graphed = match plain {
            true => self.decode_graphed(&spec.plan, (&tokens, &row_adapters), &chunks)?,
            false => None,
        };
        let hidden = match graphed {
            Some(hidden) => hidden,
            None => {
                let extras = Extras {
                    overlay: spec.overlay.as_deref(),
                    lora: StepLora::new(&row_adapters, self.model.device())?,
                };
                self.model.forward_hidden(
                    &spec.plan,
                    &tokens,
                    &chunks,
                    self.cache.as_mut(),
                    &extras,
                    tap,
                    start,
                )?
            }
        };
        Ok(outputs::step_outputs(
            &self.model,
            spec,
            items,
            members,
            &chunks,
            &hidden,
        )?)
    }
}
