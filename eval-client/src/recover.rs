//! `pruneval recover MANIFEST`: the user's recovery loop in one command.
//!
//! 1. SGR: the base answers the `[sgr]` prompts → `<out_dir>/sgr.jsonl` (resumes where it stopped).
//! 2. Fine-tuning: the pruned variant is trained on that file through the server's Fine-tuning API;
//!    the job id is kept in `<out_dir>/recover.json`, so a rerun follows (or reuses) the same job.
//! 3. Evaluation of base, pruned and recovered on `tasks` → `<out_dir>/results` (response cache in
//!    `<out_dir>/cache`: a rerun costs no requests).
//! 4. `compare` of pruned and recovered against the base: retention with CIs, McNemar tests,
//!    degeneration and failure analyses, charts.
//!
//! A server behind `--api-key` takes the key from `OPENAI_API_KEY`, as every pruneval command does.
//! The manifest (TOML) names `base_url`, `base`, `pruned`, `tasks`, `out_dir`, and tables `[sgr]`,
//! `[finetune]`, `[eval]` whose keys are the flags of `pruneval sgr`, `pruneval finetune create`
//! and `pruneval eval` (without the ones this command sets), so every flag is available.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use serde_json::json;

use crate::client::Client;
use crate::compare_command::{self, CompareSettings};
use crate::eval_command::{self, EvalSettings};
use crate::finetune::{self, JobArgs};
use crate::sgr::{self, SgrSettings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub base_url: String,
    /// The model that answers the SGR prompts and the reference of the report.
    pub base: String,
    /// The served plan variant to recover.
    pub pruned: String,
    pub tasks: Vec<String>,
    #[serde(default = "default_out")]
    pub out_dir: PathBuf,
    #[serde(default)]
    pub sgr: toml::Table,
    #[serde(default)]
    pub finetune: toml::Table,
    #[serde(default)]
    pub eval: toml::Table,
}

fn default_out() -> PathBuf {
    PathBuf::from("recover")
}

#[derive(Parser)]
struct SgrCli {
    #[command(flatten)]
    s: SgrSettings,
}

#[derive(Parser)]
struct JobCli {
    #[command(flatten)]
    j: JobArgs,
}

#[derive(Parser)]
struct EvalCli {
    #[command(flatten)]
    e: EvalSettings,
}

/// A TOML table as command-line flags: `key = v` → `--key v` (`_` → `-`), `true` → `--key`,
/// arrays comma-joined.
fn flags(table: &toml::Table, section: &str, reserved: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = k.replace('_', "-");
        if reserved.contains(&flag.as_str()) {
            bail!("[{section}] {k}: set by `recover` itself; remove it");
        }
        let value = match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            toml::Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => bail!("[{section}] {k}: use a string, number, boolean or array"),
        };
        out.push(format!("--{flag}"));
        out.extend(value);
    }
    Ok(out)
}

fn args(head: &[&str], rest: Vec<String>) -> Vec<String> {
    head.iter().map(|s| s.to_string()).chain(rest).collect()
}

pub fn run(manifest_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("read {}", manifest_path.display()))?;
    let m: Manifest =
        toml::from_str(&text).with_context(|| format!("manifest {}", manifest_path.display()))?;
    if m.tasks.is_empty() {
        bail!("manifest: `tasks` names no task");
    }
    std::fs::create_dir_all(&m.out_dir)
        .with_context(|| format!("create {}", m.out_dir.display()))?;
    let out = |name: &str| m.out_dir.join(name).to_string_lossy().into_owned();
    // Every section parses before the first request, so a bad flag costs nothing.
    let sgr_args = args(
        &[
            "sgr",
            "--base-url",
            &m.base_url,
            "--model",
            &m.base,
            "--out",
            &out("sgr.jsonl"),
        ],
        flags(&m.sgr, "sgr", &["base-url", "model", "out"])?,
    );
    let sgr_settings = SgrCli::try_parse_from(&sgr_args).context("[sgr]")?.s;
    let job_args = args(
        &[
            "create",
            "--model",
            &m.pruned,
            "--training-file",
            &out("sgr.jsonl"),
        ],
        flags(&m.finetune, "finetune", &["model", "training-file"])?,
    );
    let job = JobCli::try_parse_from(&job_args).context("[finetune]")?.j;
    let eval_flags = flags(
        &m.eval,
        "eval",
        &["base-url", "model", "tasks", "out-dir", "cache-dir"],
    )?;
    let eval_for = |model: &str| -> Result<EvalSettings> {
        let a = args(
            &[
                "eval",
                "--base-url",
                &m.base_url,
                "--model",
                model,
                "--tasks",
                &m.tasks.join(","),
                "--out-dir",
                &out("results"),
                "--cache-dir",
                &out("cache"),
            ],
            eval_flags.clone(),
        );
        Ok(EvalCli::try_parse_from(&a).context("[eval]")?.e)
    };
    eval_for(&m.base)?;

    println!("== 1/4 SGR: {} answers the prompts", m.base);
    let s = sgr::run(&sgr_settings)?;
    println!("records {:?}; skipped rows {:?}", s.records, s.skipped_rows);
    if let Some(w) = all_warmup(s.records.get("kept").copied().unwrap_or(0), &job) {
        println!("warning: {w}");
    }

    println!("== 2/4 fine-tuning {} on {}", m.pruned, out("sgr.jsonl"));
    let client = Client::new(&m.base_url, std::env::var("OPENAI_API_KEY").ok(), None);
    let recovered = fine_tune(&client, &job, &m.out_dir.join("recover.json"))?;
    println!("recovered model: {recovered}");

    println!("== 3/4 evaluating {}, {}, {recovered}", m.base, m.pruned);
    for model in [m.base.as_str(), m.pruned.as_str(), recovered.as_str()] {
        eval_command::run(&eval_for(model)?)?;
    }

    println!("== 4/4 comparison");
    compare_command::run(&CompareSettings {
        base: m.base.clone(),
        variants: vec![m.pruned.clone(), recovered],
        tasks: m.tasks.clone(),
        out_dir: m.out_dir.join("results"),
        norm: false,
    })?;
    Ok(())
}

/// Says so when every optimizer step of the job would fall inside the learning-rate warmup (the
/// paper's 50 steps at batch 8 need more than 400 conversations per epoch).
fn all_warmup(kept: usize, job: &JobArgs) -> Option<String> {
    let batch = job.batch_size.unwrap_or(8) as usize;
    let warmup = job.warmup_steps.unwrap_or(50) as usize;
    let epochs = job.n_epochs.unwrap_or(1) as usize;
    let steps = job
        .max_steps
        .map_or(kept.div_ceil(batch.max(1)) * epochs, |m| m as usize);
    (steps <= warmup).then(|| {
        format!("{kept} conversations make {steps} steps at batch {batch}, all inside the {warmup}-step warmup: set warmup_steps in [finetune]")
    })
}

/// Runs (or, after an interruption, follows) the job; returns the recovered model's name.
fn fine_tune(client: &Client, job: &JobArgs, state: &Path) -> Result<String> {
    let known = std::fs::read_to_string(state)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["job_id"].as_str().map(str::to_string));
    let id = match known {
        Some(id) => {
            println!("following job {id} (from {})", state.display());
            id
        }
        None => {
            let created = finetune::create(client, job)?;
            let id = created["id"].as_str().unwrap_or_default().to_string();
            std::fs::write(state, json!({"job_id": id}).to_string())
                .with_context(|| format!("write {}", state.display()))?;
            println!("created job {id}");
            id
        }
    };
    let week = Duration::from_secs(7 * 24 * 3600);
    let done = finetune::wait_for(client, &id, week, |e| {
        println!(
            "[{}] {}",
            e["level"].as_str().unwrap_or("info"),
            e["message"].as_str().unwrap_or("")
        )
    })?;
    Ok(done["fine_tuned_model"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &[&str]) -> JobArgs {
        let mut a = vec!["create", "--model", "m", "--training-file", "f"];
        a.extend_from_slice(extra);
        JobCli::try_parse_from(a).unwrap().j
    }

    #[test]
    fn a_run_inside_the_warmup_is_named() {
        // 118 conversations at batch 8: 15 steps, all inside the paper's 50.
        assert!(all_warmup(118, &job(&[])).unwrap().contains("15 steps"));
        assert!(all_warmup(401, &job(&[])).is_none());
        assert!(all_warmup(118, &job(&["--warmup-steps", "5"])).is_none());
        assert!(all_warmup(10_000, &job(&["--max-steps", "20"])).is_some());
    }

    #[test]
    fn manifest_tables_become_flags() {
        let t: toml::Table = toml::from_str(
            "max_tokens = 48\nkeep_length = true\nquiet = false\nstop = [\"a\", \"b\"]",
        )
        .unwrap();
        let f = flags(&t, "sgr", &[]).unwrap();
        assert_eq!(f, ["--keep-length", "--max-tokens", "48", "--stop", "a,b"]);
        let e = flags(&t, "sgr", &["max-tokens"]).unwrap_err().to_string();
        assert!(e.contains("set by `recover` itself"), "{e}");
    }
}
