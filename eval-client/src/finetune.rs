//! `pruneval finetune create|list|get|events|cancel|wait`: fine-tuning jobs through a server's
//! OpenAI Fine-tuning API. `create` uploads a training file given as a path (a `file-…` id is used
//! as it is) and, with `--wait`, follows the job; `wait` prints each new event as it appears and
//! fails unless the job succeeds. The LoRA and trainer flags fill pruneserve's `pruneserve`
//! extension object.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use crate::client::{Client, ClientError};

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    pub base_url: String,
    #[arg(long, env = "OPENAI_API_KEY")]
    pub api_key: Option<String>,
}

impl ServerArgs {
    pub fn client(&self) -> Client {
        Client::new(&self.base_url, self.api_key.clone(), None)
    }
}

/// A job request; unset flags take the server's defaults (the paper's recipe).
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// A served base or plan variant (the pruned model to recover).
    #[arg(long)]
    pub model: String,
    /// A JSONL path (uploaded first) or a `file-…` id.
    #[arg(long)]
    pub training_file: String,
    #[arg(long)]
    pub validation_file: Option<String>,
    #[arg(long)]
    pub suffix: Option<String>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub n_epochs: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub learning_rate_multiplier: Option<f64>,
    #[arg(long)]
    pub lora_r: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated projections (default: all seven).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// `auto`, `true` or `false`.
    #[arg(long)]
    pub load_in_4bit: Option<String>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u32>,
}

#[derive(Debug, clap::Subcommand)]
pub enum FinetuneCommand {
    /// Create a job (uploading the training file when it is a path).
    Create {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        job: Box<JobArgs>,
        /// Follow the job to its end.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print a job.
    Get {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Print a job's events, oldest first.
    Events {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Cancel a queued or running job.
    Cancel {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
    },
    /// Follow a job, printing its events, until it ends; fails unless it succeeds.
    Wait {
        #[command(flatten)]
        server: ServerArgs,
        id: String,
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        timeout_s: u64,
    },
}

pub fn run(cmd: &FinetuneCommand) -> Result<()> {
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cmd {
        FinetuneCommand::Create { server, job, wait } => {
            let client = server.client();
            let created = create(&client, job)?;
            print(&created);
            if *wait {
                let id = created["id"].as_str().unwrap_or_default();
                let done = wait_for(&client, id, Duration::from_secs(7 * 24 * 3600), print_event)?;
                println!(
                    "fine_tuned_model: {}",
                    done["fine_tuned_model"].as_str().unwrap_or("")
                );
            }
        }
        FinetuneCommand::List { server } => {
            print(&server.client().get("/v1/fine_tuning/jobs?limit=10000")?)
        }
        FinetuneCommand::Get { server, id } => print(&server.client().get(&job_path(id, ""))?),
        FinetuneCommand::Events { server, id } => {
            for e in events(&server.client(), id)?.iter().rev() {
                print_event(e);
            }
        }
        FinetuneCommand::Cancel { server, id } => print(
            &server
                .client()
                .post_uncached(&job_path(id, "/cancel"), &json!({}))?,
        ),
        FinetuneCommand::Wait {
            server,
            id,
            timeout_s,
        } => {
            let done = wait_for(
                &server.client(),
                id,
                Duration::from_secs(*timeout_s),
                print_event,
            )?;
            println!(
                "fine_tuned_model: {}",
                done["fine_tuned_model"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn job_path(id: &str, tail: &str) -> String {
    // Ids are used as path segments; anything but an id's characters is refused by the server.
    let id: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    format!("/v1/fine_tuning/jobs/{id}{tail}")
}

fn print_event(e: &Value) {
    println!(
        "[{}] {}",
        e["level"].as_str().unwrap_or("info"),
        e["message"].as_str().unwrap_or("")
    );
}

/// The file id for `--training-file`: a `file-…` id that is not a path is taken as it is.
pub fn file_id(client: &Client, given: &str) -> Result<String, ClientError> {
    if given.starts_with("file-") && !Path::new(given).exists() {
        return Ok(given.to_string());
    }
    let f = client.upload(Path::new(given), "fine-tune")?;
    Ok(f["id"].as_str().unwrap_or_default().to_string())
}

/// Creates the job (uploading files given as paths); returns the job object.
pub fn create(client: &Client, job: &JobArgs) -> Result<Value> {
    let training = file_id(client, &job.training_file)?;
    let validation = job
        .validation_file
        .as_deref()
        .map(|v| file_id(client, v))
        .transpose()?;
    let mut hyper = Map::new();
    put(&mut hyper, "n_epochs", job.n_epochs);
    put(&mut hyper, "batch_size", job.batch_size);
    put(
        &mut hyper,
        "learning_rate_multiplier",
        job.learning_rate_multiplier,
    );
    let mut ext = Map::new();
    put(&mut ext, "lora_r", job.lora_r);
    put(&mut ext, "lora_alpha", job.lora_alpha);
    put(&mut ext, "lora_dropout", job.lora_dropout);
    if !job.target_modules.is_empty() {
        ext.insert("target_modules".into(), json!(job.target_modules));
    }
    match job.load_in_4bit.as_deref() {
        None => {}
        Some("auto") => put(&mut ext, "load_in_4bit", Some("auto")),
        Some("true") => put(&mut ext, "load_in_4bit", Some(true)),
        Some("false") => put(&mut ext, "load_in_4bit", Some(false)),
        Some(other) => bail!("--load-in-4bit is auto, true or false, not `{other}`"),
    }
    put(&mut ext, "max_seq_len", job.max_seq_len);
    put(&mut ext, "warmup_steps", job.warmup_steps);
    put(&mut ext, "max_steps", job.max_steps);
    let mut body = json!({
        "model": job.model,
        "training_file": training,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "pruneserve": ext,
    });
    put_into(&mut body, "validation_file", validation);
    put_into(&mut body, "suffix", job.suffix.clone());
    put_into(&mut body, "seed", job.seed);
    Ok(client.post_uncached("/v1/fine_tuning/jobs", &body)?)
}

fn put<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        m.insert(key.into(), json!(v));
    }
}

fn put_into<T: serde::Serialize>(body: &mut Value, key: &str, v: Option<T>) {
    if let Some(obj) = body.as_object_mut() {
        put(obj, key, v);
    }
}

/// A job's events, newest first.
pub fn events(client: &Client, id: &str) -> Result<Vec<Value>, ClientError> {
    let v = client.get(&job_path(id, "/events?limit=10000"))?;
    Ok(v["data"].as_array().cloned().unwrap_or_default())
}

/// Polls the job until it ends, handing each new event to `on_event` in order; the job when it
/// succeeded, else an error with its status and error message.
pub fn wait_for(
    client: &Client,
    id: &str,
    timeout: Duration,
    on_event: impl Fn(&Value),
) -> Result<Value> {
    let start = Instant::now();
    let mut seen = HashSet::new();
    loop {
        let job = client.get(&job_path(id, ""))?;
        for e in events(client, id)?.iter().rev() {
            if seen.insert(e["id"].as_str().unwrap_or_default().to_string()) {
                on_event(e);
            }
        }
        match job["status"].as_str() {
            Some("succeeded") => return Ok(job),
            Some(s @ ("failed" | "cancelled")) => {
                let why = job["error"]["message"].as_str().unwrap_or("no error given");
                bail!("job {id} {s}: {}", why.replace('\n', " | "))
            }
            _ => {}
        }
        if start.elapsed() > timeout {
            bail!("job {id} did not end within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
