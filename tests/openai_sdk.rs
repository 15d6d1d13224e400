//! A client nobody here wrote: the OpenAI Python SDK (pip `openai`) streams chat and completions
//! with logprobs against the server (tests/reference/openai_sdk_check.py).

mod common;

use common::server::ServerProc;
use common::*;
use serde_json::json;

#[test]
fn the_openai_python_sdk_works_unmodified() {
    let s = ServerProc::start_default(&["--api-key", "sdk-key"]);
    let out = run_python(
        "openai_sdk_check.py",
        &json!({"base_url": s.url("/v1"), "api_key": "sdk-key"}),
    );
    println!("{out}");
    assert_eq!(out["models"], json!(["smollm2-135m", "rev25"]));
    assert!(
        out["chat_text"].as_str().unwrap().contains("Paris"),
        "{out}"
    );
    assert!(out["chat_chunks"].as_u64().unwrap() > 2);
    assert_eq!(out["chat_text"], out["chat_text_non_stream"]);
    assert!(out["completion_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_f64().unwrap() <= 0.0));
    assert_eq!(out["echo_len"], out["prompt_len"].as_u64().unwrap() + 1);
    assert_eq!(out["stream_completion_text"], out["completion_text"]);
}
