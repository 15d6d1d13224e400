//! Chat over HTTP: streaming with n=2, seed, stop and logprobs equals the non-streamed answer;
//! usage counts; a client that disconnects (mid-stream, or by timing out on a plain request)
//! frees its sequence.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::server::ServerProc;
use serde_json::{json, Value};

fn start() -> ServerProc {
    ServerProc::start_default(&[])
}

#[test]
fn streamed_chat_equals_the_non_streamed_answer() {
    let s = start();
    let messages =
        json!([{"role": "user", "content": "Write a short poem about the moon and the stars."}]);
    let body = json!({"model": "smollm2-135m", "messages": messages, "n": 2, "seed": 1234, "temperature": 0.8,
                      "max_tokens": 40, "stop": ["\n\n", "stars."], "logprobs": true, "top_logprobs": 3});
    let (status, whole) = s.post("/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{whole}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = [String::new(), String::new()];
    let mut lps: [Vec<f64>; 2] = [vec![], vec![]];
    let mut finish = [None, None];
    let mut usage = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            assert!(c["choices"].as_array().unwrap().is_empty());
            usage = Some(u.clone());
            continue;
        }
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if let Some(t) = ch["delta"]["content"].as_str() {
            text[i] += t;
        }
        if let Some(content) = ch["logprobs"]["content"].as_array() {
            for e in content {
                lps[i].push(e["logprob"].as_f64().unwrap());
                assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
            }
        }
        if !ch["finish_reason"].is_null() {
            finish[i] = Some(ch["finish_reason"].as_str().unwrap().to_string());
        }
    }
    for i in 0..2 {
        let want = &whole["choices"][i];
        assert_eq!(
            text[i],
            want["message"]["content"].as_str().unwrap(),
            "choice {i}"
        );
        assert_eq!(finish[i].as_deref(), want["finish_reason"].as_str());
        let want_lps: Vec<f64> = want["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["logprob"].as_f64().unwrap())
            .collect();
        // Same tokens; logprobs may differ in the last float bits when the two runs batched
        // their prefills differently.
        assert_eq!(lps[i].len(), want_lps.len());
        for (a, b) in lps[i].iter().zip(&want_lps) {
            assert!((a - b).abs() < 1e-4, "choice {i}: {a} vs {b}");
        }
        for stop in ["\n\n", "stars."] {
            assert!(
                !text[i].contains(stop),
                "stop string {stop:?} left in {:?}",
                text[i]
            );
        }
    }
    assert_ne!(text[0], text[1], "two seeded choices should differ");
    let usage = usage.expect("usage chunk");
    assert_eq!(usage, whole["usage"]);
    let (_, tok) = s.post(
        "/tokenize",
        &json!({"model": "smollm2-135m", "messages": messages}).to_string(),
    );
    assert_eq!(usage["prompt_tokens"], tok["count"]);
    let completion: u64 = (0..2)
        .map(|i| {
            whole["choices"][i]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len() as u64
        })
        .sum();
    assert_eq!(usage["completion_tokens"].as_u64().unwrap(), completion);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        completion + tok["count"].as_u64().unwrap()
    );
}

#[test]
fn greedy_chat_and_tokenizer_endpoints() {
    let s = start();
    let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_completion_tokens": 16});
    let (status, r) = s.post("/v1/chat/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    assert!(
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{r}"
    );
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");

    let info = s.get("/tokenizer_info");
    assert_eq!(info["eos_token"], "<|im_end|>");
    let (_, t) = s.post(
        "/tokenize",
        r#"{"prompt": "Hello world", "add_special_tokens": false}"#,
    );
    let ids = t["tokens"].as_array().unwrap().clone();
    assert_eq!(t["count"].as_u64().unwrap() as usize, ids.len());
    let (_, d) = s.post("/detokenize", &json!({"tokens": ids}).to_string());
    assert_eq!(d["prompt"], "Hello world");
}

/// Waits up to 20 s for `num_requests_running` to read `want`; fails with `why` otherwise.
fn wait_for_running(s: &ServerProc, want: f64, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("pruneserve:num_requests_running").unwrap_or(-1.0) != want {
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_disconnected_stream_frees_its_sequence() {
    let s = start();
    let body = json!({"model": "rev25", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "stream": true, "temperature": 0});
    let r = reqwest::blocking::Client::new()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    let first = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.starts_with("data: ")))
        .unwrap()
        .unwrap();
    assert!(first.contains("text_completion"));
    // The loop publishes its figures after sending the step's tokens: wait for them.
    wait_for_running(&s, 1.0, "the streamed request is not running");
    drop(lines);
    wait_for_running(&s, 0.0, "the sequence kept running after the client left");
    // 2000 tokens take minutes on CPU: stopping within the deadline means it was cancelled.
    assert_eq!(s.metric("pruneserve:kv_cache_usage_perc").unwrap(), 0.0);
}

#[test]
fn a_client_that_times_out_on_a_non_streaming_request_frees_its_sequence() {
    let s = start();
    let body = json!({"model": "rev25", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": true, "temperature": 0});
    let url = s.url("/v1/completions");
    let request = std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        client.post(url).json(&body).send().unwrap_err()
    });
    wait_for_running(&s, 1.0, "the request never ran");
    let err = request.join().unwrap();
    assert!(err.is_timeout(), "{err}");
    wait_for_running(
        &s,
        0.0,
        "the request kept running after its client closed the connection",
    );
    // 2000 tokens take minutes on CPU: stopping within the deadline means it was cancelled.
    assert_eq!(s.metric("pruneserve:kv_cache_usage_perc").unwrap(), 0.0);
}
