//! Generation requests for generative tasks: `/v1/completions` for text prompts and
//! `/v1/chat/completions` for chat turns (the server applies the model's chat template), `n`
//! samples per item, concurrent, every response cached by the client.

use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::gen_tasks::{GenDoc, Prompt};
use crate::workers::run_indexed;

/// Sampling settings shared by a task's requests (`None`: the task's default).
#[derive(Debug, Clone, Copy, Default)]
pub struct GenSettings {
    pub temperature: f64,
    pub max_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub samples: usize,
    /// Nucleus and top-k sampling (`None`: the server's default, off).
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
}

/// The request body for one item.
pub fn request_body(model: &str, doc: &GenDoc, s: &GenSettings) -> (&'static str, Value) {
    let mut body = json!({
        "model": model,
        "max_tokens": s.max_tokens.unwrap_or(doc.max_tokens),
        "temperature": s.temperature,
        "n": s.samples.max(1),
        "stop": doc.stop,
    });
    if let Some(seed) = s.seed {
        body["seed"] = json!(seed);
    }
    if let Some(p) = s.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(k) = s.top_k {
        body["top_k"] = json!(k);
    }
    match &doc.prompt {
        Prompt::Completion(text) => {
            body["prompt"] = json!(text);
            ("/v1/completions", body)
        }
        Prompt::Chat(turns) => {
            let messages: Vec<Value> = turns
                .iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            body["messages"] = json!(messages);
            ("/v1/chat/completions", body)
        }
    }
}

/// The texts of a response's choices, in index order.
pub fn response_texts(v: &Value, path: &str) -> Result<Vec<String>, ClientError> {
    let invalid = |message: &str| ClientError::Invalid {
        url: path.into(),
        message: message.into(),
    };
    let mut choices: Vec<&Value> = v["choices"]
        .as_array()
        .ok_or_else(|| invalid("no choices"))?
        .iter()
        .collect();
    choices.sort_by_key(|c| c["index"].as_u64().unwrap_or(0));
    choices
        .iter()
        .map(|c| {
            c["text"]
                .as_str()
                .or_else(|| c["message"]["content"].as_str())
                .map(String::from)
                .ok_or_else(|| invalid("a choice has no text"))
        })
        .collect()
}

/// Generates for every doc; `on_done` is called once per finished item (progress).
pub fn generate_all(
    client: &Client,
    model: &str,
    docs: &[GenDoc],
    settings: &GenSettings,
    concurrency: usize,
    on_done: &(dyn Fn() + Sync),
) -> Result<Vec<Vec<String>>, ClientError> {
    run_indexed(
        docs.len(),
        concurrency,
        |i| {
            let (path, body) = request_body(model, &docs[i], settings);
            let r = client
                .post(path, &body)
                .and_then(|v| response_texts(&v, path));
            on_done();
            r
        },
        || ClientError::Invalid {
            url: "generation".into(),
            message: "an item was not generated".into(),
        },
    )
}
