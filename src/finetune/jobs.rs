//! Fine-tuning jobs as OpenAI shapes them (job, event, checkpoint objects), kept under
//! `<state>/jobs/<id>/`: `job.json` rewritten whole on every change, `events.jsonl` and
//! `checkpoints.jsonl` appended. On open, a job found `running` (the server died under it) is
//! marked failed with that reason — never resumed, never left running — and queued jobs queue
//! again in creation order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{new_id, now, write_json_atomic, FinetuneError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// OpenAI's hyperparameters, resolved (no `"auto"` left).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hyperparameters {
    pub n_epochs: u32,
    pub batch_size: u32,
    pub learning_rate_multiplier: f64,
}

/// The documented extension: LoRA and trainer settings, and where the job's files are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Extension {
    /// The base whose weights are trained and the base layers of the plan, in order.
    pub base: String,
    pub plan_layers: Vec<usize>,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    /// `true`, `false` or `"auto"` (4-bit when bitsandbytes and a GPU are there).
    pub load_in_4bit: Value,
    pub max_seq_len: usize,
    pub warmup_steps: u32,
    pub max_steps: Option<u32>,
    pub learning_rate: f64,
    /// The reference trainer's backend: `auto` (TRL's SFTTrainer when installed), `trl`,
    /// `transformers`.
    #[serde(default = "auto")]
    pub trainer: String,
    /// The pruned checkpoint the trainer loads, and the adapter it wrote.
    pub training_checkpoint: Option<String>,
    pub adapter_dir: Option<String>,
    /// Training throughput the trainer reported.
    pub train_tokens_per_second: Option<f64>,
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub model: String,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub status: Status,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub hyperparameters: Hyperparameters,
    pub method: Value,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub suffix: Option<String>,
    pub user_provided_suffix: Option<String>,
    pub estimated_finish: Option<u64>,
    pub integrations: Vec<Value>,
    pub metadata: Option<Value>,
    pub pruneserve: Extension,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    pub data: Value,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub metrics: Value,
    pub step_number: u64,
    /// The adapter directory of this checkpoint (extension).
    pub path: String,
}

struct Entry {
    job: Job,
    events: Vec<Event>,
    checkpoints: Vec<Checkpoint>,
}

pub struct JobStore {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<String, Entry>>,
}

impl JobStore {
    /// Opens the store; returns it with the ids of jobs to queue again and of jobs that had
    /// succeeded (their adapters are registered again).
    pub fn open(dir: PathBuf) -> Result<(Self, Vec<String>, Vec<String>), FinetuneError> {
        std::fs::create_dir_all(&dir).map_err(|e| FinetuneError::io(&dir, e))?;
        let store = Self {
            dir,
            jobs: Mutex::new(BTreeMap::new()),
        };
        let mut loaded: Vec<Entry> = Vec::new();
        for e in std::fs::read_dir(&store.dir).map_err(|e| FinetuneError::io(&store.dir, e))? {
            let path = e.map_err(|e| FinetuneError::io(&store.dir, e))?.path();
            match read_entry(&path) {
                Ok(entry) => loaded.push(entry),
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "skipping a job directory")
                }
            }
        }
        loaded.sort_by_key(|e| (e.job.created_at, e.job.id.clone()));
        let (mut requeue, mut succeeded) = (Vec::new(), Vec::new());
        for entry in loaded {
            let id = entry.job.id.clone();
            let status = entry.job.status;
            store.lock().insert(id.clone(), entry);
            match status {
                Status::Queued | Status::ValidatingFiles => requeue.push(id),
                Status::Running => store.finish(
                    &id,
                    Status::Failed,
                    Some(("server_restarted", "the server stopped while this job was running; it is not resumed: create the job again")),
                )?,
                Status::Succeeded => succeeded.push(id),
                Status::Failed | Status::Cancelled => {}
            }
        }
        Ok((store, requeue, succeeded))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Stores a new job and its first events.
    pub fn insert(&self, job: Job) -> Result<(), FinetuneError> {
        let dir = self.job_dir(&job.id);
        std::fs::create_dir_all(&dir).map_err(|e| FinetuneError::io(&dir, e))?;
        write_json_atomic(&dir.join("job.json"), &job)?;
        let id = job.id.clone();
        self.lock().insert(
            id.clone(),
            Entry {
                job,
                events: Vec::new(),
                checkpoints: Vec::new(),
            },
        );
        self.event(
            &id,
            "info",
            &format!("Created fine-tuning job: {id}"),
            json!({}),
            "message",
        )
    }

    pub fn get(&self, id: &str) -> Result<Job, FinetuneError> {
        self.lock()
            .get(id)
            .map(|e| e.job.clone())
            .ok_or_else(|| FinetuneError::NoSuchJob(id.chars().take(64).collect()))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.lock().values().map(|e| e.job.clone()).collect();
        jobs.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        jobs
    }

    /// Changes a job and writes it; returns the changed job.
    pub fn update(&self, id: &str, change: impl FnOnce(&mut Job)) -> Result<Job, FinetuneError> {
        let mut jobs = self.lock();
        let entry = jobs
            .get_mut(id)
            .ok_or_else(|| FinetuneError::NoSuchJob(id.to_string()))?;
        change(&mut entry.job);
        write_json_atomic(&self.job_dir(id).join("job.json"), &entry.job)?;
        Ok(entry.job.clone())
    }

    /// Moves a job to a final status (a job already final stays as it is) with an event.
    pub fn finish(
        &self,
        id: &str,
        status: Status,
        error: Option<(&str, &str)>,
    ) -> Result<(), FinetuneError> {
        let mut moved = false;
        self.update(id, |j| {
            if !j.status.is_final() {
                j.status = status;
                j.finished_at = Some(now());
                j.error = error.map(|(code, message)| JobError {
                    code: code.into(),
                    message: message.into(),
                    param: None,
                });
                moved = true;
            }
        })?;
        if moved {
            let (level, message) = match (status, error) {
                (_, Some((_, m))) => ("error", m.to_string()),
                (Status::Succeeded, None) => ("info", "The job has successfully completed".into()),
                _ => ("info", "The job has been cancelled".into()),
            };
            self.event(id, level, &message, json!({}), "message")?;
        }
        Ok(())
    }

    pub fn event(
        &self,
        id: &str,
        level: &str,
        message: &str,
        data: Value,
        kind: &str,
    ) -> Result<(), FinetuneError> {
        let event = Event {
            id: new_id("ftevent"),
            object: "fine_tuning.job.event".into(),
            created_at: now(),
            level: level.into(),
            message: message.into(),
            data,
            kind: kind.into(),
        };
        append_line(&self.job_dir(id).join("events.jsonl"), &event)?;
        if let Some(e) = self.lock().get_mut(id) {
            e.events.push(event);
        }
        Ok(())
    }

    pub fn checkpoint(
        &self,
        id: &str,
        step: u64,
        path: &str,
        metrics: Value,
    ) -> Result<(), FinetuneError> {
        let job = self.get(id)?;
        let name = job.fine_tuned_model.clone().unwrap_or_default();
        let cp = Checkpoint {
            id: new_id("ftckpt"),
            object: "fine_tuning.job.checkpoint".into(),
            created_at: now(),
            fine_tuned_model_checkpoint: format!("{name}:ckpt-step-{step}"),
            fine_tuning_job_id: id.into(),
            metrics,
            step_number: step,
            path: path.into(),
        };
        append_line(&self.job_dir(id).join("checkpoints.jsonl"), &cp)?;
        if let Some(e) = self.lock().get_mut(id) {
            e.checkpoints.push(cp);
        }
        Ok(())
    }

    /// Events, newest first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, FinetuneError> {
        self.newest_first(id, |e| &e.events)
    }

    /// Checkpoints, newest first.
    pub fn checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>, FinetuneError> {
        self.newest_first(id, |e| &e.checkpoints)
    }

    fn newest_first<T: Clone>(
        &self,
        id: &str,
        list: impl Fn(&Entry) -> &Vec<T>,
    ) -> Result<Vec<T>, FinetuneError> {
        let jobs = self.lock();
        let e = jobs
            .get(id)
            .ok_or_else(|| FinetuneError::NoSuchJob(id.to_string()))?;
        Ok(list(e).iter().rev().cloned().collect())
    }
}

fn read_entry(dir: &Path) -> Result<Entry, FinetuneError> {
    let job_file = dir.join("job.json");
    let bytes = std::fs::read(&job_file).map_err(|e| FinetuneError::io(&job_file, e))?;
    let job: Job = serde_json::from_slice(&bytes).map_err(|e| FinetuneError::io(&job_file, e))?;
    Ok(Entry {
        job,
        events: read_lines(&dir.join("events.jsonl")),
        checkpoints: read_lines(&dir.join("checkpoints.jsonl")),
    })
}

/// The parsable lines of a JSON-lines file (a line cut by a crash is skipped).
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn append_line(path: &Path, value: &impl Serialize) -> Result<(), FinetuneError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| FinetuneError::io(path, e))?;
    let line = serde_json::to_string(value).map_err(|e| FinetuneError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| FinetuneError::io(path, e))
}

/// A page of a newest-first list, OpenAI's `after` (an id) and `limit`.
pub fn page<T: Serialize>(
    items: Vec<T>,
    id_of: impl Fn(&T) -> &str,
    after: Option<&str>,
    limit: usize,
) -> Value {
    let start = after
        .and_then(|a| items.iter().position(|x| id_of(x) == a).map(|i| i + 1))
        .unwrap_or(0);
    let rest = items.len().saturating_sub(start);
    let data: Vec<&T> = items.iter().skip(start).take(limit).collect();
    json!({"object": "list", "data": data, "has_more": rest > limit})
}
