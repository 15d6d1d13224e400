//! `pruneval ablate`: layer ablations through a server's ad-hoc plans (`model@drop=...`), so no
//! checkpoint is written. The single-layer sweep drops every layer except the first alone; the
//! paper's iterative greedy pruning repeats the sweep on the current plan and keeps the best
//! candidate each iteration (its first iteration is the sweep).
//!
//! Contract:
//! - A candidate's score is the mean over tasks of its metric divided by the unablated model's
//!   (tasks whose baseline is 0 cannot be a ratio and are left out, said in the report; when
//!   every task's baseline is 0 the score is the mean raw metric, said on stderr and in the
//!   report); the best candidate has the highest score, ties to the later layer.
//! - Every response goes through the client's cache, so an interrupted or repeated run resends
//!   nothing it already has; each candidate's task results are written like `pruneval eval`'s.

mod charts;
pub mod report;

use std::path::PathBuf;

use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::eval::{self, Loaded, TaskSelection};
use crate::generation::GenSettings;

pub use report::write_reports;

#[derive(Debug, clap::Args)]
pub struct AblateSettings {
    #[arg(long)]
    pub base_url: String,
    /// A served model (a base or a plan variant); candidates drop layers from its plan.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Greedy iterations; 1 is the single-layer sweep.
    #[arg(long, default_value_t = 1)]
    pub iterations: usize,
    /// Items per task: a count or a fraction (the paper: 100).
    #[arg(long)]
    pub limit: Option<f64>,
    /// Items are a seeded sample (the paper: 1234); without it the first `--limit` items.
    #[arg(long)]
    pub sample_seed: Option<u64>,
    /// Only these base layers are candidates (e.g. `20-29`); default every layer of the plan
    /// except base layer 0.
    #[arg(long)]
    pub candidates: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "results")]
    pub out_dir: PathBuf,
    #[arg(long, default_value = "results/.cache")]
    pub cache_dir: PathBuf,
    /// Requests in flight per candidate evaluation.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Candidates evaluated at once (each with --concurrency requests in flight). For
    /// multiple-choice tasks each item's requests for all of them are sent together, so a
    /// pruneserve server with --enable-prefix-caching runs their common leading layers once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel_candidates: u16,
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Generative tasks' sampling (the paper: T 0.9, top_p 1, top_k 50, seed 1234).
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 50)]
    pub top_k: u32,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AblateError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("task {task}: {error}")]
    Task {
        task: String,
        error: crate::tasks::TaskError,
    },
    #[error("{0}")]
    Usage(String),
    #[error("writing {path}: {error}")]
    Write { path: PathBuf, error: String },
}

/// One task's metric on a model.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TaskScore {
    pub task: String,
    pub metric: String,
    pub value: f64,
}

/// A candidate: the plan with one more layer dropped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Candidate {
    pub layer: usize,
    pub model: String,
    pub tasks: Vec<TaskScore>,
    /// Mean over tasks of the metric divided by the baseline's.
    pub score: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Iteration {
    /// 1-based; iteration 1 is the single-layer sweep.
    pub iteration: usize,
    pub candidates: Vec<Candidate>,
    pub chosen: usize,
    /// Layers dropped after this iteration, in the order chosen.
    pub dropped: Vec<usize>,
    /// The served name of the plan after this iteration.
    pub model: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ablation {
    pub model: String,
    pub baseline: Vec<TaskScore>,
    /// Tasks left out of the ratios because the baseline scores 0 on them.
    pub zero_baseline_tasks: Vec<String>,
    pub items_per_task: Vec<(String, usize)>,
    pub iterations: Vec<Iteration>,
    /// Requests this run sent (cached answers excluded; the `/v1/models` listing included).
    #[serde(skip)]
    pub requests_sent: usize,
}

/// `model@drop=a,b,c` (the server makes it canonical).
pub fn plan_name(model: &str, dropped: &[usize]) -> String {
    if dropped.is_empty() {
        return model.to_string();
    }
    let mut d = dropped.to_vec();
    d.sort_unstable();
    let list: Vec<String> = d.iter().map(usize::to_string).collect();
    format!("{model}@drop={}", list.join(","))
}

/// The index of the best score, ties to the later candidate.
pub fn best_candidate(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s >= scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// Mean over the usable tasks of `value / baseline`; the mean raw value when no task has a
/// baseline above 0.
pub fn relative_score(tasks: &[TaskScore], baseline: &[TaskScore]) -> f64 {
    let ratios: Vec<f64> = tasks
        .iter()
        .zip(baseline)
        .filter(|(_, b)| b.value > 0.0)
        .map(|(t, b)| t.value / b.value)
        .collect();
    if ratios.is_empty() {
        return tasks.iter().map(|t| t.value).sum::<f64>() / tasks.len().max(1) as f64;
    }
    ratios.iter().sum::<f64>() / ratios.len() as f64
}

/// Parses a layer list such as `3,5,20-29`.
pub fn parse_layers(text: &str) -> Result<Vec<usize>, AblateError> {
    let bad = || AblateError::Usage(format!("--candidates `{text}` must look like 3,5,20-29"));
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 100_000 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The layers the served model runs (`kept_layers` of its `/v1/models` card).
fn kept_layers(client: &Client, model: &str) -> Result<Vec<usize>, AblateError> {
    let models = client.get("/v1/models")?;
    let card = models["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == model))
        .ok_or_else(|| AblateError::Usage(format!("the server does not serve `{model}`")))?;
    serde_json::from_value(card["kept_layers"].clone()).map_err(|_| {
        AblateError::Usage(format!(
            "`{model}` has no kept_layers in /v1/models: a pruneserve server is needed"
        ))
    })
}

struct Runner<'a> {
    client: &'a Client,
    settings: &'a AblateSettings,
    gen: GenSettings,
    tasks: Vec<(String, Loaded)>,
}

impl Runner<'_> {
    /// Every task on `model`; each result is written like `pruneval eval`'s.
    fn score(&self, model: &str) -> Result<Vec<TaskScore>, AblateError> {
        let mut scores = self.score_together(&[model.to_string()])?;
        Ok(scores.pop().unwrap_or_default())
    }

    /// Every task on all `models` at once (a choice task sends each item's requests for all of
    /// them together, so plans fed the same prompt can meet in one engine step); per model.
    fn score_together(&self, models: &[String]) -> Result<Vec<Vec<TaskScore>>, AblateError> {
        let mut out = vec![Vec::new(); models.len()];
        for (task, docs) in &self.tasks {
            let results = eval::run_loaded_together(
                self.client,
                models,
                task,
                docs,
                &self.gen,
                self.settings.concurrency,
            )?;
            for (r, scores) in results.iter().zip(&mut out) {
                let path = eval::result_path(&self.settings.out_dir, &r.model, task);
                eval::write_result(&self.settings.out_dir, r).map_err(|e| AblateError::Write {
                    path,
                    error: e.to_string(),
                })?;
                scores.push(TaskScore {
                    task: task.clone(),
                    metric: r.metrics[0].clone(),
                    value: r.acc,
                });
            }
        }
        Ok(out)
    }
}

fn load_tasks(settings: &AblateSettings) -> Result<Vec<(String, Loaded)>, AblateError> {
    let selection = TaskSelection {
        data_dir: settings.data_dir.clone(),
        hub_cache: settings.cache_dir.join("hub-data"),
        limit: settings.limit,
        num_fewshot: settings.num_fewshot,
        sample_seed: settings.sample_seed,
    };
    settings
        .tasks
        .iter()
        .map(|t| {
            eval::load_task(t, &selection)
                .map(|docs| (t.clone(), docs))
                .map_err(|error| AblateError::Task {
                    task: t.clone(),
                    error,
                })
        })
        .collect()
}

/// The candidate layers: the model's kept layers, limited by `--candidates` (default: all but
/// base layer 0), at least one per iteration.
fn candidate_pool(client: &Client, settings: &AblateSettings) -> Result<Vec<usize>, AblateError> {
    let kept = kept_layers(client, &settings.model)?;
    let allowed = match &settings.candidates {
        Some(list) => parse_layers(list)?,
        None => kept.iter().copied().filter(|&l| l != 0).collect(),
    };
    let pool: Vec<usize> = kept.into_iter().filter(|l| allowed.contains(l)).collect();
    if pool.len() < settings.iterations {
        return Err(AblateError::Usage(format!(
            "{} candidate layers for {} iterations",
            pool.len(),
            settings.iterations
        )));
    }
    Ok(pool)
}

impl Runner<'_> {
    /// One greedy iteration: every layer of `pool` dropped on top of `dropped`.
    fn iteration(
        &self,
        iteration: usize,
        pool: &[usize],
        dropped: &[usize],
        baseline: &[TaskScore],
    ) -> Result<Iteration, AblateError> {
        let mut candidates = Vec::with_capacity(pool.len());
        for group in pool.chunks(usize::from(self.settings.parallel_candidates.max(1))) {
            let plans: Vec<(usize, String)> = group
                .iter()
                .map(|&layer| {
                    let plan: Vec<usize> = dropped.iter().copied().chain([layer]).collect();
                    (layer, plan_name(&self.settings.model, &plan))
                })
                .collect();
            let models: Vec<String> = plans.iter().map(|(_, m)| m.clone()).collect();
            let scored = self
                .score_together(&models)?
                .into_iter()
                .zip(plans)
                .map(|(tasks, (layer, model))| Ok::<_, AblateError>((layer, model, tasks)));
            for result in scored {
                let (layer, model, tasks) = result?;
                let score = relative_score(&tasks, baseline);
                candidates.push(Candidate {
                    layer,
                    model,
                    tasks,
                    score,
                });
            }
        }
        let scores: Vec<f64> = candidates.iter().map(|c| c.score).collect();
        let best = best_candidate(&scores).unwrap_or(0);
        let chosen = candidates[best].layer;
        let dropped: Vec<usize> = dropped.iter().copied().chain([chosen]).collect();
        let model = plan_name(&self.settings.model, &dropped);
        println!(
            "iteration {iteration}: dropped layer {chosen} (score {:.4}); plan {model}",
            scores[best]
        );
        Ok(Iteration {
            iteration,
            candidates,
            chosen,
            dropped,
            model,
        })
    }
}

/// Runs the sweep (and the greedy iterations after it) and returns every score.
pub fn run(settings: &AblateSettings) -> Result<Ablation, AblateError> {
    if settings.model.contains('@') {
        return Err(AblateError::Usage(
            "--model must be a served name (candidates add @drop=... to it)".into(),
        ));
    }
    if settings.iterations == 0 {
        return Err(AblateError::Usage("--iterations must be at least 1".into()));
    }
    let tasks = load_tasks(settings)?;
    let client = Client::new(
        &settings.base_url,
        settings.api_key.clone(),
        Some(settings.cache_dir.clone()),
    );
    let mut pool = candidate_pool(&client, settings)?;
    let runner = Runner {
        client: &client,
        settings,
        gen: GenSettings {
            temperature: settings.temperature,
            max_tokens: settings.max_tokens,
            seed: Some(settings.seed),
            samples: 1,
            top_p: Some(settings.top_p),
            top_k: Some(settings.top_k),
        },
        tasks,
    };
    let baseline = runner.score(&settings.model)?;
    if baseline.iter().all(|b| b.value <= 0.0) {
        eprintln!(
            "warning: every task scores 0 on {}: no candidate can be compared with it as a ratio, so candidates are ranked by their raw scores",
            settings.model
        );
    }
    let mut iterations: Vec<Iteration> = Vec::new();
    for iteration in 1..=settings.iterations {
        let dropped = iterations.last().map_or(&[][..], |it| &it.dropped[..]);
        let it = runner.iteration(iteration, &pool, dropped, &baseline)?;
        pool.retain(|&l| l != it.chosen);
        iterations.push(it);
    }
    Ok(Ablation {
        model: settings.model.clone(),
        zero_baseline_tasks: baseline
            .iter()
            .filter(|b| b.value <= 0.0)
            .map(|b| b.task.clone())
            .collect(),
        baseline,
        items_per_task: runner
            .tasks
            .iter()
            .map(|(t, d)| (t.clone(), d.len()))
            .collect(),
        iterations,
        requests_sent: client.requests_sent(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(v: &[f64]) -> Vec<TaskScore> {
        v.iter()
            .enumerate()
            .map(|(i, &value)| TaskScore {
                task: format!("t{i}"),
                metric: "acc".into(),
                value,
            })
            .collect()
    }

    #[test]
    fn scores_are_mean_ratios_over_tasks_with_a_baseline() {
        let base = ts(&[0.5, 0.2, 0.0]);
        // 0.25/0.5 = 0.5 and 0.3/0.2 = 1.5; the zero-baseline task is left out.
        let s = relative_score(&ts(&[0.25, 0.3, 0.7]), &base);
        assert!((s - 1.0).abs() < 1e-12, "{s}");
        // No baseline above 0: the mean raw value.
        let s = relative_score(&ts(&[0.1, 0.3, 0.2]), &ts(&[0.0, 0.0, 0.0]));
        assert!((s - 0.2).abs() < 1e-12, "{s}");
    }

    #[test]
    fn ties_go_to_the_later_candidate() {
        assert_eq!(best_candidate(&[0.5, 0.9, 0.9, 0.1]), Some(2));
        assert_eq!(best_candidate(&[]), None);
    }

    #[test]
    fn plan_names_and_layer_lists() {
        assert_eq!(plan_name("m", &[]), "m");
        assert_eq!(plan_name("m", &[9, 3]), "m@drop=3,9");
        assert_eq!(parse_layers("3, 20-22,3").unwrap(), vec![3, 20, 21, 22]);
        for bad in ["", "a", "5-2", "1-"] {
            assert!(parse_layers(bad).is_err(), "{bad}");
        }
    }
}
