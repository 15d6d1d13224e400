//! `pruneval` command line: `eval` runs tasks against a server, `compare` prints retention tables.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pruneval::client::Client;
use pruneval::{compare, eval, tasks};

#[derive(Parser)]
#[command(
    name = "pruneval",
    version,
    about = "Eval client for pruneserve and any OpenAI-compatible server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run multiple-choice tasks (loglikelihood through /v1/completions) and write result files.
    Eval {
        #[arg(long)]
        base_url: String,
        #[arg(long)]
        model: String,
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// A count (50) or a fraction (0.2) of each task's items.
        #[arg(long)]
        limit: Option<f64>,
        #[arg(long, default_value = "../shared/data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "results")]
        out_dir: PathBuf,
        /// Response cache (resume and re-runs cost no requests).
        #[arg(long, default_value = "results/.cache")]
        cache_dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, env = "OPENAI_API_KEY")]
        api_key: Option<String>,
    },
    /// Retention of variants against a base from result files, with CIs and McNemar tests.
    Compare {
        #[arg(long)]
        base: String,
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        #[arg(long, default_value = "results")]
        out_dir: PathBuf,
        /// Use acc_norm instead of acc.
        #[arg(long)]
        norm: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval {
            base_url,
            model,
            tasks: names,
            limit,
            data_dir,
            out_dir,
            cache_dir,
            concurrency,
            api_key,
        } => {
            let mut loaded = Vec::new();
            for t in &names {
                let docs = tasks::load(t, &data_dir)?;
                let n = tasks::apply_limit(docs.len(), limit);
                loaded.push((t.clone(), docs.into_iter().take(n).collect::<Vec<_>>()));
            }
            let client = Client::new(&base_url, api_key, Some(cache_dir));
            for (task, docs) in loaded {
                let r = eval::run_task(&client, &model, &task, &docs, concurrency)
                    .with_context(|| format!("task {task}"))?;
                let path = eval::write_result(&out_dir, &r)?;
                println!(
                    "{task}: acc {:.4} acc_norm {:.4} (n={}) -> {}",
                    r.acc,
                    r.acc_norm,
                    r.items.len(),
                    path.display()
                );
            }
            println!("requests sent: {}", client.requests_sent());
            Ok(())
        }
        Command::Compare {
            base,
            variants,
            tasks: names,
            out_dir,
            norm,
        } => {
            let mut rows = Vec::new();
            for task in &names {
                let b = eval::read_result(&out_dir, &base, task)?;
                for v in &variants {
                    let r = eval::read_result(&out_dir, v, task)?;
                    rows.push(compare::compare(&b, &r, norm).map_err(anyhow::Error::msg)?);
                }
            }
            println!("{}", compare::markdown(&base, &rows));
            let json_path = out_dir.join(format!("compare-{base}.json"));
            std::fs::write(&json_path, serde_json::to_string_pretty(&rows)?)?;
            println!("\nwrote {}", json_path.display());
            Ok(())
        }
    }
}
