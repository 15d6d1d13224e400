//! Bad input over HTTP: each gets its status and OpenAI error JSON, and the server keeps serving.

mod common;

use std::process::Command;

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

fn assert_error(got: (u16, Value), status: u16, needle: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let e = &got.1["error"];
    assert!(
        e["message"].as_str().unwrap().contains(needle),
        "{what}: {e}"
    );
    assert!(
        e["type"].is_string() && e.get("param").is_some() && e["code"] == status,
        "{what}: {e}"
    );
}

#[test]
fn each_bad_input_gets_its_status_and_the_server_still_serves() {
    let dir = smollm2_dir();
    let s = ServerProc::start(&[
        "--model",
        dir.to_str().unwrap(),
        "--served-model-name",
        "m",
        "--api-key",
        "sekret",
        "--max-body-bytes",
        "20000",
        "--max-in-flight",
        "2",
    ]);
    let client = reqwest::blocking::Client::new();
    let send = |path: &str, body: &str, key: Option<&str>| {
        let mut r = client
            .post(s.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (status, r.json::<Value>().unwrap_or(Value::Null), retry)
    };
    let ok = Some("sekret");
    let call = |path: &str, body: &str| {
        let (a, b, _) = send(path, body, ok);
        (a, b)
    };
    let (st, body, _) = send("/v1/completions", r#"{"model": "m", "prompt": [1]}"#, None);
    assert_error((st, body), 401, "API key", "no key");
    let (st, body, _) = send("/v1/models", "", Some("wrong"));
    assert_error((st, body), 401, "API key", "wrong key");
    assert_eq!(
        client
            .get(s.url("/health"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200,
        "health needs no key"
    );

    for (body, status, needle) in [
        ("{not json", 400, "invalid request body"),
        (
            r#"{"model": "m", "prompt": [1, 2], "temperature": "hot"}"#,
            400,
            "invalid request body",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "max_tokens": -1}"#,
            400,
            "invalid request body",
        ),
        (r#"{"model": "m"}"#, 400, "prompt"),
        (
            r#"{"model": "m", "prompt": [1, 2], "n": 0}"#,
            400,
            "n must be",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "temperature": NaN}"#,
            400,
            "invalid request body",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "temperature": -0.5}"#,
            400,
            "temperature",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "top_p": 0}"#,
            400,
            "top_p",
        ),
        (
            r#"{"model": "m", "prompt": [1, 49152]}"#,
            400,
            "out of range",
        ),
        (r#"{"model": "m", "prompt": [[1, 2], []]}"#, 400, "empty"),
        (
            r#"{"model": "m", "prompt": [1, 2], "max_tokens": 8191}"#,
            400,
            "context too long",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "logprobs": 50}"#,
            400,
            "logprobs",
        ),
        (
            r#"{"model": "m", "prompt": [1, 2], "stop": [""]}"#,
            400,
            "stop",
        ),
        (
            r#"{"model": "gpt-4", "prompt": [1, 2]}"#,
            404,
            "does not exist",
        ),
    ] {
        assert_error(call("/v1/completions", body), status, needle, body);
    }
    for (body, status, needle) in [
        (r#"{"model": "m", "messages": []}"#, 400, "messages"),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
            400,
            "invalid request body",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            400,
            "not supported",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#,
            400,
            "max_tokens",
        ),
        (
            r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}"#,
            400,
            "context too long",
        ),
    ] {
        assert_error(call("/v1/chat/completions", body), status, needle, body);
    }
    assert_error(
        call("/detokenize", r#"{"tokens": [99999999]}"#),
        400,
        "out of range",
        "detokenize",
    );
    let huge = json!({"model": "m", "prompt": "x".repeat(30000)}).to_string();
    assert_error(
        call("/v1/completions", &huge),
        413,
        "",
        "body over the limit",
    );
    assert_error(call("/no/such/route", "{}"), 404, "route", "unknown route");

    // Two long requests fill --max-in-flight 2; a third is turned away with Retry-After.
    let long = json!({"model": "m", "prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": true, "stream": true});
    let hold: Vec<_> = (0..2)
        .map(|_| {
            client
                .post(s.url("/v1/completions"))
                .bearer_auth("sekret")
                .json(&long)
                .send()
                .unwrap()
        })
        .collect();
    let (st, body, retry) = send(
        "/v1/completions",
        r#"{"model": "m", "prompt": [1, 2], "max_tokens": 1}"#,
        ok,
    );
    assert_error((st, body), 503, "capacity", "queue full");
    assert_eq!(retry.as_deref(), Some("1"));
    drop(hold);

    // Still serving.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (st, body) = call(
            "/v1/completions",
            r#"{"model": "m", "prompt": [1, 2], "max_tokens": 2, "temperature": 0}"#,
        );
        if st == 200 {
            assert_eq!(body["usage"]["completion_tokens"], 2);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not recover: {st} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn bad_serve_arguments_fail_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[[model]]\nname = \"x\"\nsource = \"@default\"\nlayers = 30\n[[model.variant]]\nname = \"v\"\ndrop = \"28-31\"\n").unwrap();
    let typo = tmp.path().join("typo.toml");
    std::fs::write(&typo, "[[model]]\nname = \"x\"\nsorce = \"@default\"\n").unwrap();
    let adapter = tmp.path().join("adapter.toml");
    std::fs::write(&adapter, "[[model]]\nname = \"x\"\nsource = \"@default\"\n[[model.variant]]\nname = \"v\"\nreverse = 0.25\nadapter = \"lora\"\n").unwrap();
    for (args, needle) in [
        (vec!["--manifest", bad.to_str().unwrap()], "out of range"),
        (vec!["--manifest", typo.to_str().unwrap()], "sorce"),
        (
            vec!["--manifest", adapter.to_str().unwrap()],
            "adapter `v`: lora: not a directory",
        ),
        (vec!["--variant", "v=drop:50"], "out of range"),
        (vec!["--variant", "nonsense"], "must look like"),
        (
            vec!["--model", "/nonexistent/model"],
            "not a model directory",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
            .arg("serve")
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A LoRA rank the CUDA kernels could not hold is refused before anything loads.
    let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args(["serve", "--max-lora-rank", "1024"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("1..=512"), "{err}");
    // The cause is said once, not repeated by the error chain.
    let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args(["serve", "--manifest", adapter.to_str().unwrap()])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("not a directory").count(), 1, "{err}");
}
