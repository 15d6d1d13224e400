//! The server process end to end on loopback: models with lineage, lm-eval-style echo scoring
//! equal to the engine's own numbers (alone and batched with 7 other requests), greedy generation.

mod common;

use std::sync::Arc;

use common::server::ServerProc;
use common::*;
use pruneserve::plan::{LayerPlan, PlanSpec};
use serde_json::{json, Value};

fn start() -> ServerProc {
    ServerProc::start_default(&[])
}

#[test]
fn serves_models_scoring_generation_and_errors() {
    let s = start();
    let models: Value = reqwest::blocking::get(format!("{}/v1/models", s.base))
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2-135m", "rev25"]);
    assert_eq!(
        models["data"][1]["dropped_layers"],
        json!((22..30).collect::<Vec<_>>())
    );
    assert_eq!(models["data"][1]["parent"], "smollm2-135m");

    // lm-eval-harness local-completions loglikelihood request shape, two prompts in one batch.
    let prompts = vec![pseudo_tokens(30, 49152, 1), pseudo_tokens(12, 49152, 2)];
    let body = json!({"model": "rev25", "prompt": prompts, "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0});
    let (status, resp_echo) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{resp_echo}");
    let resp = &resp_echo;
    let model = load_cpu(&smollm2_dir());
    let plan = Arc::new(PlanSpec::Reverse(0.25).resolve(30).unwrap());
    let want = score_all(&model, &plan, &prompts);
    for (i, p) in prompts.iter().enumerate() {
        let c = &resp["choices"][i];
        assert_eq!(c["index"], i);
        let lp = c["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lp.len(), p.len() + 1, "prompt tokens plus one generated");
        assert!(lp[0].is_null());
        let got: Vec<f32> = lp[1..p.len()]
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, want[i]);
        assert_eq!(
            c["logprobs"]["top_logprobs"].as_array().unwrap().len(),
            p.len() + 1
        );
    }

    // Greedy generation from text.
    let body = json!({"model": "smollm2-135m", "prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 12, "temperature": 0});
    let (status, resp) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{resp}");
    assert!(
        resp["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{resp}"
    );
    assert!(resp["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // The same scoring request batched with 7 others of different shapes gives the same numbers.
    let s = Arc::new(s);
    let others: Vec<_> = (0..7)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let body = if i % 2 == 0 {
                    json!({"model": "smollm2-135m", "prompt": [pseudo_tokens(5 + 9 * i, 49152, 10 + i)], "max_tokens": 12, "temperature": 0})
                } else {
                    json!({"model": "rev25", "prompt": [pseudo_tokens(7 * i, 49152, 20 + i)], "echo": true, "max_tokens": 0, "logprobs": 3})
                };
                s.post("/v1/completions", &body.to_string()).0
            })
        })
        .collect();
    let body = json!({"model": "rev25", "prompt": prompts, "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0});
    let (status, again) = s.post("/v1/completions", &body.to_string());
    assert_eq!(status, 200);
    for o in others {
        assert_eq!(o.join().unwrap(), 200);
    }
    // The same numbers up to float rounding: CPU matmuls over a different batch composition may
    // differ in the last bits (~1e-6), never more.
    for i in 0..prompts.len() {
        let a = again["choices"][i]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        let b = resp_echo["choices"][i]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a[0].is_null() && b[0].is_null());
        for (x, y) in a[1..].iter().zip(&b[1..]) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    let full = Arc::new(LayerPlan::full(30));
    let (status, resp) = s.post("/v1/completions", &json!({"model": "smollm2-135m", "prompt": [prompts[1].clone()], "echo": true, "max_tokens": 0, "logprobs": 0}).to_string());
    assert_eq!(status, 200, "{resp}");
    let got: Vec<f32> = resp["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()[1..]
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got, score_all(&model, &full, &prompts[1..2])[0]);
}
