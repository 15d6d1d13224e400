//! `pruneval` command line: `eval` runs tasks against a server, `compare` prints retention tables,
//! `bench` load-tests, `sgr` generates training data, `ablate` searches plans, `finetune` drives
//! fine-tuning jobs and `recover` runs the whole recovery loop.

#[path = "../../src/cli_args.rs"]
mod cli_args;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pruneval::loadgen::LoadGen;

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
    Eval(pruneval::eval_command::EvalSettings),
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
    Compare(pruneval::compare_command::CompareSettings),
    /// Fine-tuning jobs on a pruneserve server (OpenAI's Fine-tuning API).
    #[command(subcommand)]
    Finetune(pruneval::finetune::FinetuneCommand),
    /// The recovery loop from a manifest: SGR from the base, fine-tune the pruned variant on it,
    /// evaluate base / pruned / recovered, and write the comparison report.
    Recover {
        /// The recovery manifest (TOML; see README "The recovery loop").
        manifest: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(cli_args::parse_or_exit::<Cli>()) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval(settings) => pruneval::eval_command::run(&settings),
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
                            "{m} c={c}: {:.0} output tok/s, TTFT p50 {:.1} ms p99 {:.1} ms, ITL p50 {:.1} ms p99 {:.1} ms, {:.1} tok/s per request",
                            r.output_tok_per_s, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, r.decode_tok_per_s_per_request
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
        Command::Compare(settings) => {
            pruneval::compare_command::run(&settings)?;
            Ok(())
        }
        Command::Finetune(cmd) => pruneval::finetune::run(&cmd),
        Command::Recover { manifest } => pruneval::recover::run(&manifest),
    }
}
