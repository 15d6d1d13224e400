//! Fine-tuning as a service: OpenAI's Files and Fine-tuning APIs over a state directory, jobs run
//! one at a time by a trainer process, and each succeeded job served as a LoRA variant on the plan
//! it trained.
//!
//! - [`files`]: uploads validated before they are stored.
//! - [`jobs`]: job, event and checkpoint objects on disk; restart rules.
//! - [`request`]: every limit a job request is held to, the paper's defaults.
//! - [`runner`]: the queue's worker: the plan's checkpoint (`prune`, cached per plan), the trainer
//!   process and its protocol, cancellation, registration of the adapter.
//!
//! Off unless `--state-dir` is given: the endpoints then answer 404 naming the flag.

pub mod files;
pub mod jobs;
pub mod request;
mod runner;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use serde::Serialize;
use serde_json::json;

use crate::registry::{Registry, RegistryError};
use files::FileStore;
use jobs::{Job, JobStore, Status};
use request::CreateJob;

/// The reference trainer, written into the state directory at start.
const REFERENCE_TRAINER: &str = include_str!("trainer.py");

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("no such file: `{0}`")]
    NoSuchFile(String),
    #[error("no such fine-tuning job: `{0}`")]
    NoSuchJob(String),
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    #[error("the training file has {bad_lines} invalid lines; {first}")]
    BadTrainingFile { bad_lines: usize, first: String },
    #[error("the upload is larger than {max} bytes (--max-file-bytes)")]
    TooLarge { max: u64 },
    #[error("job `{id}` is already {status:?} and cannot be cancelled")]
    NotCancellable { id: String, status: Status },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("--trainer-cmd `{0}` is not a command line")]
    TrainerCommand(String),
}

impl FinetuneError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        FinetuneError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// `serve`'s fine-tuning flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    /// Directory holding uploaded files, fine-tuning jobs and their adapters; turns the Files and
    /// Fine-tuning APIs on. Survives restarts: succeeded jobs are served again.
    #[arg(long, env = "PRUNESERVE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Trainer command line; `{trainer}` is the reference trainer's path. The job spec's path is
    /// appended as the last argument (protocol in README "Fine-tuning").
    #[arg(long, default_value = "python3 {trainer}")]
    pub trainer_cmd: String,
    /// Device handed to the trainer: `auto` (CUDA when torch sees one), `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub trainer_device: String,
    /// Largest file accepted by `POST /v1/files`.
    #[arg(long, default_value_t = 512 << 20)]
    pub max_file_bytes: u64,
}

pub struct FineTuning {
    pub files: FileStore,
    pub jobs: JobStore,
    registry: Arc<Registry>,
    queue: Mutex<mpsc::Sender<String>>,
    state_dir: PathBuf,
    trainer_argv: Vec<String>,
    trainer_device: String,
}

impl FineTuning {
    /// Opens the state directory (none given: fine-tuning is off), serves succeeded jobs again,
    /// fails jobs that were running, queues queued ones, and starts the worker.
    pub fn start(
        args: &FinetuneArgs,
        registry: Arc<Registry>,
    ) -> Result<Option<Arc<Self>>, FinetuneError> {
        let Some(state_dir) = args.state_dir.clone() else {
            return Ok(None);
        };
        // Absolute, because the trainer runs in the job's directory.
        std::fs::create_dir_all(&state_dir).map_err(|e| FinetuneError::io(&state_dir, e))?;
        let state_dir = state_dir
            .canonicalize()
            .map_err(|e| FinetuneError::io(&state_dir, e))?;
        let trainer = state_dir.join("trainer").join("pruneserve_sft.py");
        if let Some(dir) = trainer.parent() {
            std::fs::create_dir_all(dir).map_err(|e| FinetuneError::io(dir, e))?;
        }
        std::fs::write(&trainer, REFERENCE_TRAINER).map_err(|e| FinetuneError::io(&trainer, e))?;
        let line = args
            .trainer_cmd
            .replace("{trainer}", &trainer.to_string_lossy());
        let trainer_argv = shlex::split(&line)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| FinetuneError::TrainerCommand(args.trainer_cmd.clone()))?;
        let files = FileStore::open(state_dir.join("files"), args.max_file_bytes)?;
        let (jobs, requeue, succeeded) = JobStore::open(state_dir.join("jobs"))?;
        let (tx, rx) = mpsc::channel();
        let ft = Arc::new(Self {
            files,
            jobs,
            registry,
            queue: Mutex::new(tx),
            state_dir,
            trainer_argv,
            trainer_device: args.trainer_device.clone(),
        });
        for id in succeeded {
            if let Err(e) = runner::register(&ft, &id) {
                tracing::warn!(job = %id, error = %e, "a fine-tuned model could not be served again");
                let _ = ft.jobs.event(
                    &id,
                    "warn",
                    &format!("not served after restart: {e}"),
                    json!({}),
                    "message",
                );
            }
        }
        for id in requeue {
            ft.enqueue(&id);
        }
        let worker = ft.clone();
        std::thread::Builder::new()
            .name("finetune-worker".into())
            .spawn(move || {
                for id in rx {
                    runner::run_job(&worker, &id);
                }
            })
            .map_err(|e| FinetuneError::io(&ft.state_dir, e))?;
        Ok(Some(ft))
    }

    fn enqueue(&self, id: &str) {
        let sent = self
            .queue
            .lock()
            .map(|q| q.send(id.to_string()).is_ok())
            .unwrap_or(false);
        if !sent {
            let _ = self.jobs.finish(
                id,
                Status::Failed,
                Some(("queue_closed", "the job queue has stopped")),
            );
        }
    }

    /// Checks a job request against the served models and stored files, stores it, queues it.
    pub fn create_job(&self, req: CreateJob) -> Result<Job, FinetuneError> {
        let target = self.registry.resolve(&req.model)?;
        if target.ad_hoc {
            return Err(FinetuneError::Invalid {
                param: "model",
                message: "fine-tune a served base or variant; create the plan with POST /v1/variants first".into(),
            });
        }
        if target.lora.is_some() || target.overlay.is_some() {
            return Err(FinetuneError::Invalid {
                param: "model",
                message: format!(
                    "`{}` already carries an adapter or overlay; fine-tune its plan",
                    req.model
                ),
            });
        }
        let settings = req.settings(
            &target.base.name,
            target.plan.layers().to_vec(),
            target.base.limits.max_lora_rank,
        )?;
        let training = self.files.get(&req.training_file)?;
        if let Some(v) = &req.validation_file {
            self.files.get(v)?;
        }
        let id = new_id("ftjob");
        let fine_tuned_model = format!(
            "ft:{}:{}:{id}",
            req.model.replace('/', "-"),
            settings.suffix.as_deref().unwrap_or("")
        );
        crate::registry::check_name(&fine_tuned_model, false)?;
        let job = Job {
            id: id.clone(),
            object: "fine_tuning.job".into(),
            created_at: now(),
            finished_at: None,
            model: req.model.clone(),
            fine_tuned_model: Some(fine_tuned_model),
            organization_id: "pruneserve".into(),
            result_files: Vec::new(),
            status: Status::ValidatingFiles,
            training_file: training.id.clone(),
            validation_file: req.validation_file.clone(),
            hyperparameters: settings.hyperparameters,
            method: settings.method,
            trained_tokens: None,
            error: None,
            seed: req.seed.unwrap_or(42),
            user_provided_suffix: settings.suffix.clone(),
            suffix: settings.suffix,
            estimated_finish: None,
            integrations: Vec::new(),
            metadata: req.metadata.clone(),
            pruneserve: settings.extension,
        };
        self.jobs.insert(job)?;
        let msg = format!(
            "Files validated ({} conversations), moving job to queued state",
            training.examples
        );
        self.jobs.event(&id, "info", &msg, json!({}), "message")?;
        let job = self.jobs.update(&id, |j| j.status = Status::Queued)?;
        self.enqueue(&id);
        Ok(job)
    }

    /// Cancels a queued or running job (a running trainer is killed within a second).
    pub fn cancel(&self, id: &str) -> Result<Job, FinetuneError> {
        let job = self.jobs.get(id)?;
        if job.status.is_final() {
            return Err(FinetuneError::NotCancellable {
                id: id.to_string(),
                status: job.status,
            });
        }
        self.jobs.finish(id, Status::Cancelled, None)?;
        self.jobs.get(id)
    }
}

/// `<prefix>-<24 hex digits>`.
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes JSON aside and renames it over `path`, so readers never see half a file.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<(), FinetuneError> {
    let tmp = path.with_extension(format!("tmp-{}", rand::random::<u32>()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| FinetuneError::io(path, e))?;
    std::fs::write(&tmp, bytes).map_err(|e| FinetuneError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FinetuneError::io(path, e))
}
