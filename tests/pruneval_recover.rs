//! `pruneval recover` runs the whole loop against the default server (SmolLM2 and `rev25`) with
//! the real trainer: SGR from the base on GSM8K questions, a fine-tuning job on `rev25` through
//! the API, evaluation of base / pruned / recovered, and the comparison report; a rerun reuses
//! the job and sends no requests. `pruneval finetune` lists and shows the job, and refuses to
//! cancel a finished one in one line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// The first `n` GSM8K train questions as Alpaca `instruction` rows.
fn prompts(path: &Path, n: usize) {
    let text = std::fs::read_to_string(data_dir().join("gsm8k/train.jsonl")).unwrap();
    let rows: Vec<String> = text
        .lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"instruction": v["question"]}).to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n") + "\n").unwrap();
}

fn pruneval(args: &[&str]) -> std::process::Output {
    Command::new(pruneval_bin()).args(args).output().unwrap()
}

#[test]
fn recover_runs_sgr_finetune_eval_compare_and_resumes_free() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let trainer = format!("{} {{trainer}}", trainer_python().display());
    let s = ServerProc::start_default(&[
        "--state-dir",
        state.to_str().unwrap(),
        "--trainer-cmd",
        &trainer,
    ]);
    let rows = tmp.path().join("prompts.jsonl");
    prompts(&rows, 16);
    let out = tmp.path().join("out");
    let manifest = tmp.path().join("recover.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"base_url = "{url}"
base = "smollm2-135m"
pruned = "rev25"
tasks = ["arithmetic", "arc_easy"]
out_dir = "{out}"

[sgr]
data = "{rows}"
max_tokens = 48
keep_length = true
concurrency = 16

[finetune]
suffix = "sgr"
lora_r = 8
max_steps = 4
warmup_steps = 0
batch_size = 4
max_seq_len = 512

[eval]
limit = 20
data_dir = "{data}"
concurrency = 4
"#,
            url = s.url(""),
            out = out.display(),
            rows = rows.display(),
            data = data_dir().display()
        ),
    )
    .unwrap();
    let run = pruneval(&["recover", manifest.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{stdout}");
    assert_eq!(
        std::fs::read_to_string(out.join("sgr.jsonl"))
            .unwrap()
            .lines()
            .count(),
        16
    );
    let job_id =
        serde_json::from_str::<Value>(&std::fs::read_to_string(out.join("recover.json")).unwrap())
            .unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string();
    let job = s.get(&format!("/v1/fine_tuning/jobs/{job_id}"));
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["model"], "rev25");
    let recovered = job["fine_tuned_model"].as_str().unwrap().to_string();
    for model in ["smollm2-135m", "rev25", recovered.as_str()] {
        for task in ["arithmetic", "arc_easy"] {
            let f = out.join(format!("results/{model}/{task}.json"));
            assert!(f.exists(), "{}", f.display());
        }
    }
    let report = std::fs::read_to_string(out.join("results/compare-smollm2-135m.md")).unwrap();
    assert!(
        report.contains("rev25") && report.contains(&recovered),
        "{report}"
    );
    // The recovered model answers differently from the pruned one (the adapter is applied).
    let tokens = pseudo_tokens(24, 49152, 9);
    let (a, b) = (
        s.echo_logprobs("rev25", &tokens),
        s.echo_logprobs(&recovered, &tokens),
    );
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));

    // A rerun follows the same job and costs no requests.
    let again = pruneval(&["recover", manifest.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(again.status.success(), "{text}");
    assert!(text.contains(&format!("following job {job_id}")), "{text}");
    let sent: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("requests sent: "))
        .collect();
    assert_eq!(sent, vec!["requests sent: 0"; 3], "{text}");
    assert_eq!(
        s.get("/v1/fine_tuning/jobs")["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // pruneval finetune: list, events, and a one-line refusal.
    let url = s.url("");
    let list = pruneval(&["finetune", "list", "--base-url", &url]);
    assert!(String::from_utf8_lossy(&list.stdout).contains(&job_id));
    let events = pruneval(&["finetune", "events", "--base-url", &url, &job_id]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("training loss") && events.contains("successfully completed"),
        "{events}"
    );
    let cancel = pruneval(&["finetune", "cancel", "--base-url", &url, &job_id]);
    let err = String::from_utf8_lossy(&cancel.stderr).to_string();
    assert!(!cancel.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot be cancelled"), "{err}");
}
