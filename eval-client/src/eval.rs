//! Runs a task against a server and writes `results/<model>/<task>.json` all-or-nothing (a
//! finished file is never partial): multiple-choice tasks by loglikelihood, generative tasks by
//! generation plus answer extraction, program execution or ROUGE-L.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::client::{Client, ClientError};
use crate::compare::{ItemResult, Record, TaskResult};
use crate::gen_tasks::{self, Check, GenDoc, Prompt};
use crate::generation::{generate_all, GenSettings};
use crate::loglikelihood::score_pairs;
use crate::metrics::predictions;
use crate::sandbox::{self, Isolation, Limits, Outcome};
use crate::shared_choice;
use crate::tasks::{self, Doc, TaskError};

/// A task's documents, by kind.
pub enum Loaded {
    Choice(Vec<Doc>),
    Generative(Vec<GenDoc>),
}

impl Loaded {
    pub fn len(&self) -> usize {
        match self {
            Loaded::Choice(d) => d.len(),
            Loaded::Generative(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a task's items come from and which of them run.
#[derive(Debug, Clone, Default)]
pub struct TaskSelection {
    /// Task files in the layout of ../shared/data/README.md; `None`: the hub, cached under
    /// `hub_cache`.
    pub data_dir: Option<PathBuf>,
    pub hub_cache: PathBuf,
    /// A count or a fraction of the items (see [`tasks::apply_limit`]).
    pub limit: Option<f64>,
    pub num_fewshot: Option<usize>,
    /// Take the items in the order of a seeded shuffle (the limit then samples them).
    pub sample_seed: Option<u64>,
}

/// The items of `task` in `order` (a seeded shuffle, or as published), cut to the limit.
fn select<T>(mut docs: Vec<T>, sel: &TaskSelection) -> Vec<T> {
    if let Some(seed) = sel.sample_seed {
        docs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    }
    let n = tasks::apply_limit(docs.len(), sel.limit);
    docs.truncate(n);
    docs
}

/// Loads a task's documents: from the data directory, or the hub when there is none.
pub fn load_task(task: &str, sel: &TaskSelection) -> Result<Loaded, TaskError> {
    let data_dir = match &sel.data_dir {
        Some(dir) => dir.clone(),
        None => crate::hub_data::materialize(task, &sel.hub_cache)?,
    };
    Ok(match gen_tasks::load(task, &data_dir) {
        Some(docs) => Loaded::Generative(select(docs?, sel)),
        None => Loaded::Choice(select(
            tasks::load_with_shots(task, &data_dir, sel.num_fewshot)?,
            sel,
        )),
    })
}

/// Runs a loaded task against `model`.
pub fn run_loaded(
    client: &Client,
    model: &str,
    task: &str,
    docs: &Loaded,
    settings: &GenSettings,
    concurrency: usize,
) -> Result<TaskResult, ClientError> {
    match docs {
        Loaded::Choice(d) => run_task(client, model, task, d, concurrency),
        Loaded::Generative(d) => run_gen_task(client, model, task, d, settings, concurrency),
    }
}

/// [`run_loaded`] for several models of one tokenizer (plans of one base): a choice task sends
/// each doc's requests for all of them together ([`run_task_together`]); a generative task runs
/// one evaluation per model, all at once. One result per model, in order.
pub fn run_loaded_together(
    client: &Client,
    models: &[String],
    task: &str,
    docs: &Loaded,
    settings: &GenSettings,
    concurrency: usize,
) -> Result<Vec<TaskResult>, ClientError> {
    match docs {
        Loaded::Choice(d) => run_task_together(client, models, task, d, concurrency),
        Loaded::Generative(d) => std::thread::scope(|scope| {
            let running: Vec<_> = models
                .iter()
                .map(|m| {
                    scope.spawn(move || run_gen_task(client, m, task, d, settings, concurrency))
                })
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClientError::Invalid {
                            url: "/v1/completions".into(),
                            message: "an evaluation stopped".into(),
                        })
                    })
                })
                .collect()
        }),
    }
}

/// A progress bar with items/s and ETA on stderr (hidden when stderr is not a terminal).
pub fn progress(task: &str, len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(task.to_string());
    bar
}

use crate::metrics::average as mean;

/// Scores every choice of every doc (in one forward per doc where [`shared_choice`] applies) and
/// derives `acc` / `acc_norm`.
pub fn run_task(
    client: &Client,
    model: &str,
    task: &str,
    docs: &[Doc],
    concurrency: usize,
) -> Result<TaskResult, ClientError> {
    let mut results = run_task_together(client, &[model.to_string()], task, docs, concurrency)?;
    results.pop().ok_or_else(|| ClientError::Invalid {
        url: "/v1/completions".into(),
        message: "no result".into(),
    })
}

/// [`run_task`] for several models of one tokenizer at once, each doc's one-forward requests
/// for all of them sent together ([`shared_choice::score_docs_together`]); one result per model.
pub fn run_task_together(
    client: &Client,
    models: &[String],
    task: &str,
    docs: &[Doc],
    concurrency: usize,
) -> Result<Vec<TaskResult>, ClientError> {
    let choices: usize = docs.iter().map(|d| d.continuations.len()).sum();
    let bar = progress(task, choices * models.len());
    let on_done = |n: usize| bar.inc(n as u64);
    let shared = shared_choice::score_docs_together(client, models, docs, concurrency, &on_done)?;
    let results = models
        .iter()
        .zip(shared)
        .map(|(model, shared)| {
            choice_result(client, model, task, docs, shared, concurrency, &on_done)
        })
        .collect();
    bar.finish_and_clear();
    results
}

/// A choice task's result for `model` from its one-forward scores (`None`: the doc is scored
/// pair by pair here).
fn choice_result(
    client: &Client,
    model: &str,
    task: &str,
    docs: &[Doc],
    shared: Vec<Option<Vec<f64>>>,
    concurrency: usize,
    on_done: &(dyn Fn(usize) + Sync),
) -> Result<TaskResult, ClientError> {
    let pairs: Vec<(String, String)> = docs
        .iter()
        .zip(&shared)
        .filter(|(_, s)| s.is_none())
        .flat_map(|(d, _)| {
            d.contexts
                .iter()
                .cloned()
                .zip(d.continuations.iter().cloned())
        })
        .collect();
    let scores = score_pairs(client, model, &pairs, 16, concurrency, on_done)?;
    let mut items = Vec::with_capacity(docs.len());
    let mut at = 0;
    for (i, (d, shared)) in docs.iter().zip(shared).enumerate() {
        let lls: Vec<f64> = match shared {
            Some(lls) => lls,
            None => {
                at += d.continuations.len();
                scores[at - d.continuations.len()..at]
                    .iter()
                    .map(|s| s.loglikelihood)
                    .collect()
            }
        };
        let (pred, pred_norm) = predictions(&lls, &d.continuations);
        items.push(ItemResult {
            id: i.to_string(),
            value: f64::from(pred == d.gold),
            value_norm: f64::from(pred_norm == d.gold),
            gold: d.gold,
            loglikelihoods: lls,
            pred,
            pred_norm,
            record: Record {
                prompt: d.contexts[d.gold].clone(),
                responses: vec![d.continuations[pred].clone()],
                extracted: vec![pred.to_string()],
                target: d.continuations[d.gold].clone(),
            },
        });
    }
    Ok(TaskResult {
        task: task.to_string(),
        model: model.to_string(),
        metrics: ["acc".into(), "acc_norm".into()],
        generative: false,
        acc: mean(&items.iter().map(|i| i.value).collect::<Vec<_>>()),
        acc_norm: mean(&items.iter().map(|i| i.value_norm).collect::<Vec<_>>()),
        items,
        degeneration: None,
        failures: None,
    })
}

fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Completion(t) => t.clone(),
        Prompt::Chat(turns) => turns
            .iter()
            .map(|(r, c)| format!("<{r}> {c}"))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Generates for every doc and scores the responses. GSM8K: strict / flexible exact match;
/// programs: pass@1 (mean over samples) in the sandbox; XSUM: ROUGE-L F1.
pub fn run_gen_task(
    client: &Client,
    model: &str,
    task: &str,
    docs: &[GenDoc],
    settings: &GenSettings,
    concurrency: usize,
) -> Result<TaskResult, ClientError> {
    let bar = progress(task, docs.len());
    let responses = generate_all(client, model, docs, settings, concurrency, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let iso = Isolation::detect();
    let limits = Limits::default();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut items = Vec::with_capacity(docs.len());
    let mut executions = Vec::new();
    let mut metrics = ["exact_match".to_string(), "exact_match".to_string()];
    for (doc, texts) in docs.iter().zip(responses) {
        let (value, value_norm, extracted, target) = match &doc.check {
            Check::Number(target) => {
                metrics = ["strict_match".into(), "flexible_extract".into()];
                let (strict, flexible, extracted) = gen_tasks::score_numbers(&texts, target);
                (strict, flexible, extracted, target.clone())
            }
            Check::Program { before, after } => {
                metrics = ["pass@1".into(), "pass@1".into()];
                let programs: Vec<String> = texts
                    .iter()
                    .map(|t| format!("{before}{t}{after}"))
                    .collect();
                let runs = sandbox::run_many(&programs, &limits, &iso, parallel);
                let passed = mean(
                    &runs
                        .iter()
                        .map(|r| f64::from(r.outcome == Outcome::Passed))
                        .collect::<Vec<_>>(),
                );
                let outcomes = runs
                    .iter()
                    .map(|r| {
                        format!(
                            "{:?}: {}",
                            r.outcome,
                            r.stderr_tail.lines().last().unwrap_or("")
                        )
                    })
                    .collect();
                executions.extend(runs);
                (passed, passed, outcomes, String::new())
            }
            Check::Rouge(reference) => {
                metrics = ["rougeL_f1".into(), "rougeL_f1".into()];
                let r = mean(
                    &texts
                        .iter()
                        .map(|t| gen_tasks::rouge_l_f1(reference, t))
                        .collect::<Vec<_>>(),
                );
                (r, r, vec![format!("{r:.4}")], reference.clone())
            }
        };
        items.push(ItemResult {
            id: doc.id.clone(),
            value,
            value_norm,
            gold: 0,
            loglikelihoods: Vec::new(),
            pred: 0,
            pred_norm: 0,
            record: Record {
                prompt: prompt_text(&doc.prompt),
                responses: texts,
                extracted,
                target,
            },
        });
    }
    let degeneration = crate::analysis::degeneration(
        items
            .iter()
            .flat_map(|i| i.record.responses.iter().map(String::as_str)),
    );
    Ok(TaskResult {
        task: task.to_string(),
        model: model.to_string(),
        metrics,
        generative: true,
        acc: mean(&items.iter().map(|i| i.value).collect::<Vec<_>>()),
        acc_norm: mean(&items.iter().map(|i| i.value_norm).collect::<Vec<_>>()),
        items,
        degeneration: Some(degeneration),
        failures: (!executions.is_empty()).then(|| crate::analysis::failures::count(&executions)),
    })
}

/// `out_dir/<model>/<task>.json`, with `/` in model names kept as directories.
pub fn result_path(out_dir: &Path, model: &str, task: &str) -> PathBuf {
    out_dir
        .join(model.replace("..", "_"))
        .join(format!("{task}.json"))
}

pub fn write_result(out_dir: &Path, r: &TaskResult) -> std::io::Result<PathBuf> {
    let path = result_path(out_dir, &r.model, &r.task);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.partial");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(r).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

pub fn read_result(out_dir: &Path, model: &str, task: &str) -> std::io::Result<TaskResult> {
    let path = result_path(out_dir, model, task);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}
