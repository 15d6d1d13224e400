//! The queue's worker: runs one job at a time.
//!
//! 1. The plan's checkpoint: the base directory for a full plan, else `prune`'s output cached under
//!    `<state>/checkpoints/<base>-<plan hash>/` (written aside, renamed into place).
//! 2. `spec.json` in the job directory, the trainer started as `--trainer-cmd … SPEC` in its own
//!    process group, its stdout read as the protocol (one JSON object per line: `metrics`,
//!    `checkpoint`, `message`, `result`), its stderr kept in `trainer.log`.
//! 3. Cancellation (the job turned `cancelled` by the API) kills the process group.
//! 4. Exit 0 with a `result` naming an adapter: the adapter is served as the job's
//!    `fine_tuned_model` on the job's model, through the checkpoint's lineage.
//!    Anything else fails the job with the exit status and the last stderr lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::jobs::{Job, Status};
use super::{write_json_atomic, FineTuning, FinetuneError};
use crate::checkpoint::prune::prune_checkpoint;
use crate::plan::PlanSpec;

/// Lines of the trainer's stderr quoted in a failed job's error.
const STDERR_TAIL: usize = 20;

/// Runs a queued job to its end; a job no longer queued (cancelled meanwhile) is skipped.
pub(super) fn run_job(ft: &FineTuning, id: &str) {
    let Ok(job) = ft.jobs.get(id) else { return };
    if job.status != Status::Queued {
        return;
    }
    let span = tracing::info_span!("finetune", job = %id);
    let _enter = span.enter();
    let outcome = ft
        .jobs
        .update(id, |j| j.status = Status::Running)
        .and_then(|_| {
            ft.jobs
                .event(id, "info", "Fine-tuning job started", json!({}), "message")
        })
        .and_then(|_| train(ft, &job));
    let result = match outcome {
        Ok(Trained::Cancelled) => Ok(()),
        Ok(Trained::Adapter {
            dir,
            tokens,
            tokens_per_second,
        }) => ft
            .jobs
            .update(id, |j| {
                j.trained_tokens = Some(tokens);
                j.pruneserve.adapter_dir = Some(dir.display().to_string());
                j.pruneserve.train_tokens_per_second = tokens_per_second;
            })
            .and_then(|_| register(ft, id))
            .and_then(|_| ft.jobs.finish(id, Status::Succeeded, None)),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "fine-tuning job failed");
        let message = e.to_string();
        let _ = ft
            .jobs
            .finish(id, Status::Failed, Some(("job_failed", &message)));
    } else {
        tracing::info!("fine-tuning job ended");
    }
}

/// Serves a succeeded job's adapter as its `fine_tuned_model`.
pub(super) fn register(ft: &FineTuning, id: &str) -> Result<(), FinetuneError> {
    let job = ft.jobs.get(id)?;
    let (Some(name), Some(dir)) = (&job.fine_tuned_model, &job.pruneserve.adapter_dir) else {
        return Err(FinetuneError::Invalid {
            param: "job",
            message: format!("job `{id}` has no adapter"),
        });
    };
    let origin = json!({"job_id": job.id, "training_file": job.training_file,
        "validation_file": job.validation_file, "hyperparameters": job.hyperparameters,
        "lora_r": job.pruneserve.lora_r, "lora_alpha": job.pruneserve.lora_alpha,
        "seed": job.seed, "trained_tokens": job.trained_tokens});
    ft.registry
        .add_fine_tuned(name, &job.model, Path::new(dir), origin)?;
    ft.jobs
        .event(id, "info", &format!("Serving {name}"), json!({}), "message")
}

enum Trained {
    Adapter {
        dir: PathBuf,
        tokens: u64,
        tokens_per_second: Option<f64>,
    },
    Cancelled,
}

fn train(ft: &FineTuning, job: &Job) -> Result<Trained, FinetuneError> {
    let checkpoint = plan_checkpoint(ft, job)?;
    ft.jobs.update(&job.id, |j| {
        j.pruneserve.training_checkpoint = Some(checkpoint.display().to_string());
    })?;
    let job_dir = ft.jobs.job_dir(&job.id);
    let spec_path = job_dir.join("spec.json");
    write_json_atomic(&spec_path, &spec(ft, job, &checkpoint, &job_dir)?)?;
    let mut command = Command::new(&ft.trainer_argv[0]);
    command
        .args(&ft.trainer_argv[1..])
        .arg(&spec_path)
        .current_dir(&job_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: between fork and exec only prctl, which is async-signal-safe, is called: the
    // trainer is killed when the worker thread that started it (the server) goes away.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| FinetuneError::io(Path::new(&ft.trainer_argv[0]), e))?;
    ft.jobs.event(
        &job.id,
        "info",
        "Trainer started",
        json!({"pid": child.id()}),
        "message",
    )?;
    let tail = Mutex::new(VecDeque::new());
    let result = Mutex::new(None);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let log = job_dir.join("trainer.log");
    let cancelled = std::thread::scope(|scope| {
        if let Some(out) = stdout {
            scope.spawn(|| read_protocol(ft, &job.id, out, &result));
        }
        if let Some(err) = stderr {
            scope.spawn(|| keep_stderr(err, &log, &tail));
        }
        wait_or_cancel(ft, &job.id, &mut child)
    })?;
    if cancelled {
        return Ok(Trained::Cancelled);
    }
    let status = child.wait().map_err(|e| FinetuneError::io(&spec_path, e))?;
    let lines: Vec<String> = tail
        .lock()
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    let reported = result.lock().ok().and_then(|r| r.clone());
    match (status.success(), reported) {
        (true, Some(r)) => adapter_of(&r),
        (ok, _) => Err(FinetuneError::Invalid {
            param: "trainer",
            message: format!(
                "the trainer {}; last stderr lines:\n{}",
                if ok {
                    "exited without reporting a result".to_string()
                } else {
                    format!("failed ({status})")
                },
                lines.join("\n")
            ),
        }),
    }
}

/// The trainer's input: everything it needs, resolved (see README "Fine-tuning" for the fields).
fn spec(
    ft: &FineTuning,
    job: &Job,
    checkpoint: &Path,
    job_dir: &Path,
) -> Result<Value, FinetuneError> {
    let file = |id: &str| ft.files.content_path(id).map(|p| p.display().to_string());
    let validation = job.validation_file.as_deref().map(file).transpose()?;
    let x = &job.pruneserve;
    let batch = job.hyperparameters.batch_size;
    // The paper's 4 per device, accumulated to the requested batch.
    let per_device = (1..=batch.min(4))
        .rev()
        .find(|d| batch.is_multiple_of(*d))
        .unwrap_or(1);
    Ok(json!({
        "protocol": 1,
        "job_id": job.id,
        "model_dir": checkpoint,
        "training_file": file(&job.training_file)?,
        "validation_file": validation,
        "output_dir": job_dir.join("adapter"),
        "checkpoint_dir": job_dir.join("checkpoints"),
        "seed": job.seed,
        "n_epochs": job.hyperparameters.n_epochs,
        "batch_size": batch,
        "per_device_batch_size": per_device,
        "gradient_accumulation_steps": batch / per_device,
        "learning_rate": x.learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": x.warmup_steps,
        "max_steps": x.max_steps,
        "weight_decay": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.99,
        "max_grad_norm": 1.0,
        "max_seq_len": x.max_seq_len,
        "lora": {"r": x.lora_r, "alpha": x.lora_alpha, "dropout": x.lora_dropout,
                 "target_modules": x.target_modules},
        "load_in_4bit": x.load_in_4bit,
        "trainer": x.trainer,
        "device": ft.trainer_device,
    }))
}

/// The checkpoint the trainer loads: the base itself for its full plan, else the plan written by
/// `prune` once and reused.
fn plan_checkpoint(ft: &FineTuning, job: &Job) -> Result<PathBuf, FinetuneError> {
    let layers = &job.pruneserve.plan_layers;
    let base = ft
        .registry
        .bases()
        .iter()
        .find(|b| b.name == job.pruneserve.base)
        .ok_or_else(|| crate::registry::RegistryError::UnknownModel(job.pruneserve.base.clone()))?;
    let n = base.model.dir.config.num_hidden_layers;
    if layers.len() == n && layers.iter().enumerate().all(|(i, &l)| i == l) {
        return Ok(base.model.dir.path.clone());
    }
    let key = layers.iter().fold(0xcbf29ce484222325u64, |h, &l| {
        (h ^ l as u64).wrapping_mul(0x100000001b3)
    });
    let root = ft.state_dir.join("checkpoints");
    let dir = root.join(format!("{}-{key:016x}", base.name.replace('/', "-")));
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".partial-{}", job.id));
    let _ = std::fs::remove_dir_all(&tmp);
    let spec = PlanSpec::Keep(layers.clone().into());
    prune_checkpoint(&base.model.dir, &base.source, &spec, &tmp)
        .map_err(|e| FinetuneError::io(&tmp, e))?;
    std::fs::rename(&tmp, &dir).map_err(|e| FinetuneError::io(&dir, e))?;
    let msg = format!(
        "Wrote the plan's checkpoint ({} of {n} layers)",
        layers.len()
    );
    ft.jobs
        .event(&job.id, "info", &msg, json!({"path": dir}), "message")?;
    Ok(dir)
}

/// Polls the trainer; kills its process group when the job is cancelled. `true`: cancelled.
fn wait_or_cancel(ft: &FineTuning, id: &str, child: &mut Child) -> Result<bool, FinetuneError> {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(false),
            Ok(None) => {}
            Err(e) => return Err(FinetuneError::io(Path::new("trainer"), e)),
        }
        if ft
            .jobs
            .get(id)
            .map(|j| j.status == Status::Cancelled)
            .unwrap_or(true)
        {
            // SAFETY: signals the process group the trainer was started in (its pid, via
            // `process_group(0)`); no memory is touched.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads the trainer's protocol lines into events, checkpoints and the final result.
fn read_protocol(
    ft: &FineTuning,
    id: &str,
    out: impl std::io::Read,
    result: &Mutex<Option<Value>>,
) {
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::debug!(line = %line, "trainer stdout");
            continue;
        };
        let stored = match msg["type"].as_str() {
            Some("metrics") => {
                let (what, loss) = match msg["valid_loss"].as_f64() {
                    Some(v) => ("validation", v),
                    None => ("training", msg["train_loss"].as_f64().unwrap_or(f64::NAN)),
                };
                let text = format!(
                    "Step {}/{}: {what} loss={loss:.4}",
                    msg["step"], msg["total_steps"]
                );
                ft.jobs.event(id, "info", &text, msg.clone(), "metrics")
            }
            Some("checkpoint") => ft.jobs.checkpoint(
                id,
                msg["step"].as_u64().unwrap_or(0),
                msg["path"].as_str().unwrap_or(""),
                msg["metrics"].clone(),
            ),
            Some("message") => ft.jobs.event(
                id,
                msg["level"].as_str().unwrap_or("info"),
                msg["message"].as_str().unwrap_or(""),
                json!({}),
                "message",
            ),
            Some("result") => {
                if let Ok(mut r) = result.lock() {
                    *r = Some(msg.clone());
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, "a trainer message was not stored");
        }
    }
}

/// Copies the trainer's stderr to `log`, keeping its last lines.
fn keep_stderr(err: impl std::io::Read, log: &Path, tail: &Mutex<VecDeque<String>>) {
    let mut file = std::fs::File::create(log).ok();
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        if let Ok(mut t) = tail.lock() {
            if t.len() == STDERR_TAIL {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

/// The adapter a `result` message names, checked to exist.
fn adapter_of(result: &Value) -> Result<Trained, FinetuneError> {
    let dir = PathBuf::from(result["adapter_dir"].as_str().unwrap_or(""));
    if !dir.join("adapter_config.json").is_file() {
        return Err(FinetuneError::Invalid {
            param: "trainer",
            message: format!(
                "the trainer reported adapter `{}`, which holds no adapter_config.json",
                dir.display()
            ),
        });
    }
    Ok(Trained::Adapter {
        dir,
        tokens: result["trained_tokens"].as_u64().unwrap_or(0),
        tokens_per_second: result["tokens_per_second"].as_f64(),
    })
}
