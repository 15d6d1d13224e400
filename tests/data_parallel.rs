//! `serve --data-parallel N` on the CPU (two engine loops over one copy of SmolLM2): a request
//! goes to the engine with the fewest sequences in flight, an adapter or overlay variant served
//! on engine 1 uses engine 1's own copy, every answer equals the one-engine server's, and the
//! metrics give each engine's figures besides the base's sums.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::Device;
use common::server::{client, ServerProc};
use common::*;
use serde_json::{json, Value};

/// An overlay replacing SmolLM2's final norm with a scaled copy.
fn write_norm_overlay(dir: &Path) {
    // SAFETY: the checkpoint is not modified while the test maps it.
    let st = unsafe { MmapedSafetensors::new(smollm2_dir().join("model.safetensors")) }.unwrap();
    let norm = st.load("model.norm.weight", &Device::Cpu).unwrap();
    let scaled = (norm * 1.25).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("model.norm.weight".to_string(), scaled)]),
        dir.join("overlay.safetensors"),
    )
    .unwrap();
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "logprobs": 1})
}

/// Token strings and logprobs of a completion.
fn answer(s: &ServerProc, body: &Value) -> (Vec<String>, Vec<f64>) {
    let (status, r) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let logprobs = lp["token_logprobs"].as_array().unwrap();
    (
        tokens.iter().map(|t| t.as_str().unwrap().into()).collect(),
        logprobs.iter().map(|v| v.as_f64().unwrap()).collect(),
    )
}

fn engine_metric(s: &ServerProc, name: &str, engine: &str) -> f64 {
    s.metric(&format!("pruneserve:{name}{{engine=\"{engine}\""))
        .unwrap_or_else(|| panic!("no {name} for {engine}"))
}

#[test]
fn two_engines_take_the_least_loaded_and_answer_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    write_smollm2_adapter(&adapter, 8, &["q_proj", "v_proj", "down_proj"], 21);
    let overlay = tmp.path().join("overlay");
    write_norm_overlay(&overlay);
    let ad = format!("rev25-ad=reverse:0.25+adapter:{}", adapter.display());
    let ov = format!("ov=overlay:{}", overlay.display());
    let variants = ["--variant", ad.as_str(), "--variant", ov.as_str()];
    let two = ServerProc::start_default(&[&variants[..], &["--data-parallel", "2"]].concat());

    // A long request holds engine 0; the two that follow, one at a time, go to engine 1.
    let long = completion("smollm2-135m", "The history of the printing press", 60);
    let short_ad = completion("rev25-ad", "Write a haiku about rain.", 8);
    let short_ov = completion("ov", "Name three colours.", 8);
    let base = two.base.clone();
    let body = long.to_string();
    let held = std::thread::spawn(move || {
        let r = client()
            .post(format!("{base}/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.json::<Value>().unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine_metric(&two, "engine_num_requests_running", "cpu:0") < 1.0 {
        assert!(Instant::now() < deadline, "the long request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_two_ad = answer(&two, &short_ad);
    let on_two_ov = answer(&two, &short_ov);
    assert_eq!(
        engine_metric(&two, "engine_num_requests_running", "cpu:0"),
        1.0,
        "the long request was still running on engine 0"
    );
    let held = held.join().unwrap();
    assert_eq!(engine_metric(&two, "engine_sequences_total", "cpu:0"), 1.0);
    assert_eq!(
        engine_metric(&two, "engine_sequences_total", "cpu:1"),
        2.0,
        "both short requests were routed to the idle engine"
    );
    assert_eq!(two.metric("pruneserve:num_requests_running{").unwrap(), 0.0);

    // The same requests on a one-engine server, one at a time.
    let one = ServerProc::start_default(&variants);
    for (what, body, got) in [
        ("adapter on engine 1", &short_ad, on_two_ad),
        ("overlay on engine 1", &short_ov, on_two_ov),
    ] {
        let want = answer(&one, body);
        assert_eq!(got.0, want.0, "{what}: tokens");
        assert!(
            max_abs_diff(
                &got.1.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                &want.1
            ) < 1e-5,
            "{what}: {:?} vs {:?}",
            got.1,
            want.1
        );
    }
    let want_long = answer(&one, &long);
    let got_long: Vec<String> = held["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().into())
        .collect();
    assert_eq!(got_long, want_long.0, "engine 0's long answer");
    let (_, plain) = answer(&one, &completion("rev25", "Write a haiku about rain.", 8));
    let (_, adapted) = answer(&one, &short_ad);
    assert!(
        max_abs_diff(
            &plain.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            &adapted
        ) > 1e-3,
        "the adapter changes the answer's logprobs"
    );
}

#[test]
fn zero_engines_is_refused_in_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args(["serve", "--data-parallel", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--data-parallel"), "{err}");
}
