//! Task data from the Hugging Face hub, for runs without `--data-dir`.
//!
//! Every public dataset on the hub has a parquet conversion on the `refs/convert/parquet`
//! branch, laid out as `{config}/{split}/NNNN.parquet` (script-based sets such as piqa and xsum
//! included). [`materialize`] fetches a task's split with `hf-hub` (its cache under `HF_HOME`;
//! `HF_ENDPOINT` for a mirror; with `HF_HUB_OFFLINE=1` only the cache is read), reads the rows
//! with the `parquet` crate and writes them once into the `--data-dir` layout of
//! `../shared/data/README.md`, so the loaders in [`crate::tasks`] and [`crate::gen_tasks`] read
//! hub data and local files the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use serde_json::{json, Value};

use crate::tasks::TaskError;

/// The hub branch that holds every dataset's parquet conversion.
pub const PARQUET_REVISION: &str = "refs/convert/parquet";

/// One split of a hub dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HubSplit {
    pub repo: &'static str,
    pub config: &'static str,
    pub split: &'static str,
}

const fn split(repo: &'static str, config: &'static str, split: &'static str) -> HubSplit {
    HubSplit {
        repo,
        config,
        split,
    }
}

/// How a split's hub rows become the local layout.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Convert {
    /// The hub schema is the one the loaders read: rows written as JSON lines.
    AsIs,
    Arc,
    Piqa,
    Winogrande,
    /// Per-subject CSVs, one folder per split; the file is a marker written last.
    Mmlu,
}

/// Where a task's data lives on the hub (the datasets lm-evaluation-harness and EvalPlus use),
/// the `--data-dir` file it is written to, and how.
fn source(task: &str) -> Option<(Vec<HubSplit>, &'static str, Convert)> {
    use Convert::*;
    let one = |repo, config, split_name, path, convert| {
        Some((vec![split(repo, config, split_name)], path, convert))
    };
    match task {
        "arc_easy" => one(
            "allenai/ai2_arc",
            "ARC-Easy",
            "test",
            "arc/arc_easy.jsonl",
            Arc,
        ),
        "arc_challenge" => one(
            "allenai/ai2_arc",
            "ARC-Challenge",
            "test",
            "arc/arc_challenge.jsonl",
            Arc,
        ),
        "piqa" => one(
            "ybisk/piqa",
            "plain_text",
            "validation",
            "piqa/piqa.jsonl",
            Piqa,
        ),
        "winogrande" => one(
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            "winogrande/winogrande.jsonl",
            Winogrande,
        ),
        "openbookqa" => one(
            "allenai/openbookqa",
            "main",
            "test",
            "openbookqa/test.jsonl",
            AsIs,
        ),
        "hellaswag" => one(
            "Rowan/hellaswag",
            "default",
            "validation",
            "hellaswag/validation.jsonl",
            AsIs,
        ),
        "mmlu" => Some((
            vec![
                split("cais/mmlu", "all", "test"),
                split("cais/mmlu", "all", "dev"),
            ],
            "mmlu/.complete",
            Mmlu,
        )),
        "arithmetic" => one(
            "EleutherAI/arithmetic",
            "arithmetic_1dc",
            "validation",
            "arithmetic/single_digit_three_ops.jsonl",
            AsIs,
        ),
        "gsm8k" | "gsm8k_cot" | "gsm8k_chat" => {
            one("openai/gsm8k", "main", "test", "gsm8k/test.jsonl", AsIs)
        }
        "gsm8k_train" => one("openai/gsm8k", "main", "train", "gsm8k/train.jsonl", AsIs),
        "humaneval" => one(
            "openai/openai_humaneval",
            "openai_humaneval",
            "test",
            "humaneval/HumanEval.jsonl",
            AsIs,
        ),
        "humanevalplus" => one(
            "evalplus/humanevalplus",
            "default",
            "test",
            "humanevalplus/test.jsonl",
            AsIs,
        ),
        "mbpp" => one(
            "google-research-datasets/mbpp",
            "full",
            "test",
            "mbpp/test.jsonl",
            AsIs,
        ),
        "mbppplus" => one(
            "evalplus/mbppplus",
            "default",
            "test",
            "mbppplus/test.jsonl",
            AsIs,
        ),
        "xsum" => one(
            "EdinburghNLP/xsum",
            "default",
            "test",
            "xsum/test.jsonl",
            AsIs,
        ),
        _ => None,
    }
}

fn data_err(path: impl std::fmt::Display, message: impl std::fmt::Display) -> TaskError {
    TaskError::Data {
        path: path.to_string(),
        message: message.to_string(),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The parquet files of one split, local paths in the hub cache (downloaded when online).
pub fn fetch_split(s: &HubSplit) -> Result<Vec<PathBuf>, TaskError> {
    fetch(s.repo, s.config, s.split)
}

/// The parquet files of split `split` of config `config` of hub dataset `repo`.
pub fn fetch(repo: &str, config: &str, split: &str) -> Result<Vec<PathBuf>, TaskError> {
    let prefix = format!("{config}/{split}/");
    let name = format!("hub dataset {repo} ({prefix})");
    let repo = Repo::with_revision(repo.to_string(), RepoType::Dataset, PARQUET_REVISION.into());
    let wanted = |f: &str| f.starts_with(&prefix) && f.ends_with(".parquet");
    let files = if offline() {
        cached_files(&hf_hub::Cache::from_env(), &repo)
            .into_iter()
            .filter(|(rel, _)| wanted(rel))
            .map(|(_, path)| path)
            .collect::<Vec<_>>()
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| data_err(&name, e))?;
        let api_repo = api.repo(repo);
        let info = api_repo.info().map_err(|e| data_err(&name, e))?;
        let mut names: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| wanted(f))
            .collect();
        names.sort();
        names
            .iter()
            .map(|f| api_repo.get(f).map_err(|e| data_err(&name, e)))
            .collect::<Result<_, _>>()?
    };
    if files.is_empty() {
        let why = if offline() {
            "no parquet files in the local hub cache and HF_HUB_OFFLINE is set"
        } else {
            "no parquet files on the hub"
        };
        return Err(data_err(name, why));
    }
    Ok(files)
}

/// Files of a cached repo revision, as (path in the repo, local path), sorted.
fn cached_files(cache: &hf_hub::Cache, repo: &Repo) -> Vec<(String, PathBuf)> {
    let root = cache.path().join(repo.folder_name());
    let Ok(commit) = std::fs::read_to_string(root.join("refs").join(repo.revision())) else {
        return Vec::new();
    };
    let snapshot = root.join("snapshots").join(commit.trim());
    let mut out = Vec::new();
    let mut stack = vec![snapshot.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(&snapshot) {
                out.push((rel.to_string_lossy().replace('\\', "/"), path));
            }
        }
    }
    out.sort();
    out
}

/// Every row of the parquet files, as JSON objects (lists as arrays, structs as objects).
pub fn read_rows(files: &[PathBuf]) -> Result<Vec<Value>, TaskError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut rows = Vec::new();
    for path in files {
        let err = |e: parquet::errors::ParquetError| data_err(path.display(), e);
        let file = std::fs::File::open(path).map_err(|e| data_err(path.display(), e))?;
        let reader = SerializedFileReader::new(file).map_err(err)?;
        for row in reader.get_row_iter(None).map_err(err)? {
            rows.push(row.map_err(err)?.to_json_value());
        }
    }
    Ok(rows)
}

fn str_field<'a>(row: &'a Value, name: &str, task: &str, i: usize) -> Result<&'a str, TaskError> {
    row[name]
        .as_str()
        .ok_or_else(|| data_err(task, format!("row {i}: missing string field `{name}`")))
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// An integer that the hub stores as a number or a string (`"1"`).
fn index_field(row: &Value, name: &str, task: &str, i: usize) -> Result<usize, TaskError> {
    match &row[name] {
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| data_err(task, format!("row {i}: `{name}` is not an index")))
}

/// ai2_arc rows → `{query, choices, gold}`.
fn arc_rows(rows: &[Value], task: &str) -> Result<Vec<Value>, TaskError> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let labels = str_list(&r["choices"]["label"]);
            let key = str_field(r, "answerKey", task, i)?;
            let gold = labels
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| data_err(task, format!("row {i}: answerKey {key} not a label")))?;
            Ok(json!({
                "query": format!("Question: {}", str_field(r, "question", task, i)?),
                "choices": str_list(&r["choices"]["text"]),
                "gold": gold,
            }))
        })
        .collect()
}

/// piqa rows (`goal`, `sol1`, `sol2`, `label`) → `{query, choices, gold}`.
fn piqa_rows(rows: &[Value], task: &str) -> Result<Vec<Value>, TaskError> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(json!({
                "query": str_field(r, "goal", task, i)?,
                "choices": [str_field(r, "sol1", task, i)?, str_field(r, "sol2", task, i)?],
                "gold": index_field(r, "label", task, i)?,
            }))
        })
        .collect()
}

/// winogrande rows → partial scoring, as lm-eval's `partial_context` / `partial_target`: each
/// option fills the text before `_`; the text after it is the continuation.
fn winogrande_rows(rows: &[Value], task: &str) -> Result<Vec<Value>, TaskError> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let sentence = str_field(r, "sentence", task, i)?;
            let blank = sentence
                .find('_')
                .ok_or_else(|| data_err(task, format!("row {i}: sentence has no `_`")))?;
            let answer = index_field(r, "answer", task, i)?;
            if !(1..=2).contains(&answer) {
                return Err(data_err(
                    task,
                    format!("row {i}: answer {answer} is not 1 or 2"),
                ));
            }
            let before = &sentence[..blank];
            Ok(json!({
                "context_options": [
                    format!("{before}{}", str_field(r, "option1", task, i)?),
                    format!("{before}{}", str_field(r, "option2", task, i)?),
                ],
                "continuation": sentence[blank + 1..].trim(),
                "gold": answer - 1,
            }))
        })
        .collect()
}

/// cais/mmlu rows → one hendrycks-style CSV per subject (question, A-D, answer letter).
fn write_mmlu(dir: &Path, split: &str, rows: &[Value]) -> Result<(), TaskError> {
    let task = "mmlu";
    let mut by_subject: BTreeMap<String, Vec<[String; 6]>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let choices = str_list(&r["choices"]);
        let answer = index_field(r, "answer", task, i)?;
        if choices.len() != 4 || answer > 3 {
            return Err(data_err(
                task,
                format!("row {i}: needs 4 choices and answer 0-3"),
            ));
        }
        let letter = ["A", "B", "C", "D"][answer].to_string();
        let [a, b, c, d] = [0, 1, 2, 3].map(|k| choices[k].clone());
        let row = [
            str_field(r, "question", task, i)?.to_string(),
            a,
            b,
            c,
            d,
            letter,
        ];
        let subject = str_field(r, "subject", task, i)?.to_string();
        by_subject.entry(subject).or_default().push(row);
    }
    let out = dir.join("mmlu").join(split);
    std::fs::create_dir_all(&out).map_err(|e| data_err(out.display(), e))?;
    for (subject, rows) in by_subject {
        let path = out.join(format!("{subject}_{split}.csv"));
        let err = |e: &dyn std::fmt::Display| data_err(path.display(), e);
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_path(&path)
            .map_err(|e| err(&e))?;
        for row in rows {
            w.write_record(&row).map_err(|e| err(&e))?;
        }
        w.flush().map_err(|e| err(&e))?;
    }
    Ok(())
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<(), TaskError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| data_err(parent.display(), e))?;
    }
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    // Written aside and renamed, so a killed run never leaves a partial file that looks done.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(|e| data_err(partial.display(), e))?;
    std::fs::rename(&partial, path).map_err(|e| data_err(path.display(), e))
}

/// Makes `task`'s data available under `data_dir` in the local layout, from the hub; a task
/// already written there is not fetched again. Returns `data_dir`.
pub fn materialize(task: &str, data_dir: &Path) -> Result<PathBuf, TaskError> {
    let Some((splits, rel, convert)) = source(task) else {
        return Err(TaskError::Unknown(task.to_string()));
    };
    let target = data_dir.join(rel);
    if target.exists() {
        return Ok(data_dir.to_path_buf());
    }
    for s in &splits {
        let rows = read_rows(&fetch_split(s)?)?;
        match convert {
            Convert::Mmlu => write_mmlu(data_dir, s.split, &rows)?,
            Convert::Arc => write_jsonl(&target, &arc_rows(&rows, task)?)?,
            Convert::Piqa => write_jsonl(&target, &piqa_rows(&rows, task)?)?,
            Convert::Winogrande => write_jsonl(&target, &winogrande_rows(&rows, task)?)?,
            Convert::AsIs => write_jsonl(&target, &rows)?,
        }
    }
    if convert == Convert::Mmlu {
        std::fs::write(&target, "").map_err(|e| data_err(target.display(), e))?;
    }
    Ok(data_dir.to_path_buf())
}
