//! Multiple-choice tasks in lm-evaluation-harness's prompt formats, loaded from the published
//! files under a data directory (see ../shared/data/README.md for the layouts).

use std::path::Path;

use serde::Deserialize;

/// One multiple-choice item: choice `i` is scored as `contexts[i]` followed by `continuations[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    pub gold: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task `{0}` (known: arc_easy, arc_challenge, piqa, winogrande)")]
    Unknown(String),
    #[error("{path}: {message}")]
    Data { path: String, message: String },
}

pub const TASKS: [&str; 4] = ["arc_easy", "arc_challenge", "piqa", "winogrande"];

#[derive(Deserialize)]
struct QueryChoices {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

#[derive(Deserialize)]
struct PartialScoring {
    context_options: Vec<String>,
    continuation: String,
    gold: usize,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, TaskError> {
    let err = |message: String| TaskError::Data {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: {e}", i + 1))))
        .collect()
}

/// `Question: ...\nAnswer:` + ` {choice}` (lm-eval's arc_* and piqa).
fn question_answer(rows: Vec<QueryChoices>) -> Vec<Doc> {
    rows.into_iter()
        .map(|r| {
            let q = r.query.trim_end();
            let q = if q.starts_with("Question:") {
                q.to_string()
            } else {
                format!("Question: {q}")
            };
            Doc {
                contexts: vec![format!("{q}\nAnswer:"); r.choices.len()],
                continuations: r.choices.iter().map(|c| format!(" {c}")).collect(),
                gold: r.gold,
            }
        })
        .collect()
}

/// Winogrande with partial scoring: the continuation after each filled-in context.
fn partial(rows: Vec<PartialScoring>) -> Vec<Doc> {
    rows.into_iter()
        .map(|r| Doc {
            continuations: vec![
                format!(" {}", r.continuation.trim_start());
                r.context_options.len()
            ],
            contexts: r.context_options,
            gold: r.gold,
        })
        .collect()
}

/// Loads a task's documents from `data_dir`.
pub fn load(task: &str, data_dir: &Path) -> Result<Vec<Doc>, TaskError> {
    let docs = match task {
        "arc_easy" => question_answer(read_jsonl(&data_dir.join("arc/arc_easy.jsonl"))?),
        "arc_challenge" => question_answer(read_jsonl(&data_dir.join("arc/arc_challenge.jsonl"))?),
        "piqa" => question_answer(read_jsonl(&data_dir.join("piqa/piqa.jsonl"))?),
        "winogrande" => partial(read_jsonl(&data_dir.join("winogrande/winogrande.jsonl"))?),
        other => return Err(TaskError::Unknown(other.to_string())),
    };
    for (i, d) in docs.iter().enumerate() {
        if d.gold >= d.continuations.len() {
            return Err(TaskError::Data {
                path: task.into(),
                message: format!("item {i}: gold {} out of range", d.gold),
            });
        }
    }
    Ok(docs)
}

/// `--limit`: a count (`50`) or a fraction (`0.2`) of the documents, taken from the start.
pub fn apply_limit(n: usize, limit: Option<f64>) -> usize {
    match limit {
        None => n,
        Some(l) if l < 1.0 => ((n as f64) * l).ceil() as usize,
        Some(l) => (l as usize).min(n),
    }
}
