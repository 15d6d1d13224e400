//! `pruneval sgr` against real servers over a tiny random model with a chat template: a seeded
//! run interrupted twice (one of two servers killed, then the client killed with SIGKILL) and run
//! again ends byte-identical to an uninterrupted one, every (row, sample) key once; each input
//! shape and every skip and drop reason is counted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// A tiny Llama with the byte tokenizer and a chat template.
fn chat_model(root: &Path) -> PathBuf {
    let dir = write_tiny(root, "chat", tiny_config("LlamaForCausalLM"), 8);
    let cfg = json!({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

fn server(dir: &Path) -> ServerProc {
    ServerProc::start(&[
        "--model",
        dir.to_str().unwrap(),
        "--served-model-name",
        "tiny",
        "--max-in-flight",
        "64",
    ])
}

/// Writes rows of `shape` (user prompts `q{i}`), with `bad` rows of each skip reason mixed in.
fn write_rows(path: &Path, shape: &str, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let user = format!("question {i}: tell me about the number {}", i * 7);
        let row = match (shape, i % 17) {
            (_, 5) => json!({"unrelated": i}),
            ("messages", 9) => json!({"messages": [{"role": "assistant", "content": "no user"}]}),
            ("messages", 13) => json!({"messages": [{"role": "user", "content": "   "}]}),
            ("messages", 15) => json!({"messages": [{"role": "user", "content": "x".repeat(400)}]}),
            ("messages", _) => json!({"messages": [{"role": "system", "content": "s"},
                {"role": "user", "content": user}, {"role": "assistant", "content": "old"},
                {"role": "user", "content": "second turn"}]}),
            ("sharegpt", 9) => json!({"conversations": [{"from": "gpt", "value": "no user"}]}),
            ("sharegpt", _) => {
                json!({"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": "a"}]})
            }
            ("alpaca", 9) => json!({"instruction": "", "input": "", "output": "x"}),
            (_, _) => {
                json!({"instruction": user, "input": if i % 2 == 0 { "context" } else { "" }, "output": "x"})
            }
        };
        text += &row.to_string();
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

fn sgr(urls: &[&str], data: &Path, out: &Path, concurrency: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(pruneval_bin());
    c.arg("sgr");
    for u in urls {
        c.args(["--base-url", u]);
    }
    c.args(["--model", "tiny", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--max-tokens", "24", "--max-prompt-tokens", "200", "--stop-token-ids",
            "100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116,117,118,119,120,121,122,123,124,125,126,127,128,129",
            "--concurrency", concurrency,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn finish(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn wait_for_lines(path: &Path, n: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(path) < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {n} records"
        );
        assert!(
            Instant::now() < deadline,
            "{} never reached {n} lines",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_interrupted_seeded_run_ends_byte_identical_with_every_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let (a, b) = (server(&model), server(&model));
    let (ua, ub) = (a.url(""), b.url(""));
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data, "messages", 900);

    let reference = tmp.path().join("ref.jsonl");
    let said = finish(sgr(&[&ua, &ub], &data, &reference, "1", &[]));
    assert!(said.contains("records"), "{said}");
    let prov_ref = tmp.path().join("ref.jsonl.provenance.jsonl");
    let total = lines(&prov_ref);
    // About 700 of the 900 rows are usable; most answers stop within 24 tokens.
    assert!(
        total >= 100,
        "the reference run kept only {total} records: {said}"
    );

    // The same run, interrupted: server B dies, then the client is killed with SIGKILL right
    // away (records are written in key order, so once B's requests are retried on A the held
    // back ones can all land at once: waiting for more lines could see the run finish).
    let out = tmp.path().join("run.jsonl");
    let prov = tmp.path().join("run.jsonl.provenance.jsonl");
    let mut client = sgr(&[&ua, &ub], &data, &out, "1", &[]).spawn().unwrap();
    wait_for_lines(&prov, total / 8, &mut client);
    drop(b);
    client.kill().unwrap();
    client.wait().unwrap();
    let cut = lines(&prov);
    assert!(
        cut < total,
        "the client finished before it was killed ({cut} of {total} records)"
    );
    finish(sgr(&[&ua, &ub], &data, &out, "1", &[]));

    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&reference).unwrap()
    );
    assert_eq!(
        std::fs::read(&prov).unwrap(),
        std::fs::read(&prov_ref).unwrap()
    );
    let keys: Vec<(u64, u64)> = std::fs::read_to_string(&prov)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["row"].as_u64().unwrap(), v["sample"].as_u64().unwrap())
        })
        .collect();
    let mut unique = keys.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), keys.len(), "a key was written twice");
    // Every kept line is a chat-format training record.
    for l in std::fs::read_to_string(&out).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let roles: Vec<&str> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
    }
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("run.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    println!("{summary}");
    assert!(tmp.path().join("run.jsonl.lengths.png").exists());
}

#[test]
fn every_shape_and_every_skip_or_drop_reason_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let s = server(&model);
    let url = s.url("");
    for shape in ["messages", "sharegpt", "alpaca"] {
        let data = tmp.path().join(format!("{shape}.jsonl"));
        write_rows(&data, shape, 51);
        let out = tmp.path().join(format!("{shape}.out.jsonl"));
        finish(sgr(&[&url], &data, &out, "2", &["--n", "2"]));
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(format!("{shape}.out.jsonl.summary.json")))
                .unwrap(),
        )
        .unwrap();
        let skipped = &summary["skipped_rows"];
        // Rows 5, 22, 39 have no field of the shape; 9, 26, 43 no (usable) user turn.
        assert_eq!(skipped["malformed_row"], 3, "{shape}: {summary}");
        match shape {
            "messages" => {
                assert_eq!(skipped["no_user_turn"], 3, "{summary}");
                assert_eq!(skipped["empty_user_turn"], 3, "{summary}");
                assert_eq!(skipped["too_long"], 3, "{summary}");
            }
            "sharegpt" => assert_eq!(skipped["no_user_turn"], 3, "{summary}"),
            _ => assert_eq!(skipped["empty_user_turn"], 3, "{summary}"),
        }
        let records = summary["records"].as_object().unwrap();
        let total: u64 = records.values().map(|v| v.as_u64().unwrap()).sum();
        let prompts = 51
            - skipped
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>();
        assert_eq!(total, 2 * prompts, "{shape}: two samples per prompt");
        assert_eq!(lines(&out) as u64, records["kept"].as_u64().unwrap());
        for reason in ["kept", "dropped_length"] {
            assert!(
                records.contains_key(reason),
                "{shape}: no {reason} in {summary}"
            );
        }
        // The first user turn only: no record asks the second turn.
        assert!(!std::fs::read_to_string(&out)
            .unwrap()
            .contains("second turn"));
    }
}
