//! The server process end to end on loopback: models with lineage, lm-eval-style echo scoring
//! equal to the engine's own numbers, greedy generation, and OpenAI error JSON.

mod common;

use std::sync::Arc;

use common::server::ServerProc;
use common::*;
use pruneserve::plan::{LayerPlan, PlanSpec};
use serde_json::{json, Value};

fn start() -> ServerProc {
    let dir = smollm2_dir();
    ServerProc::start(&[
        "--model",
        dir.to_str().unwrap(),
        "--served-model-name",
        "smollm2-135m",
        "--variant",
        "rev25=reverse:0.25",
    ])
}

fn post(s: &ServerProc, path: &str, body: &str) -> (u16, Value) {
    s.post(path, body)
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
    let (status, resp) = post(&s, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{resp}");
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
    let (status, resp) = post(&s, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{resp}");
    assert!(
        resp["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{resp}"
    );
    assert!(resp["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Errors: OpenAI JSON with the right status, and the server keeps serving.
    for (body, status, needle) in [
        ("{not json", 400, "invalid request body"),
        (
            r#"{"model": "nope", "prompt": [1, 2]}"#,
            404,
            "does not exist",
        ),
        (
            r#"{"model": "rev25", "prompt": [1, 49152]}"#,
            400,
            "out of range",
        ),
        (
            r#"{"model": "rev25", "prompt": [1, 2], "temperature": -1}"#,
            400,
            "temperature",
        ),
        (
            r#"{"model": "rev25", "prompt": [1, 2], "n": 0}"#,
            400,
            "n must be",
        ),
        (r#"{"model": "rev25", "prompt": []}"#, 400, "empty"),
        (
            r#"{"model": "rev25", "prompt": [1, 2], "max_tokens": 9000}"#,
            400,
            "context too long",
        ),
    ] {
        let (got, resp) = post(&s, "/v1/completions", body);
        assert_eq!(got, status, "{body}: {resp}");
        let msg = resp["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(resp["error"]["type"].is_string());
    }
    let full = Arc::new(LayerPlan::full(30));
    let (status, resp) = post(&s, "/v1/completions", &json!({"model": "smollm2-135m", "prompt": [prompts[1].clone()], "echo": true, "max_tokens": 0, "logprobs": 0}).to_string());
    assert_eq!(status, 200, "{resp}");
    let got: Vec<f32> = resp["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()[1..]
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got, score_all(&model, &full, &prompts[1..2])[0]);
}
