//! The `pruneval` binary against the default server: a run killed midway resumes issuing only the
//! missing requests; `acc`/`acc_norm` on arc_easy --limit 200 equal lm-eval's formula on the same
//! loglikelihoods; generative tasks (gsm8k, humaneval) and the arithmetic probe write per-item
//! records; `compare` writes markdown, JSON and the PNG; bad input gives one line and no result.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn eval_cmd(s: &ServerProc, out: &Path, model: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(pruneval_bin());
    c.args(["eval", "--base-url", &s.url(""), "--model", model])
        .arg("--data-dir")
        .arg(data_dir())
        .arg("--out-dir")
        .arg(out.join("results"))
        .arg("--cache-dir")
        .arg(out.join("cache"))
        .args(extra);
    c
}

/// Runs to the end; returns stdout and the "requests sent: N" figure.
fn run_ok(mut c: Command) -> (String, usize) {
    let o = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests sent: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    (stdout, sent)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter(|e| e.is_ok()).count())
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn killed_run_resumes_and_acc_matches_lm_eval_formula() {
    let s = ServerProc::start_default(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--tasks",
        "arc_easy",
        "--limit",
        "200",
        "--concurrency",
        "1",
    ];
    let mut first = eval_cmd(&s, tmp.path(), "smollm2-135m", &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once part of the work is cached.
    let cache = tmp.path().join("cache");
    for _ in 0..600 {
        if count_files(&cache) >= 60 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let result = tmp.path().join("results/smollm2-135m/arc_easy.json");
    assert!(!result.exists(), "a killed run writes no result");
    let cached = count_files(&cache);
    assert!(cached >= 60);

    let (stdout, sent) = run_ok(eval_cmd(&s, tmp.path(), "smollm2-135m", &args));
    let total = count_files(&cache);
    println!(
        "killed after {cached} cached requests; the re-run sent {sent}; {total} in all\n{stdout}"
    );
    assert!(sent > 0 && total > cached);
    assert_eq!(
        sent,
        total - cached,
        "the re-run sends only the missing requests"
    );
    let (_, again) = run_ok(eval_cmd(&s, tmp.path(), "smollm2-135m", &args));
    assert_eq!(again, 0, "a finished task costs no requests");

    // lm-eval's own formula on the same loglikelihoods.
    let ours = read_json(&result);
    let want = run_python(
        "lm_eval_mc.py",
        &json!({"data": data_dir().join("arc/arc_easy.jsonl"), "result": result, "limit": 200}),
    );
    println!(
        "arc_easy n=200: pruneval {} / {}, lm-eval formula {want}",
        ours["acc"], ours["acc_norm"]
    );
    for m in ["acc", "acc_norm"] {
        let d = (ours[m].as_f64().unwrap() - want[m].as_f64().unwrap()).abs();
        assert!(d <= 0.005, "{m} differs by {d}");
    }
}

#[test]
fn generative_tasks_arithmetic_and_compare_on_base_and_variant() {
    let s = ServerProc::start_default(&[]);
    let tmp = tempfile::tempdir().unwrap();
    for model in ["smollm2-135m", "rev25"] {
        run_ok(eval_cmd(
            &s,
            tmp.path(),
            model,
            &["--tasks", "arithmetic", "--limit", "30"],
        ));
        run_ok(eval_cmd(
            &s,
            tmp.path(),
            model,
            &[
                "--tasks",
                "gsm8k,humaneval",
                "--limit",
                "2",
                "--max-tokens",
                "48",
            ],
        ));
    }
    let res = tmp.path().join("results");
    let gsm = read_json(&res.join("smollm2-135m/gsm8k.json"));
    assert_eq!(gsm["metrics"], json!(["strict_match", "flexible_extract"]));
    let item = &gsm["items"][0];
    assert!(item["record"]["prompt"].as_str().unwrap().ends_with("\nA:"));
    assert_eq!(item["record"]["responses"].as_array().unwrap().len(), 1);
    assert_eq!(item["record"]["target"], "18");
    let he = read_json(&res.join("smollm2-135m/humaneval.json"));
    assert_eq!(he["metrics"][0], "pass@1");
    let outcome = he["items"][0]["record"]["extracted"][0].as_str().unwrap();
    assert!(
        outcome.starts_with("Passed")
            || outcome.starts_with("Failed")
            || outcome.starts_with("TimedOut")
    );
    let ar = read_json(&res.join("smollm2-135m/arithmetic.json"));
    assert_eq!(
        ar["items"][0]["loglikelihoods"].as_array().unwrap().len(),
        10
    );

    let o = Command::new(pruneval_bin())
        .args(["compare", "--base", "smollm2-135m", "--variants", "rev25"])
        .args(["--tasks", "arithmetic,gsm8k,humaneval", "--out-dir"])
        .arg(&res)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{stdout}");
    assert!(stdout.contains("| arithmetic | rev25 | 30 |"));
    assert!(
        stdout.contains("mean classification retention of rev25")
            || stdout.contains("| arithmetic | rev25 | 30 | 0.000")
    );
    let png = std::fs::read(res.join("compare-smollm2-135m.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(res.join("compare-smollm2-135m.md").exists());
}

#[test]
fn bad_input_gives_one_line_and_no_result() {
    let s = ServerProc::start_default(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let one_line_error = |c: &mut Command, want: &str| {
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{err}");
    };
    one_line_error(
        &mut eval_cmd(
            &s,
            tmp.path(),
            "smollm2-135m",
            &["--tasks", "arc_easy,hellaswag_typo"],
        ),
        "unknown task `hellaswag_typo`",
    );
    one_line_error(
        &mut eval_cmd(
            &s,
            tmp.path(),
            "no-such-model",
            &["--tasks", "piqa", "--limit", "2"],
        ),
        "404",
    );
    let mut unreachable = Command::new(pruneval_bin());
    unreachable
        .args([
            "eval",
            "--base-url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--tasks",
            "piqa",
        ])
        .arg("--data-dir")
        .arg(data_dir())
        .arg("--out-dir")
        .arg(tmp.path().join("results"))
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"));
    one_line_error(&mut unreachable, "cannot reach");
    // Errors clap finds in the command line are one line too.
    let mut unknown = Command::new(pruneval_bin());
    unknown.args(["bench", "--no-such-flag"]);
    one_line_error(&mut unknown, "unexpected argument '--no-such-flag'");
    assert!(
        !tmp.path().join("results").exists(),
        "no result file was written"
    );
}
