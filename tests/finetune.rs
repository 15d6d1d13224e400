//! Fine-tuning jobs end to end with the real reference trainer (transformers + peft on the CPU):
//! the unmodified OpenAI SDK uploads a file and runs a job on a pruned plan of a tiny random
//! Llama; the loss falls, the adapter is served as `ft:…` and its logprobs equal a transformers +
//! peft forward of the same adapter on the same pruned checkpoint (f32); after a restart it is
//! served again. Also: cancel mid-run, server killed mid-run, every bad file's 400 with line
//! numbers, a crashing trainer's stderr in the job's error, fine-tuning off without --state-dir.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

/// A 4-layer random Llama with SmolLM2's tokenizer and chat template.
fn tiny_model(root: &Path) -> PathBuf {
    let smol = smollm2_dir();
    let out = root.join("tiny");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .arg("init-random")
        .arg("--like")
        .arg(smol.join("config.json"))
        .arg(&out)
        .args(["--layers", "4", "--hidden", "64", "--intermediate", "128"])
        .args([
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "16",
            "--seed",
            "3",
        ])
        .arg("--tokenizer")
        .arg(smol.join("tokenizer.json"))
        .status()
        .unwrap();
    assert!(status.success());
    out
}

/// Conversations the tiny model can learn something from: sums written out.
fn training_file(root: &Path, n: usize) -> PathBuf {
    let path = root.join("train.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let (a, b) = (i % 9 + 1, (i * 7) % 9 + 1);
            json!({"messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": format!("What is {a} plus {b}?")},
                {"role": "assistant", "content": format!("{a} plus {b} is {}.", a + b)}]})
            .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn start(model: &Path, state: &Path, trainer_cmd: &str, extra: &[&str]) -> ServerProc {
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        "tiny",
        "--variant",
        "half=drop:1-2",
        "--state-dir",
        state.to_str().unwrap(),
        "--trainer-cmd",
        trainer_cmd,
    ];
    args.extend_from_slice(extra);
    ServerProc::start(&args)
}

fn real_trainer() -> String {
    format!("{} {{trainer}}", trainer_python().display())
}

fn upload(s: &ServerProc, name: &str, bytes: Vec<u8>, purpose: &str) -> (u16, Value) {
    let form = reqwest::blocking::multipart::Form::new()
        .text("purpose", purpose.to_string())
        .part(
            "file",
            reqwest::blocking::multipart::Part::bytes(bytes).file_name(name.to_string()),
        );
    let r = reqwest::blocking::Client::new()
        .post(s.url("/v1/files"))
        .multipart(form)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

fn create_job(s: &ServerProc, file: &str, extension: Value) -> Value {
    let body = json!({"model": "half", "training_file": file, "pruneserve": extension});
    let (status, job) = s.post("/v1/fine_tuning/jobs", &body.to_string());
    assert_eq!(status, 200, "{job}");
    job
}

/// Polls until `done` holds for the job, or fails after `secs`.
fn wait_job(s: &ServerProc, id: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
        if done(&job) {
            return job;
        }
        assert!(
            start.elapsed().as_secs() < secs,
            "job never got there: {job}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn events(s: &ServerProc, id: &str) -> Vec<Value> {
    s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"))["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// A job that trains long enough to be interrupted, started and seen past its first step.
fn long_running_job(s: &ServerProc, file: &str) -> (String, u32) {
    let job = create_job(
        s,
        file,
        json!({"lora_r": 8, "max_steps": 100000, "warmup_steps": 0}),
    );
    let id = job["id"].as_str().unwrap().to_string();
    wait_job(s, &id, 300, |_| {
        events(s, &id).iter().any(|e| e["type"] == "metrics")
    });
    let pid = events(s, &id)
        .iter()
        .find_map(|e| e["data"]["pid"].as_u64())
        .unwrap() as u32;
    (id, pid)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn sdk_job_trains_serves_and_matches_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = training_file(tmp.path(), 24);
    let state = tmp.path().join("state");
    let s = start(&model, &state, &real_trainer(), &[]);
    let seen = run_python(
        "openai_finetune_check.py",
        &json!({"base_url": s.url("/v1"), "training_file": train, "model": "half",
                "suffix": "sums", "timeout_s": 600,
                "extension": {"lora_r": 8, "warmup_steps": 0, "max_steps": 12}}),
    );
    let job = &seen["job"];
    assert_eq!(job["status"], "succeeded", "{seen}");
    assert_eq!(seen["file"]["purpose"], "fine-tune");
    let id = job["id"].as_str().unwrap();
    let name = job["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(name, format!("ft:half:sums:{id}"));
    assert!(seen["models"].as_array().unwrap().contains(&json!(name)));
    assert!(job["trained_tokens"].as_u64().unwrap() > 0);

    // Metrics events (newest first) show the loss falling.
    let losses: Vec<f64> = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .map(|e| e["data"]["train_loss"].as_f64().unwrap())
        .rev()
        .collect();
    println!("losses {losses:?}");
    assert_eq!(losses.len(), 12);
    let validation = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["valid_loss"].is_number())
        .count();
    assert_eq!(validation, 2, "one validation loss per epoch: {seen}");
    let (first, last) = (
        losses[..3].iter().sum::<f64>(),
        losses[9..].iter().sum::<f64>(),
    );
    assert!(last < first * 0.9, "loss did not fall: {losses:?}");
    assert!(
        !seen["checkpoints"].as_array().unwrap().is_empty(),
        "{seen}"
    );

    // The card names the job; the served adapter equals transformers + peft on the checkpoint.
    let cards = s.get("/v1/models");
    let card = cards["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == name)
        .unwrap()
        .clone();
    assert_eq!(card["fine_tuning"]["job_id"], id);
    assert_eq!(card["parent"], "half");
    assert_eq!(card["kept_layers"], json!([0, 3]));
    let job = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
    let tokens = pseudo_tokens(40, 49152, 5);
    let want = run_python_in(
        trainer_python().to_str().unwrap(),
        "peft_logprobs.py",
        &json!({"model_dir": job["pruneserve"]["training_checkpoint"],
                "adapter_dir": job["pruneserve"]["adapter_dir"], "tokens": tokens}),
    );
    let want: Vec<f64> = want["logprobs"].as_array().unwrap()[1..]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let served = s.echo_logprobs(&name, &tokens);
    let d = max_abs_diff(&served, &want);
    println!(
        "served adapter vs transformers + peft: max |Δ| {d:.2e} nats over {} tokens",
        want.len()
    );
    assert!(d <= 1e-4, "{d}");
    // The adapter changed the plan's output.
    let plain = s.echo_logprobs("half", &tokens);
    assert!(max_abs_diff(&plain, &want) > 1e-3);

    // Restarted on the same state directory, the job's model is served again, unchanged.
    drop(s);
    let s = start(&model, &state, &real_trainer(), &[]);
    let again = s.echo_logprobs(&name, &tokens);
    assert_eq!(again, served);
    assert_eq!(
        s.get(&format!("/v1/fine_tuning/jobs/{id}"))["status"],
        "succeeded"
    );
}

#[test]
fn cancel_and_server_death_mid_run_leave_no_trainer_and_no_running_job() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = training_file(tmp.path(), 64);
    let state = tmp.path().join("state");
    let s = start(&model, &state, &real_trainer(), &[]);
    let (_, file) = upload(&s, "t.jsonl", std::fs::read(&train).unwrap(), "fine-tune");
    let file = file["id"].as_str().unwrap().to_string();

    let (id, pid) = long_running_job(&s, &file);
    let (status, job) = s.post(&format!("/v1/fine_tuning/jobs/{id}/cancel"), "");
    assert_eq!((status, job["status"].as_str()), (200, Some("cancelled")));
    let start_wait = Instant::now();
    while alive(pid) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "trainer {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, again) = s.post(&format!("/v1/fine_tuning/jobs/{id}/cancel"), "");
    assert_eq!(status, 400, "{again}");
    assert!(!s.get("/v1/models")["data"].to_string().contains(&id));

    // The server dies mid-run: the trainer dies with it, the job is failed on restart.
    let (id, pid) = long_running_job(&s, &file);
    drop(s);
    let start_wait = Instant::now();
    while alive(pid) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "trainer {pid} outlived the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = start(&model, &state, &real_trainer(), &[]);
    let job = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "server_restarted");
    assert_eq!(
        s.get("/v1/files")["data"][0]["id"],
        file,
        "files survive restarts"
    );
}

#[test]
fn bad_files_and_requests_get_clear_errors_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let crash = "python3 -c \"import sys; print('step 1', file=sys.stderr); sys.exit('boom: out of memory at step 2')\"";
    let s = start(&model, &state, crash, &["--max-file-bytes", "4096"]);
    let good = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
    let cases: [(&str, &str); 6] = [
        ("{not json", "line 2: not JSON"),
        (
            r#"{"messages":[{"role":"user","content":"q"}]}"#,
            "line 2: no assistant message",
        ),
        (
            r#"{"messages":[{"role":"tool","content":"q"},{"role":"assistant","content":"a"}]}"#,
            "line 2: message 0 has role `tool`",
        ),
        (
            r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"a"}]}"#,
            "line 2: message 0 (user) has empty",
        ),
        (r#"{"messages":"x"}"#, "line 2: no `messages` array"),
        (
            r#"{"prompt":"x","completion":"y"}"#,
            "line 2: unsupported key",
        ),
    ];
    for (line, want) in cases {
        let (status, e) = upload(
            &s,
            "bad.jsonl",
            format!("{good}\n{line}\n{good}\n").into_bytes(),
            "fine-tune",
        );
        assert_eq!(status, 400, "{line}: {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(want) && msg.contains("1 invalid lines"),
            "{msg}"
        );
    }
    let many: String = (0..30).map(|_| "x\n").collect();
    let (_, e) = upload(&s, "bad.jsonl", many.into_bytes(), "fine-tune");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("30 invalid lines") && msg.contains("line 10:") && !msg.contains("line 11:"),
        "{msg}"
    );
    let (status, e) = upload(
        &s,
        "big.jsonl",
        format!("{good}\n").repeat(100).into_bytes(),
        "fine-tune",
    );
    assert_eq!(status, 413, "{e}");
    let (status, e) = upload(&s, "a.jsonl", good.as_bytes().to_vec(), "assistants");
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("purpose"))
    );
    assert_eq!(s.get("/v1/files")["data"], json!([]), "nothing stored");
    assert_eq!(
        std::fs::read_dir(state.join("files/incoming"))
            .unwrap()
            .count(),
        0
    );

    let (status, file) = upload(&s, "ok.jsonl", good.as_bytes().to_vec(), "fine-tune");
    assert_eq!(status, 200);
    let id = file["id"].as_str().unwrap();
    let content = reqwest::blocking::get(s.url(&format!("/v1/files/{id}/content")))
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(content, good);
    let bad_jobs = [
        (json!({"model": "nope", "training_file": id}), 404),
        (json!({"model": "half", "training_file": "file-0"}), 404),
        (json!({"model": "half@drop=1", "training_file": id}), 400),
        (
            json!({"model": "half", "training_file": id, "hyperparameters": {"n_epochs": 0}}),
            400,
        ),
        (
            json!({"model": "half", "training_file": id, "pruneserve": {"lora_r": 1000}}),
            400,
        ),
        (
            json!({"model": "half", "training_file": id, "shuffle": true}),
            400,
        ),
    ];
    for (body, want) in bad_jobs {
        let (status, e) = s.post("/v1/fine_tuning/jobs", &body.to_string());
        assert_eq!(status, want, "{body}: {e}");
        assert!(e["error"]["message"].is_string());
    }
    assert_eq!(s.get("/v1/fine_tuning/jobs")["data"], json!([]));

    // A crashing trainer: the job fails with its last stderr lines; the server keeps serving.
    let job = create_job(&s, id, json!({}));
    let job = wait_job(&s, job["id"].as_str().unwrap(), 60, |j| {
        j["status"] == "failed"
    });
    let msg = job["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("boom: out of memory at step 2") && msg.contains("step 1"),
        "{msg}"
    );
    assert_eq!(s.get("/health")["status"], "ok");
    let (status, _) = s.post(
        "/v1/completions",
        &json!({"model": "half", "prompt": "hi", "max_tokens": 2}).to_string(),
    );
    assert_eq!(status, 200);
    let (status, _) = s.post("/v1/fine_tuning/jobs/ftjob-nope/cancel", "");
    assert_eq!(status, 404);
    let r = reqwest::blocking::Client::new()
        .delete(s.url(&format!("/v1/files/{id}")))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(s.get(&format!("/v1/files/{id}"))["error"]["code"], 404);

    // Without --state-dir the endpoints say how to turn them on.
    let off = ServerProc::start(&["--model", model.to_str().unwrap()]);
    let e = off.get("/v1/fine_tuning/jobs");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--state-dir"),
        "{e}"
    );
}

#[test]
fn trl_and_transformers_backends_train_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let train = training_file(tmp.path(), 16);
    let s = start(&model, &tmp.path().join("state"), &real_trainer(), &[]);
    let (_, file) = upload(&s, "t.jsonl", std::fs::read(&train).unwrap(), "fine-tune");
    let file = file["id"].as_str().unwrap().to_string();
    let mut runs = Vec::new();
    for backend in ["trl", "transformers"] {
        let job = create_job(
            &s,
            &file,
            json!({"lora_r": 8, "lora_dropout": 0.0, "max_steps": 4, "warmup_steps": 0,
                   "trainer": backend}),
        );
        let id = job["id"].as_str().unwrap().to_string();
        let job = wait_job(&s, &id, 600, |j| {
            j["status"] != "queued" && j["status"] != "running"
        });
        assert_eq!(job["status"], "succeeded", "{job}");
        let evs = events(&s, &id);
        assert!(
            evs.iter()
                .any(|e| e["message"].as_str().unwrap().contains(match backend {
                    "trl" => "SFTTrainer",
                    _ => "transformers.trainer.Trainer",
                })),
            "{backend}: {evs:?}"
        );
        let losses: Vec<f64> = evs
            .iter()
            .filter(|e| e["type"] == "metrics")
            .map(|e| e["data"]["train_loss"].as_f64().unwrap())
            .collect();
        let name = job["fine_tuned_model"].as_str().unwrap().to_string();
        runs.push((losses, s.echo_logprobs(&name, &pseudo_tokens(32, 49152, 2))));
    }
    println!("trl {:?}\ntransformers {:?}", runs[0].0, runs[1].0);
    assert_eq!(runs[0].0.len(), 4);
    for (a, b) in runs[0].0.iter().zip(&runs[1].0) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    let d = runs[0]
        .1
        .iter()
        .zip(&runs[1].1)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1e-4, "served adapters differ by {d}");
}
