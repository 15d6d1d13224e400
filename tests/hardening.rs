//! One regression test per defect of the adversarial run (issue 18), each against a real server
//! process over SmolLM2 (or tiny checkpoints where the shape matters), each failing on the code
//! before the fix.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{client, rss_bytes, ServerProc};
use common::*;
use serde_json::{json, Value};

fn assert_openai_error(status: u16, body: &Value, want: u16, needle: &str, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| m.contains(needle)),
        "{what}: {e}"
    );
    assert_eq!(e["code"], want, "{what}: {e}");
    assert!(e["type"].is_string(), "{what}: {e}");
}

/// Defect 1: a layer range is bounds-checked before it is expanded, everywhere a list is read.
#[test]
fn layer_ranges_are_checked_before_they_are_expanded() {
    let s = ServerProc::start_default(&[]);
    let idle = rss_bytes(s.pid());
    for range in ["0-1000000000000", "0-18446744073709551615", "0-300000000"] {
        let t = Instant::now();
        let body = json!({"model": format!("smollm2-135m@drop={range}"), "prompt": "hi"});
        let (status, r) = s.post("/tokenize", &body.to_string());
        assert_openai_error(status, &r, 400, "out of range", range);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{range}: {:?}",
            t.elapsed()
        );
        let body = json!({"base": "smollm2-135m", "name": "huge", "drop": range});
        let (status, r) = s.post("/v1/variants", &body.to_string());
        assert_openai_error(status, &r, 400, "out of range", range);
    }
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "smollm2-135m@keep=0-18446744073709551615", "prompt": [1], "max_tokens": 1}"#,
    );
    assert_openai_error(status, &r, 400, "out of range", "keep");
    assert!(rss_bytes(s.pid()) < idle + (100 << 20), "memory grew");
    let (status, _) = s.post("/tokenize", r#"{"model": "smollm2-135m", "prompt": "hi"}"#);
    assert_eq!(status, 200);

    // The command line: `--variant`, a manifest and `prune` refuse in one line, at once.
    let dir = smollm2_dir();
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("m.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[model]]\nname = \"m\"\nsource = \"{}\"\n[[model.variant]]\nname = \"v\"\ndrop = \"0-18446744073709551615\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let runs: [Vec<&str>; 3] = [
        vec![
            "serve",
            "--model",
            dir.to_str().unwrap(),
            "--variant",
            "v=drop:0-1000000000000",
        ],
        vec!["serve", "--manifest", manifest.to_str().unwrap()],
        vec![
            "prune",
            "--model",
            dir.to_str().unwrap(),
            "--drop",
            "0-18446744073709551615",
            out_dir.to_str().unwrap(),
        ],
    ];
    for args in runs {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
            .args(&args)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("out of range"), "{args:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(20), "{args:?}");
    }
}

/// Defect 2: `--max-model-len` is what every endpoint reports and enforces.
#[test]
fn max_model_len_is_reported_and_enforced_everywhere() {
    let s = ServerProc::start_default(&["--max-model-len", "512"]);
    let models = s.get("/v1/models");
    for card in models["data"].as_array().unwrap() {
        assert_eq!(card["max_model_len"], 512, "{card}");
    }
    let (status, t) = s.post("/tokenize", r#"{"model": "smollm2-135m", "prompt": "hi"}"#);
    assert_eq!((status, t["max_model_len"].clone()), (200, json!(512)));
    let info = s.get("/tokenizer_info");
    assert_eq!(info["model_max_length"], 512);

    // A chat without max_tokens fits (its default is the room left in the context).
    let chat = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}],
                      "temperature": 0, "max_tokens": null});
    let (status, r) = s.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{r}");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &streamed);
    assert!(
        events.iter().all(|e| !e.contains("\"error\"")),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");

    // A prompt over the limit is a 400 before any stream starts.
    let long = "word ".repeat(600);
    for stream in [false, true] {
        let body = json!({"model": "smollm2-135m", "stream": stream,
                          "messages": [{"role": "user", "content": long}]});
        let (status, r) = s.post("/v1/chat/completions", &body.to_string());
        assert_openai_error(status, &r, 400, "max_model_len 512", "long chat");
        let body = json!({"model": "rev25", "stream": stream, "prompt": vec![1u32; 500], "max_tokens": 20});
        let (status, r) = s.post("/v1/completions", &body.to_string());
        assert_openai_error(
            status,
            &r,
            400,
            "exceeds max_model_len 512",
            "long completion",
        );
    }
}

/// Polls `/health` every 20 ms until `stop`, returning the slowest answer.
fn watch_health(url: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Duration {
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut worst = Duration::ZERO;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let t = Instant::now();
        let status = c.get(&url).send().unwrap().status().as_u16();
        assert_eq!(status, 200);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    worst
}

/// Defect 3: huge prompts are refused by their byte length before tokenizing, tokenizing runs on
/// a bounded pool off the async workers, `/health` keeps answering and memory comes back.
#[test]
fn huge_prompts_neither_stall_the_server_nor_keep_memory() {
    let s = ServerProc::start_default(&[]);
    let (status, _) = s.post(
        "/tokenize",
        r#"{"model": "smollm2-135m", "prompt": "warm up"}"#,
    );
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_bytes(s.pid());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (url, stop) = (s.url("/health"), stop.clone());
        std::thread::spawn(move || watch_health(url, stop))
    };
    // 10 MB bodies are refused at once; 1.2 MB ones (under the byte bound: SmolLM2's longest
    // token is 162 bytes, 8192 × 162 ≈ 1.33 MB) are tokenized on the pool and refused after.
    let big = "lorem ipsum dolor sit amet ".repeat(10 << 20 >> 5);
    let under = "lorem ipsum dolor sit amet ".repeat(1_200_000 / 27);
    let mut refused_fast = Duration::ZERO;
    for (text, needle) in [(&big, "so at least"), (&under, "exceeds max_model_len")] {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let url = s.url(if i % 2 == 0 {
                    "/v1/completions"
                } else {
                    "/tokenize"
                });
                let body = json!({"model": "smollm2-135m", "prompt": text}).to_string();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let r = client()
                        .post(url.clone())
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .unwrap();
                    (
                        url,
                        r.status().as_u16(),
                        r.json::<Value>().unwrap(),
                        t.elapsed(),
                    )
                })
            })
            .collect();
        for h in handles {
            let (url, status, body, took) = h.join().unwrap();
            if url.ends_with("/tokenize") && needle == "exceeds max_model_len" {
                // /tokenize counts what fits the byte bound, whatever the context.
                assert_eq!(status, 200, "{url}: {body}");
                assert!(body["count"].as_u64().unwrap() > 8192);
            } else {
                assert_openai_error(status, &body, 400, needle, &url);
            }
            if needle == "so at least" {
                refused_fast = refused_fast.max(took);
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let worst = watcher.join().unwrap();
    println!("slowest /health {worst:?}, slowest 10 MB refusal {refused_fast:?}");
    assert!(worst < Duration::from_millis(700), "/health took {worst:?}");
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_bytes(s.pid());
    println!("RSS idle {} MB, after {} MB", idle >> 20, after >> 20);
    assert!(
        after as f64 <= idle as f64 * 1.2,
        "RSS {} MB after, idle {} MB",
        after >> 20,
        idle >> 20
    );
}

/// Defect 4: a request that can never be admitted is a 400 naming the limit, not a 503.
#[test]
fn requests_that_can_never_fit_get_a_400() {
    let s = ServerProc::start_default(&["--max-in-flight", "32"]);
    for body in [
        json!({"model": "smollm2-135m", "prompt": [1, 2], "max_tokens": 1, "n": 33}),
        json!({"model": "smollm2-135m", "prompt": [[1, 2], [3, 4], [5, 6], [7, 8]], "max_tokens": 1, "n": 9}),
        json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 40}),
    ] {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let r = client().post(s.url(path)).json(&body).send().unwrap();
        assert!(r.headers().get("retry-after").is_none());
        let status = r.status().as_u16();
        let v: Value = r.json().unwrap();
        assert_openai_error(status, &v, 400, "--max-in-flight", &body.to_string());
        assert!(v["error"]["message"].as_str().unwrap().contains("32"));
    }
    let ok = json!({"model": "smollm2-135m", "prompt": [1, 2], "max_tokens": 1, "n": 32});
    assert_eq!(s.post("/v1/completions", &ok.to_string()).0, 200);
}

/// The `model_name` label values of an exposition.
fn model_labels(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.split("model_name=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

/// Defect 5: every spelling of an ad-hoc plan is one series, and ad-hoc series are bounded.
#[test]
fn metric_series_are_canonical_and_bounded() {
    let s = ServerProc::start_default(&[]);
    let score = |model: &str| {
        let body = json!({"model": model, "prompt": [1, 2, 3], "echo": true, "logprobs": 0, "max_tokens": 1});
        let (status, r) = s.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{model}: {r}");
        r["model"].as_str().unwrap().to_string()
    };
    for spelling in ["3", "03", " 3", "3 ", "003", "3-3"] {
        assert_eq!(
            score(&format!("smollm2-135m@drop={spelling}")),
            "smollm2-135m@drop=3"
        );
    }
    assert_eq!(
        score("smollm2-135m@drop=29,3,4,5"),
        "smollm2-135m@drop=3-5,29"
    );
    let before = reqwest::blocking::get(s.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    assert!(before.contains("model_name=\"smollm2-135m@drop=3\""));
    assert!(!before.contains("@drop=03") && !before.contains("@drop= 3"));
    // 200 distinct plans: at most 64 ad-hoc series, the rest under `<base>@other`.
    for i in 0..200 {
        let (a, b) = (1 + i % 29, 1 + (i / 29) % 29);
        if a != b {
            score(&format!("smollm2-135m@drop={a},{b}"));
        }
    }
    let after = reqwest::blocking::get(s.url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let labels = model_labels(&after);
    let ad_hoc = labels.iter().filter(|l| l.contains("@drop=")).count();
    assert!(ad_hoc <= 64, "{ad_hoc} ad-hoc series");
    assert!(labels.contains("smollm2-135m@other"), "{labels:?}");
    println!(
        "/metrics: {} bytes before the 200 plans, {} after; {} labels",
        before.len(),
        after.len(),
        labels.len()
    );
    assert!(after.len() < 600_000, "{} bytes", after.len());
}

/// Defect 6: a plan suffix on a variant composes with the variant's plan.
#[test]
fn plan_suffixes_compose_with_variants() {
    let s = ServerProc::start_default(&[]);
    let prompt = pseudo_tokens(20, 49152, 4);
    let composed = s.echo_logprobs("rev25@drop=3", &prompt);
    let spelled_out = s.echo_logprobs("smollm2-135m@drop=3,22-29", &prompt);
    let base_only = s.echo_logprobs("smollm2-135m@drop=3", &prompt);
    assert_eq!(composed, spelled_out);
    assert_ne!(composed, base_only);
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "rev25@drop=25", "prompt": [1, 2], "max_tokens": 1}"#,
    );
    assert_openai_error(
        status,
        &r,
        400,
        "not in the plan of `rev25`",
        "drop outside",
    );
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "rev25@keep=0-5", "prompt": [1, 2], "max_tokens": 1}"#,
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "rev25@drop=6-21");
}

/// Writes a manifest file whose bases' sources point at `dirs`.
fn manifest_with_sources(path: &std::path::Path, shipped: &str, source: &std::path::Path) {
    let text = std::fs::read_to_string(shipped).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("source = ") {
            out += &format!("source = \"{}\"\n", source.display());
        } else {
            out += line;
            out.push('\n');
        }
    }
    std::fs::File::create(path)
        .unwrap()
        .write_all(out.as_bytes())
        .unwrap();
}

/// Defect 7: variant names are validated, and variants of the same name on two bases (the paper
/// manifests' `bi` and `reverse`) are served together, qualified by base.
#[test]
fn variant_names_are_validated_and_qualified_by_base() {
    let s = ServerProc::start_default(&[]);
    let long = "x".repeat(20000);
    for name in [".", "..", "a/b", long.as_str(), "", "white space", "a@b"] {
        let body = json!({"base": "smollm2-135m", "name": name, "drop": "3"});
        let (status, r) = s.post("/v1/variants", &body.to_string());
        assert_openai_error(
            status,
            &r,
            400,
            "invalid model name",
            &name[..name.len().min(20)],
        );
    }
    let body = json!({"base": "smollm2-135m", "name": "ft:smollm2:x:ftjob-1.v2", "drop": "3"});
    assert_eq!(s.post("/v1/variants", &body.to_string()).0, 201);
    let r = client()
        .delete(s.url("/v1/variants/ft:smollm2:x:ftjob-1.v2"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The four shipped paper manifests in one process (`bi` twice, `reverse` four times), each
    // on tiny weights of its family and layer count.
    let tmp = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut args = Vec::new();
    let shipped = [
        ("llama-3.1-8b-instruct", 32, "LlamaForCausalLM"),
        ("mistral-7b-instruct-v0.3", 32, "MistralForCausalLM"),
        ("qwen2.5-7b-instruct", 28, "Qwen2ForCausalLM"),
        ("gemma-2-2b-it", 26, "Gemma2ForCausalLM"),
    ];
    for (file, layers, arch) in shipped {
        let mut cfg = tiny_config(arch);
        cfg["num_hidden_layers"] = json!(layers);
        let dir = write_tiny(tmp.path(), file, cfg, 1);
        let manifest = tmp.path().join(format!("{file}.toml"));
        manifest_with_sources(&manifest, &format!("{root}/models/{file}.toml"), &dir);
        args.push("--manifest".to_string());
        args.push(manifest.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let all = ServerProc::start(&args);
    let cards = all.get("/v1/models");
    let ids: Vec<String> = cards["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let expected = [
        "llama-3.1-8b-instruct/bi",
        "llama-3.1-8b-instruct/reverse",
        "mistral-7b-instruct-v0.3/bi",
        "mistral-7b-instruct-v0.3/reverse",
        "iterative",
        "qwen2.5-7b-instruct/reverse",
        "gemma-2-2b-it/reverse",
    ];
    for id in expected {
        assert!(ids.contains(&id.to_string()), "{id} in {ids:?}");
        let body = json!({"model": id, "prompt": [1, 2, 3], "max_tokens": 2});
        let (status, r) = all.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{id}: {r}");
        assert_eq!(r["model"], id);
    }
    let (status, r) = all.post(
        "/v1/completions",
        r#"{"model": "qwen2.5-7b-instruct/iterative", "prompt": [1, 2, 3], "max_tokens": 2}"#,
    );
    assert_eq!((status, r["model"].clone()), (200, json!("iterative")));
    let (status, r) = all.post(
        "/v1/completions",
        r#"{"model": "bi", "prompt": [1, 2, 3], "max_tokens": 2}"#,
    );
    assert_openai_error(status, &r, 400, "mistral-7b-instruct-v0.3/bi", "ambiguous");
}

/// Defect 8: 405s are OpenAI JSON, the Bearer scheme is case-insensitive, chat roles are
/// checked, and `top_logprobs` needs `logprobs`.
#[test]
fn smaller_api_inconsistencies_are_fixed() {
    let s = ServerProc::start_default(&["--api-key", "sekret"]);
    for (method, path) in [
        ("GET", "/v1/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/tokenize"),
        ("POST", "/health"),
    ] {
        let r = client()
            .request(method.parse().unwrap(), s.url(path))
            .header("authorization", "Bearer sekret")
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap_or(Value::Null);
        assert_openai_error(status, &body, 405, "method", &format!("{method} {path}"));
    }
    let chat = |auth: &str, body: Value| {
        let r = client()
            .post(s.url("/v1/chat/completions"))
            .header("authorization", auth)
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let ok = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    for auth in ["bearer sekret", "BEARER sekret", "Bearer sekret"] {
        assert_eq!(chat(auth, ok.clone()).0, 200, "{auth}");
    }
    assert_eq!(chat("Basic sekret", ok.clone()).0, 401);
    for role in ["", "bot", "tool", "System"] {
        let body = json!({"model": "smollm2-135m", "messages": [{"role": role, "content": "hi"}], "max_tokens": 2});
        let (status, r) = chat("Bearer sekret", body);
        assert_openai_error(status, &r, 400, "role", role);
    }
    let mut top = ok.clone();
    top["top_logprobs"] = json!(3);
    let (status, r) = chat("Bearer sekret", top.clone());
    assert_openai_error(status, &r, 400, "logprobs: true", "top_logprobs alone");
    top["logprobs"] = json!(true);
    let (status, r) = chat("Bearer sekret", top);
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}
