//! 200 concurrent mixed requests (chat, scoring, two variants): all succeed and each gets its own
//! answer, as computed alone beforehand.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::server::ServerProc;
use common::*;
use serde_json::{json, Value};

/// Chats are seeded samples (batch-invariant by design) so that every kind has its own answer.
/// The part of a response that identifies its answer.
fn answer(kind: &str, r: &Value) -> Value {
    match kind {
        "chat" => r["choices"][0]["message"]["content"].clone(),
        _ => r["choices"][0]["logprobs"]["token_logprobs"].clone(),
    }
}

fn close(kind: &str, a: &Value, b: &Value) -> bool {
    if kind == "chat" {
        return a == b;
    }
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() < 1e-4,
                _ => x.is_null() && y.is_null(),
            })
}

#[test]
fn two_hundred_concurrent_mixed_requests_get_their_own_answers() {
    let dir = smollm2_dir();
    let s = Arc::new(ServerProc::start(&[
        "--model",
        dir.to_str().unwrap(),
        "--served-model-name",
        "base",
        "--variant",
        "rev25=reverse:0.25",
    ]));
    let questions = ["Name a color.", "Say hi.", "What is 2+2?", "Name a fruit."];
    let mut kinds: Vec<(String, Value)> = Vec::new();
    for model in ["base", "rev25"] {
        for (i, q) in questions.iter().enumerate() {
            let seed = kinds.len();
            kinds.push(("chat".into(), json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0.8, "seed": seed})));
            kinds.push(("score".into(), json!({"model": model, "prompt": [pseudo_tokens(12 + 5 * i, 49152, i)], "echo": true, "max_tokens": 0, "logprobs": 1})));
        }
    }
    // Each kind alone first: the expected answers.
    let expected: Vec<Value> = kinds
        .iter()
        .map(|(kind, body)| {
            let path = if kind == "chat" {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            let (st, r) = s.post(path, &body.to_string());
            assert_eq!(st, 200, "{r}");
            answer(kind, &r)
        })
        .collect();
    let distinct: std::collections::HashSet<String> =
        expected.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        distinct.len(),
        expected.len(),
        "answers must be distinguishable"
    );

    let kinds = Arc::new(kinds);
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let (s, kinds) = (s.clone(), kinds.clone());
            std::thread::spawn(move || {
                let k = (i * 7) % kinds.len();
                let (kind, body) = &kinds[k];
                let path = if kind == "chat" {
                    "/v1/chat/completions"
                } else {
                    "/v1/completions"
                };
                let (st, r) = s.post(path, &body.to_string());
                (k, st, r)
            })
        })
        .collect();
    let mut per_kind: HashMap<usize, usize> = HashMap::new();
    for h in handles {
        let (k, st, r) = h.join().unwrap();
        assert_eq!(st, 200, "{r}");
        let (kind, _) = &kinds[k];
        assert!(
            close(kind, &answer(kind, &r), &expected[k]),
            "request of kind {k} got {} instead of {}",
            answer(kind, &r),
            expected[k]
        );
        *per_kind.entry(k).or_default() += 1;
    }
    assert_eq!(per_kind.len(), kinds.len());
}
