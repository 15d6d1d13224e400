//! A `pruneserve serve` process on a free loopback port, killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub struct ServerProc {
    child: Child,
    pub base: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProc {
    /// Starts the server with `args` after `serve --port 0` and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
            .args(["serve", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(i) = line.find("serving on ") {
                break line[i + "serving on ".len()..].trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        ServerProc { child, base }
    }

    /// The default model as `smollm2-135m` with its `rev25` variant, plus `extra` arguments.
    pub fn start_default(extra: &[&str]) -> Self {
        let dir = super::smollm2_dir();
        let mut args = vec![
            "--model",
            dir.to_str().unwrap(),
            "--served-model-name",
            "smollm2-135m",
            "--variant",
            "rev25=reverse:0.25",
        ];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = client()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> Value {
        reqwest::blocking::get(self.url(path))
            .unwrap()
            .json()
            .unwrap()
    }

    /// The prompt logprobs (`echo` + `logprobs: 0`, the first token's `null` left out) of
    /// `prompt` under `model`.
    pub fn echo_logprobs(&self, model: &str, prompt: &[u32]) -> Vec<f32> {
        let body = serde_json::json!({"model": model, "prompt": [prompt], "echo": true,
                                      "max_tokens": 0, "logprobs": 0});
        let (status, r) = self.post("/v1/completions", &body.to_string());
        assert_eq!(status, 200, "{model}: {r}");
        r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()[1..]
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    }

    /// POSTs a streaming request and returns every `data:` payload, `[DONE]` included.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = client().post(self.url(path)).json(body).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        BufReader::new(r)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// A prometheus sample value, e.g. `pruneserve:num_requests_running{model_name="x"}`.
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let text = reqwest::blocking::get(self.url("/metrics"))
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// A blocking client whose timeout allows slow CPU runs under load.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()
        .unwrap()
}

/// Resident set size of a process in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}
