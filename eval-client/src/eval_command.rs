//! `pruneval eval`: loads every task before the first request (a bad name or file costs
//! nothing), runs them against one model, writes `<out-dir>/<model>/<task>.json` and prints the
//! scores, the item rate and the requests sent.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::client::Client;
use crate::eval;
use crate::generation::GenSettings;
use crate::tasks;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalSettings {
    #[arg(long)]
    pub base_url: String,
    #[arg(long)]
    pub model: String,
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// A count (50) or a fraction (0.2) of each task's items.
    #[arg(long)]
    pub limit: Option<f64>,
    /// Take items in the order of this seeded shuffle (with --limit: a seeded sample).
    #[arg(long)]
    pub sample_seed: Option<u64>,
    /// Task files in the layout of ../shared/data/README.md. Without it, each task's split
    /// comes from the Hugging Face hub (hf-hub cache; HF_HUB_OFFLINE=1 reads only the
    /// cache) and is written once under <cache-dir>/hub-data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "results")]
    pub out_dir: PathBuf,
    /// Response cache (resume and re-runs cost no requests).
    #[arg(long, default_value = "results/.cache")]
    pub cache_dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Few-shot examples for mmlu (default 5) and arithmetic (default 3).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Generative tasks: sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Generative tasks: max new tokens (default: the task's).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Generative tasks: samples per item (`n`); pass@1 is their mean.
    #[arg(long, default_value_t = 1)]
    pub samples_per_item: usize,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
}

pub fn run(settings: &EvalSettings) -> Result<()> {
    let EvalSettings {
        base_url,
        model,
        tasks: names,
        limit,
        sample_seed,
        data_dir,
        out_dir,
        cache_dir,
        concurrency,
        num_fewshot,
        temperature,
        max_tokens,
        seed,
        samples_per_item,
        api_key,
    } = settings.clone();
    if names.is_empty() {
        anyhow::bail!("no tasks given (--tasks); known: {}", tasks::known_tasks());
    }
    if temperature < 0.0 || samples_per_item == 0 {
        anyhow::bail!("--temperature must be >= 0 and --samples-per-item >= 1");
    }
    // Every task loads before the first request, so a bad name or file costs nothing.
    let selection = eval::TaskSelection {
        data_dir,
        hub_cache: cache_dir.join("hub-data"),
        limit,
        num_fewshot,
        sample_seed,
    };
    let mut loaded = Vec::new();
    for t in &names {
        let docs = eval::load_task(t, &selection).with_context(|| match selection.data_dir {
            Some(_) => format!("task {t}"),
            None => format!("task {t} (no --data-dir, so from the Hugging Face hub)"),
        })?;
        loaded.push((t.clone(), docs));
    }
    let client = Client::new(&base_url, api_key, Some(cache_dir));
    let settings = GenSettings {
        temperature,
        max_tokens,
        seed,
        samples: samples_per_item,
        ..GenSettings::default()
    };
    for (task, docs) in loaded {
        let started = std::time::Instant::now();
        let waited = client.waiting_seconds();
        let r = eval::run_loaded(&client, &model, &task, &docs, &settings, concurrency)
            .with_context(|| format!("task {task}"))?;
        let path = eval::write_result(&out_dir, &r)?;
        println!(
            "{task}: {} {:.4} {} {:.4} (n={}) -> {}",
            r.metrics[0],
            r.acc,
            r.metrics[1],
            r.acc_norm,
            r.items.len(),
            path.display()
        );
        let wall = started.elapsed().as_secs_f64();
        let waiting = client.waiting_seconds() - waited;
        println!(
            "{task}: {:.1} items/s, wall {wall:.2} s, waiting on the server {waiting:.2} s (summed over {concurrency} workers)",
            r.items.len() as f64 / wall
        );
    }
    println!("requests sent: {}", client.requests_sent());
    Ok(())
}
