//! `pruneserve bench`: prefill and decode throughput of a model at several batch sizes, for the
//! full plan and a reverse-pruned plan, measured in one run so the ratios are like for like.
//! Beside the decode figure (the generating run's time less the prefill-only run's, which at
//! large batches and long prompts also counts decode rows riding in prompt steps), the decode-only
//! steps of the generating runs: their time per step, rows per step and rows per second, the
//! steady decode rate serving sees.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::adapters::LoraAdapter;
use crate::engine::batch::{Batcher, GenRequest};
use crate::engine::instrument::phase_times;
use crate::engine::instrument::step_stats::DecodeOnly;
use crate::engine::model::DecoderModel;
use crate::engine::sample::sampler::SamplingParams;
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::plan::{LayerPlan, PlanSpec};

#[derive(Debug, Clone)]
pub struct BenchRow {
    pub plan: String,
    pub batch: usize,
    pub prefill_tok_s: f64,
    /// `None` when the generating run took no longer than the prefill-only one (decode time
    /// lost in the noise, e.g. with very few generated tokens).
    pub decode_tok_s: Option<f64>,
    /// Decode-only steps of the generating runs (`steps` 0: none ran).
    pub decode_steps: DecodeOnly,
}

fn requests(
    plan: &(Arc<LayerPlan>, Option<Arc<LoraAdapter>>),
    batch: usize,
    prompt_len: usize,
    gen: usize,
    vocab: usize,
) -> Vec<GenRequest> {
    (0..batch)
        .map(|b| GenRequest {
            plan: plan.0.clone(),
            overlay: None,
            lora: plan.1.clone(),
            prompt: (0..prompt_len)
                .map(|i| ((i * 7919 + b * 104_729 + 13) % vocab) as u32)
                .collect(),
            max_tokens: gen,
            sampling: SamplingParams::greedy(),
            prompt_logprobs: None,
            stop_token_ids: Vec::new(),
            eos_token_ids: Vec::new(),
            ignore_eos: true,
        })
        .collect()
}

/// Each figure is the best of this many runs.
const REPEATS: usize = 2;

/// The work of one measurement: `prompt_len`-token prompts, `gen` generated tokens each, at most
/// `step_tokens` tokens per engine step.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub prompt_len: usize,
    pub gen: usize,
    pub step_tokens: usize,
}

/// Times prefill alone (`max_tokens = 0`), then prefill + `gen` decode steps; decode throughput is
/// the difference. With phase times on (see [`crate::engine::instrument::phase_times`]) each row's phases
/// are printed as it completes. With `lora`, the pruned plan is measured a second time with the
/// adapter on every request. `opts` are the engines' options (`--enforce-eager` sets
/// `cuda_graph_max_batch` to 0).
pub fn run(
    model: Arc<DecoderModel>,
    batches: &[usize],
    shape: Shape,
    reverse: f64,
    lora: Option<Arc<LoraAdapter>>,
    opts: &EngineOptions,
) -> Result<Vec<BenchRow>, EngineError> {
    let Shape {
        prompt_len,
        gen,
        step_tokens,
    } = shape;
    let layers = model.config().num_hidden_layers;
    let vocab = model.config().vocab_size;
    let pruned = PlanSpec::Reverse(reverse).resolve(layers)?;
    let pruned = Arc::new(pruned);
    let mut plans = vec![
        (
            "full".to_string(),
            (Arc::new(LayerPlan::full(layers)), None),
        ),
        (format!("reverse {reverse}"), (pruned.clone(), None)),
    ];
    if let Some(l) = lora {
        plans.push((format!("reverse {reverse} + adapter"), (pruned, Some(l))));
    }
    let mut rows = Vec::new();
    for (name, plan) in &plans {
        for &batch in batches {
            let mut batcher = Batcher::new(Engine::for_device(model.clone(), opts)?, step_tokens);
            // Warm-up.
            batcher
                .run_all(requests(plan, 1, 8, 2, vocab))
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            let mut timed = |gen: usize| -> Result<(f64, DecodeOnly), EngineError> {
                let (mut best, before) = (f64::INFINITY, batcher.decode_only_steps());
                for _ in 0..REPEATS {
                    let t = Instant::now();
                    batcher
                        .run_all(requests(plan, batch, prompt_len, gen, vocab))
                        .into_iter()
                        .collect::<Result<Vec<_>, _>>()?;
                    best = best.min(t.elapsed().as_secs_f64());
                }
                Ok((best, batcher.decode_only_steps().since(&before)))
            };
            phase_times::take_report();
            let (prefill, _) = timed(0)?;
            let (generating, decode_steps) = timed(gen)?;
            let decode = generating - prefill;
            for line in phase_times::take_report() {
                println!("{name} batch {batch}: {line}");
            }
            rows.push(BenchRow {
                plan: name.clone(),
                batch,
                prefill_tok_s: (batch * prompt_len) as f64 / prefill,
                decode_tok_s: (decode > 0.0).then(|| (batch * gen) as f64 / decode),
                decode_steps,
            });
        }
    }
    Ok(rows)
}

/// "ms per step × rows per step (rows per second)" of decode-only steps.
fn describe_steps(d: &DecodeOnly) -> String {
    if d.steps == 0 || d.seconds <= 0.0 {
        return "none".into();
    }
    let n = d.steps as f64;
    format!(
        "{:.2} ms × {:.1} rows ({:.0} tok/s)",
        1e3 * d.seconds / n,
        d.rows as f64 / n,
        d.rows as f64 / d.seconds
    )
}

/// A markdown table with pruned/full ratios.
pub fn report(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| plan | batch | prefill tok/s | decode tok/s | decode-only steps |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.0} | {} | {} |\n",
            r.plan,
            r.batch,
            r.prefill_tok_s,
            r.decode_tok_s
                .map_or("n/a (within the prefill run's noise)".into(), |d| format!(
                    "{d:.1}"
                )),
            describe_steps(&r.decode_steps)
        );
    }
    let full: Vec<&BenchRow> = rows.iter().filter(|r| r.plan == "full").collect();
    for r in rows.iter().filter(|r| r.plan != "full") {
        if let Some(f) = full.iter().find(|f| f.batch == r.batch) {
            let decode = match (r.decode_tok_s, f.decode_tok_s) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b),
                _ => "n/a".into(),
            };
            s += &format!(
                "\n{} / full at batch {}: prefill {:.2}x, decode {decode}",
                r.plan,
                r.batch,
                r.prefill_tok_s / f.prefill_tok_s,
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_marks_unmeasurable_decode_instead_of_dividing_by_noise() {
        let row = |plan: &str, decode| BenchRow {
            plan: plan.into(),
            batch: 4,
            prefill_tok_s: 100.0,
            decode_tok_s: decode,
            decode_steps: DecodeOnly {
                steps: 4,
                seconds: 0.02,
                rows: 12,
            },
        };
        let s = report(&[row("full", Some(10.0)), row("reverse 0.25", None)]);
        assert!(
            s.contains("| full | 4 | 100 | 10.0 | 5.00 ms × 3.0 rows (600 tok/s) |"),
            "{s}"
        );
        assert!(s.contains("| reverse 0.25 | 4 | 100 | n/a"), "{s}");
        assert!(s.contains("prefill 1.00x, decode n/a"), "{s}");
        let s = report(&[row("full", Some(10.0)), row("reverse 0.25", Some(13.0))]);
        assert!(s.contains("decode 1.30x"), "{s}");
    }
}
