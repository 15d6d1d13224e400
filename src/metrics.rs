//! Prometheus metrics under vLLM's names with a `pruneserve:` prefix and a `model_name` label.
//!
//! Contract: the label is a request's canonical model name (one series per plan, however it was
//! spelled), and at most [`MAX_AD_HOC_METRIC_SERIES`] ad-hoc plans get their own series; later
//! ones share `<base>@other`, so no client can grow the exposition without bound.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder,
};

use crate::limits::MAX_AD_HOC_METRIC_SERIES;
use crate::registry::{Registry, Resolved};
use crate::scheduler::LoopStats;

pub struct Metrics {
    registry: prometheus::Registry,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    kv_usage: GaugeVec,
    engine_running: IntGaugeVec,
    engine_waiting: IntGaugeVec,
    engine_kv_usage: GaugeVec,
    engine_sequences: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    requests: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    engine_restarts: IntCounterVec,
    preemptions: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    prefix_blocks: IntGaugeVec,
    shared_layer_rows: IntCounterVec,
    prefix_memo_bytes: IntGaugeVec,
    ad_hoc_seen: Mutex<HashSet<String>>,
}

/// Labels of the per-engine gauges.
const ENGINE_LABELS: &[&str] = &["model_name", "engine"];

/// The used share of a loop's KV pool.
fn kv_fraction(s: &LoopStats) -> f64 {
    s.kv.map_or(0.0, |kv| {
        kv.used_blocks as f64 / kv.total_blocks.max(1) as f64
    })
}

/// Brings the counter of `labels` up to `total`, a count the engine loops keep themselves.
fn catch_up(counter: &IntCounterVec, labels: &[&str], total: u64) {
    let c = counter.with_label_values(labels);
    c.inc_by(total.saturating_sub(c.get()));
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = prometheus::Registry::new();
        let label = &["model_name"];
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), label);
        let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), label);
        let hist = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                label,
            )
        };
        let m = Self {
            running: gauge(
                "pruneserve:num_requests_running",
                "Requests holding KV room and running.",
            )?,
            waiting: gauge(
                "pruneserve:num_requests_waiting",
                "Requests waiting for KV room.",
            )?,
            kv_usage: GaugeVec::new(
                Opts::new(
                    "pruneserve:kv_cache_usage_perc",
                    "KV cache usage (1 = full).",
                ),
                label,
            )?,
            engine_running: IntGaugeVec::new(
                Opts::new(
                    "pruneserve:engine_num_requests_running",
                    "Requests running, per engine of a base (--data-parallel).",
                ),
                ENGINE_LABELS,
            )?,
            engine_waiting: IntGaugeVec::new(
                Opts::new(
                    "pruneserve:engine_num_requests_waiting",
                    "Requests waiting for KV room, per engine of a base (--data-parallel).",
                ),
                ENGINE_LABELS,
            )?,
            engine_kv_usage: GaugeVec::new(
                Opts::new(
                    "pruneserve:engine_kv_cache_usage_perc",
                    "KV cache usage per engine of a base (1 = full).",
                ),
                ENGINE_LABELS,
            )?,
            engine_sequences: IntCounterVec::new(
                Opts::new(
                    "pruneserve:engine_sequences_total",
                    "Sequences routed to each engine of a base (--data-parallel).",
                ),
                ENGINE_LABELS,
            )?,
            prompt_tokens: counter("pruneserve:prompt_tokens_total", "Prompt tokens processed.")?,
            generation_tokens: counter("pruneserve:generation_tokens_total", "Tokens generated.")?,
            requests: IntCounterVec::new(
                Opts::new("pruneserve:request_success_total", "Finished requests."),
                &["model_name", "finished_reason"],
            )?,
            ttft: hist(
                "pruneserve:time_to_first_token_seconds",
                "Time to first token.",
            )?,
            itl: hist(
                "pruneserve:inter_token_latency_seconds",
                "Time between generated tokens.",
            )?,
            e2e: hist(
                "pruneserve:e2e_request_latency_seconds",
                "End-to-end request latency.",
            )?,
            engine_restarts: IntCounterVec::new(
                Opts::new(
                    "pruneserve:engine_restarts_total",
                    "Engine loops restarted after a failure.",
                ),
                label,
            )?,
            preemptions: IntCounterVec::new(
                Opts::new(
                    "pruneserve:num_preemptions_total",
                    "Sequences preempted (KV freed, recomputed later).",
                ),
                label,
            )?,
            prefix_queries: IntCounterVec::new(
                Opts::new(
                    "pruneserve:prefix_cache_queries_total",
                    "Prompt tokens looked up in the prefix cache (--enable-prefix-caching).",
                ),
                label,
            )?,
            prefix_hits: IntCounterVec::new(
                Opts::new(
                    "pruneserve:prefix_cache_hits_total",
                    "Prompt tokens found in the prefix cache (not computed).",
                ),
                label,
            )?,
            shared_layer_rows: IntCounterVec::new(
                Opts::new(
                    "pruneserve:shared_prefix_layer_rows_total",
                    "Rows times layers a plan took from another plan's rows fed the same fresh prompt in one step (--enable-prefix-caching).",
                ),
                label,
            )?,
            prefix_blocks: gauge(
                "pruneserve:prefix_cache_blocks",
                "KV blocks held by prefix-cache entries (within the pool's blocks).",
            )?,
            prefix_memo_bytes: gauge(
                "pruneserve:prefix_cache_memo_bytes",
                "Host bytes of the prompt logprobs kept with prefix-cache entries.",
            )?,
            ad_hoc_seen: Mutex::new(HashSet::new()),
            registry,
        };
        m.registry.register(Box::new(m.running.clone()))?;
        m.registry.register(Box::new(m.waiting.clone()))?;
        m.registry.register(Box::new(m.kv_usage.clone()))?;
        m.registry.register(Box::new(m.engine_running.clone()))?;
        m.registry.register(Box::new(m.engine_waiting.clone()))?;
        m.registry.register(Box::new(m.engine_kv_usage.clone()))?;
        m.registry.register(Box::new(m.engine_sequences.clone()))?;
        m.registry.register(Box::new(m.prompt_tokens.clone()))?;
        m.registry.register(Box::new(m.generation_tokens.clone()))?;
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.ttft.clone()))?;
        m.registry.register(Box::new(m.itl.clone()))?;
        m.registry.register(Box::new(m.e2e.clone()))?;
        m.registry.register(Box::new(m.engine_restarts.clone()))?;
        m.registry.register(Box::new(m.prefix_queries.clone()))?;
        m.registry.register(Box::new(m.prefix_hits.clone()))?;
        m.registry.register(Box::new(m.prefix_blocks.clone()))?;
        m.registry.register(Box::new(m.shared_layer_rows.clone()))?;
        m.registry.register(Box::new(m.prefix_memo_bytes.clone()))?;
        m.registry.register(Box::new(m.preemptions.clone()))?;
        Ok(m)
    }

    /// The `model_name` label of a resolved request.
    pub fn label(&self, target: &Resolved) -> String {
        if !target.ad_hoc {
            return target.name.clone();
        }
        let mut seen = self.ad_hoc_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&target.name) || seen.len() < MAX_AD_HOC_METRIC_SERIES {
            seen.insert(target.name.clone());
            target.name.clone()
        } else {
            format!("{}@other", target.base.name)
        }
    }

    pub fn count_prompt(&self, model: &str, tokens: usize) {
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(tokens as u64);
    }

    pub fn count_generated(&self, model: &str, tokens: usize, elapsed: Duration) {
        self.generation_tokens
            .with_label_values(&[model])
            .inc_by(tokens as u64);
        self.e2e
            .with_label_values(&[model])
            .observe(elapsed.as_secs_f64());
    }

    pub fn count_finished(&self, model: &str, reason: &str) {
        self.requests.with_label_values(&[model, reason]).inc();
    }

    pub fn observe_ttft(&self, model: &str, d: Duration) {
        self.ttft
            .with_label_values(&[model])
            .observe(d.as_secs_f64());
    }

    pub fn observe_itl(&self, model: &str, d: Duration) {
        self.itl
            .with_label_values(&[model])
            .observe(d.as_secs_f64());
    }

    /// The text exposition, with engine gauges refreshed from each base's loop.
    pub fn render(&self, registry: &Registry) -> String {
        for base in registry.bases() {
            let s = base.scheduler.stats();
            let kv = s.kv.unwrap_or_default();
            for (gauge, value) in [
                (&self.running, s.running),
                (&self.waiting, s.waiting),
                (&self.prefix_blocks, kv.cached_blocks),
                (&self.prefix_memo_bytes, kv.memo_bytes),
            ] {
                gauge.with_label_values(&[&base.name]).set(value as i64);
            }
            self.kv_usage
                .with_label_values(&[&base.name])
                .set(kv_fraction(&s));
            for e in base.scheduler.per_engine() {
                let labels = [base.name.as_str(), e.label];
                self.engine_running
                    .with_label_values(&labels)
                    .set(e.stats.running as i64);
                self.engine_waiting
                    .with_label_values(&labels)
                    .set(e.stats.waiting as i64);
                self.engine_kv_usage
                    .with_label_values(&labels)
                    .set(kv_fraction(&e.stats));
                catch_up(&self.engine_sequences, &labels, e.routed);
            }
            let shared = s.prefix_cache;
            for (counter, total) in [
                (&self.engine_restarts, s.restarts),
                (&self.preemptions, s.preemptions),
                (&self.prefix_queries, shared.queried_tokens),
                (&self.prefix_hits, shared.hit_tokens),
                (&self.shared_layer_rows, shared.shared_layer_rows),
            ] {
                catch_up(counter, &[&base.name], total);
            }
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("metrics encoding failed: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Times and counts one request's generation, from the engine side's output step.
pub struct RequestObserver {
    metrics: Arc<Metrics>,
    label: String,
    started: Instant,
    last_token: Option<Instant>,
}

impl RequestObserver {
    pub fn new(metrics: Arc<Metrics>, label: String, started: Instant) -> Self {
        Self {
            metrics,
            label,
            started,
            last_token: None,
        }
    }

    /// A token was generated now (time to first token, then inter-token latency).
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.observe_ttft(&self.label, now - self.started),
            Some(t) => self.metrics.observe_itl(&self.label, now - t),
        }
        self.last_token = Some(now);
    }

    /// The request finished with `tokens` generated.
    pub fn finished(&self, tokens: usize, reason: &str) {
        self.metrics
            .count_generated(&self.label, tokens, self.started.elapsed());
        self.metrics.count_finished(&self.label, reason);
    }
}
