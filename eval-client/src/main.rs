//! `pruneval` command line: `eval` runs tasks against a server, `compare` prints retention tables.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pruneval::client::Client;
use pruneval::generation::GenSettings;
use pruneval::loadgen::LoadGen;
use pruneval::{compare, eval, plot, tasks};

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
    /// Run tasks (multiple choice by loglikelihood; generative by generation) and write
    /// results/<model>/<task>.json with per-item records.
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
        /// Take items in the order of this seeded shuffle (with --limit: a seeded sample).
        #[arg(long)]
        sample_seed: Option<u64>,
        /// Task files in the layout of ../shared/data/README.md. Without it, each task's split
        /// comes from the Hugging Face hub (hf-hub cache; HF_HUB_OFFLINE=1 reads only the
        /// cache) and is written once under <cache-dir>/hub-data.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "results")]
        out_dir: PathBuf,
        /// Response cache (resume and re-runs cost no requests).
        #[arg(long, default_value = "results/.cache")]
        cache_dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Few-shot examples for mmlu (default 5) and arithmetic (default 3).
        #[arg(long)]
        num_fewshot: Option<usize>,
        /// Generative tasks: sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Generative tasks: max new tokens (default: the task's).
        #[arg(long)]
        max_tokens: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        /// Generative tasks: samples per item (`n`); pass@1 is their mean.
        #[arg(long, default_value_t = 1)]
        samples_per_item: usize,
        #[arg(long, env = "OPENAI_API_KEY")]
        api_key: Option<String>,
    },
    /// Load-test a server through HTTP: batch-1 decode, streamed generation at several
    /// concurrency levels (TTFT p50/p99, output tok/s) and echo-logprob scoring throughput.
    Bench {
        #[arg(long)]
        base_url: String,
        /// Models to measure, in order (e.g. a base and its pruned variant).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64, 256])]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 512)]
        prompt_len: usize,
        #[arg(long, default_value_t = 256)]
        output_len: usize,
        /// Scoring: this many prompts of --prompt-len tokens (0 skips scoring).
        #[arg(long, default_value_t = 1000)]
        score_prompts: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Send each level's requests round-robin over all `--models` at once (a batch mixing
        /// them, e.g. several LoRA adapters), instead of measuring each model in turn.
        #[arg(long)]
        mix: bool,
        /// Run each generation level this many times (each run is reported).
        #[arg(long, default_value_t = 1)]
        repeats: usize,
        #[arg(long, env = "OPENAI_API_KEY")]
        api_key: Option<String>,
    },
    /// Self-Generated Responses: the model answers a seeded shuffle of a dataset's user prompts
    /// (the paper's settings by default); writes an OpenAI chat-format training file, a
    /// provenance file and a summary. Interrupted runs resume exactly where they stopped.
    Sgr(pruneval::sgr::SgrSettings),
    /// Layer ablations through ad-hoc plans: the single-layer sweep (every layer but the first
    /// dropped alone) and, with --iterations N, the paper's greedy pruning; writes a table, a
    /// JSON file, a sweep plot and a layer × iteration heatmap.
    Ablate(pruneval::ablate::AblateSettings),
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
        } => {
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
                let docs =
                    eval::load_task(t, &selection).with_context(|| match selection.data_dir {
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
        Command::Bench {
            base_url,
            models,
            concurrency,
            prompt_len,
            output_len,
            score_prompts,
            json,
            mix,
            repeats,
            api_key,
        } => {
            let gen = LoadGen::new(&base_url, api_key)?;
            let mut levels = Vec::new();
            let mut scoring = Vec::new();
            let groups: Vec<Vec<String>> = if mix {
                vec![models.clone()]
            } else {
                models.iter().map(|m| vec![m.clone()]).collect()
            };
            for group in &groups {
                let m = group.join("+");
                // Warm-up: one short request each so start-up costs stay out of the figures.
                for one in group {
                    gen.generation_level(std::slice::from_ref(one), 1, 1, prompt_len, 8)?;
                }
                for &c in &concurrency {
                    for _ in 0..repeats.max(1) {
                        let r = gen.generation_level(group, c, c.max(4), prompt_len, output_len)?;
                        println!(
                            "{m} c={c}: {:.0} output tok/s, TTFT p50 {:.1} ms p99 {:.1} ms, {:.1} tok/s per request",
                            r.output_tok_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.decode_tok_per_s_per_request
                        );
                        levels.push(r);
                    }
                }
                if score_prompts > 0 && !mix {
                    let r = gen.scoring(&m, score_prompts, prompt_len, 16, 16)?;
                    println!(
                        "{m} scoring: {:.0} prompt tok/s ({} prompts, {:.1} s)",
                        r.prompt_tok_per_s, r.prompts, r.wall_s
                    );
                    scoring.push(r);
                }
            }
            if let Some(path) = json {
                let v = serde_json::json!({"generation": levels, "scoring": scoring,
                    "prompt_len": prompt_len, "output_len": output_len});
                std::fs::write(&path, serde_json::to_string_pretty(&v)?)
                    .with_context(|| format!("write {}", path.display()))?;
            }
            Ok(())
        }
        Command::Sgr(mut settings) => {
            settings.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let s = pruneval::sgr::run(&settings)?;
            println!(
                "records {:?}; skipped rows {:?}; {} completion tokens in {:.1} s (client CPU {:.2} %)",
                s.records,
                s.skipped_rows,
                s.completion_tokens,
                s.wall_s,
                100.0 * s.client_cpu_share
            );
            Ok(())
        }
        Command::Ablate(settings) => {
            let a = pruneval::ablate::run(&settings)?;
            let files = pruneval::ablate::write_reports(&settings.out_dir, &a)?;
            println!("{}", pruneval::ablate::report::markdown(&a));
            for f in files {
                println!("wrote {}", f.display());
            }
            println!("requests sent: {}", a.requests_sent);
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
            let mut results = Vec::new();
            let mut tasks_shown = names.clone();
            // The arithmetic probe sits beside the task scores whenever every model has it.
            let probe = "arithmetic".to_string();
            let has_probe = std::iter::once(&base)
                .chain(&variants)
                .all(|m| eval::result_path(&out_dir, m, &probe).exists());
            if has_probe && !tasks_shown.contains(&probe) {
                tasks_shown.push(probe);
            }
            for task in &tasks_shown {
                let b = eval::read_result(&out_dir, &base, task)?;
                for v in &variants {
                    let r = eval::read_result(&out_dir, v, task)?;
                    rows.push(compare::compare(&b, &r, norm).map_err(anyhow::Error::msg)?);
                    results.push(r);
                }
                results.insert(results.len() - variants.len(), b);
            }
            let table =
                compare::markdown(&base, &rows) + &pruneval::analysis::report::markdown(&results);
            println!("{table}");
            let [md, json, png] = compare::report_paths(&out_dir, &base);
            std::fs::write(&md, &table).with_context(|| format!("write {}", md.display()))?;
            std::fs::write(&json, serde_json::to_string_pretty(&rows)?)
                .with_context(|| format!("write {}", json.display()))?;
            plot::retention_chart(&png, &base, &rows)?;
            println!(
                "\nwrote {}, {} and {}",
                md.display(),
                json.display(),
                png.display()
            );
            let failures = png.with_file_name(format!(
                "{}-failures.png",
                png.file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("compare")
            ));
            if pruneval::analysis::report::failure_chart(&failures, &results)? {
                println!("wrote {}", failures.display());
            }
            Ok(())
        }
    }
}
