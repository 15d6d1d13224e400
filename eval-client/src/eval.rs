//! Runs a multiple-choice task against a server and writes `results/<model>/<task>.json`
//! all-or-nothing (a finished file is never partial).

use std::path::{Path, PathBuf};

use crate::client::{Client, ClientError};
use crate::compare::{ItemResult, TaskResult};
use crate::loglikelihood::score_pairs;
use crate::metrics::{mean, predictions};
use crate::tasks::Doc;

/// Scores every choice of every doc and derives `acc` / `acc_norm`.
pub fn run_task(
    client: &Client,
    model: &str,
    task: &str,
    docs: &[Doc],
    concurrency: usize,
) -> Result<TaskResult, ClientError> {
    let pairs: Vec<(String, String)> = docs
        .iter()
        .flat_map(|d| {
            d.contexts
                .iter()
                .cloned()
                .zip(d.continuations.iter().cloned())
        })
        .collect();
    let scores = score_pairs(client, model, &pairs, 16, concurrency)?;
    let mut items = Vec::with_capacity(docs.len());
    let mut at = 0;
    for d in docs {
        let lls: Vec<f64> = scores[at..at + d.continuations.len()]
            .iter()
            .map(|s| s.loglikelihood)
            .collect();
        at += d.continuations.len();
        let (pred, pred_norm) = predictions(&lls, &d.continuations);
        items.push(ItemResult {
            gold: d.gold,
            loglikelihoods: lls,
            pred,
            pred_norm,
        });
    }
    let acc = mean(&items.iter().map(|i| i.pred == i.gold).collect::<Vec<_>>());
    let acc_norm = mean(
        &items
            .iter()
            .map(|i| i.pred_norm == i.gold)
            .collect::<Vec<_>>(),
    );
    Ok(TaskResult {
        task: task.to_string(),
        model: model.to_string(),
        acc,
        acc_norm,
        items,
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
