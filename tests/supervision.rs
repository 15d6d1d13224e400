//! The engine loop is supervised: a panic inside a step fails the requests in flight with a clear
//! 500 (a streamed one with an error event), the loop restarts on a fresh engine that answers as
//! before, and after too many failures the base is marked unhealthy: `/health` says 503 and names
//! it, and new requests get 503. With two engines (`--data-parallel 2`) a failed engine gets no
//! new requests while the other serves, and the base is unhealthy only when both have failed. The
//! fault is injected through the engine wrapper of `serve::start_loaded`, into a server running
//! in this process.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::*;
use pruneserve::api::validation::Validator;
use pruneserve::api::{self, AppState};
use pruneserve::engine::batch::{BatchEvent, GenRequest};
use pruneserve::engine::kv::KvCapacity;
use pruneserve::engine::{EngineError, SeqId};
use pruneserve::loaded::{DeviceKind, LoadedModel};
use pruneserve::metrics::Metrics;
use pruneserve::registry::Registry;
use pruneserve::scheduler::{BatchLoop, LoopStats, RestartPolicy};
use pruneserve::serve::{self, EngineSettings, EngineWrapper};
use serde_json::{json, Value};

/// A prompt starting with these ids makes the engine panic on its next step.
const POISON: [u32; 3] = [13, 37, 13];

/// A batcher that panics in `step` while a poisoned request is in it.
struct Faulty {
    inner: Box<dyn BatchLoop>,
    poisoned: HashSet<SeqId>,
}

impl BatchLoop for Faulty {
    fn submit(&mut self, id: SeqId, req: GenRequest) -> Result<(), EngineError> {
        if req.prompt.starts_with(&POISON) {
            self.poisoned.insert(id);
        }
        self.inner.submit(id, req)
    }

    fn cancel(&mut self, id: SeqId) {
        self.poisoned.remove(&id);
        self.inner.cancel(id)
    }

    fn step(&mut self) -> Vec<BatchEvent> {
        assert!(self.poisoned.is_empty(), "injected fault");
        self.inner.step()
    }

    fn is_idle(&self) -> bool {
        self.inner.is_idle()
    }

    fn stats(&self) -> LoopStats {
        self.inner.stats()
    }

    fn capacity(&self) -> KvCapacity {
        self.inner.capacity()
    }
}

/// Starts a server over a tiny Llama whose `engines` engines are [`Faulty`] and give up after
/// `max_restarts` restarts a minute; returns its base URL.
fn start_faulty_server(root: &std::path::Path, engines: usize, max_restarts: usize) -> String {
    let dir = write_tiny(root, "tiny", tiny_config("LlamaForCausalLM"), 3);
    let model = LoadedModel::load(dir.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let settings = EngineSettings {
        device: DeviceKind::Cpu,
        dtype: Default::default(),
        kv_blocks: 256,
        max_step_tokens: 512,
        max_prefill_while_decoding: 0,
        max_in_flight: 16,
        max_model_len: None,
        kv_cache_gb: None,
        kv_cache_dtype: Default::default(),
        restart_policy: RestartPolicy {
            max_restarts,
            window: Duration::from_secs(60),
        },
        max_loras: 4,
        max_lora_rank: 16,
        prefix_caching: false,
        data_parallel: engines,
        reserve_max_tokens: false,
        sampler: Default::default(),
        cuda_graph_max_batch: 0,
    };
    let wrap: EngineWrapper = Arc::new(|inner| {
        Box::new(Faulty {
            inner,
            poisoned: HashSet::new(),
        })
    });
    let base = serve::start_loaded("tiny", "tiny", model, &settings, Some(wrap)).unwrap();
    let state = Arc::new(AppState {
        registry: Arc::new(Registry::new(vec![base]).unwrap()),
        metrics: Arc::new(Metrics::new().unwrap()),
        api_key: None,
        validator: Validator::new(2),
        finetune: None,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || serve::run_http(listener, api::router(state, 1 << 20)));
    url
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = server_client().post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn server_client() -> reqwest::blocking::Client {
    common::server::client()
}

fn greedy(url: &str) -> (u16, Value) {
    post(
        &format!("{url}/v1/completions"),
        &json!({"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0}),
    )
}

/// A sample of `/metrics` whose line starts with `prefix`.
fn metric(url: &str, prefix: &str) -> f64 {
    let text = server_client()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn running(url: &str) -> f64 {
    metric(url, "pruneserve:num_requests_running")
}

fn health(url: &str) -> (u16, Value) {
    let r = server_client().get(format!("{url}/health")).send().unwrap();
    (r.status().as_u16(), r.json::<Value>().unwrap())
}

#[test]
fn a_panicking_engine_fails_its_requests_restarts_and_finally_reports_unhealthy() {
    let root = tempfile::tempdir().unwrap();
    // One restart is allowed per minute; the second failure gives up.
    let url = start_faulty_server(root.path(), 1, 1);
    let (status, reference) = greedy(&url);
    assert_eq!(status, 200, "{reference}");
    assert_eq!(health(&url).0, 200);

    // Two long requests in flight, one streamed, when the fault hits.
    let long = json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": true});
    let plain = {
        let (url, body) = (url.clone(), long.clone());
        std::thread::spawn(move || post(&format!("{url}/v1/completions"), &body))
    };
    let streamed = {
        let (url, mut body) = (url.clone(), long.clone());
        body["stream"] = json!(true);
        std::thread::spawn(move || {
            let r = server_client()
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            BufReader::new(r)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                .collect::<Vec<_>>()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while running(&url) < 2.0 {
        assert!(Instant::now() < deadline, "the long requests never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let poison = json!({"model": "tiny", "prompt": POISON, "max_tokens": 4});
    let (status, body) = post(&format!("{url}/v1/completions"), &poison);
    assert_eq!(status, 500, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("the engine failed while running this request"));
    let (status, body) = plain.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    let events = streamed.join().unwrap();
    let error: Value = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e.get("error").is_some())
        .expect("the stream reports the failure");
    assert_eq!(error["error"]["code"], 500);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // Restarted: healthy, counted, and the same answer as before.
    assert_eq!(health(&url).0, 200);
    let (status, again) = greedy(&url);
    assert_eq!(status, 200);
    assert_eq!(
        again["choices"][0]["text"], reference["choices"][0]["text"],
        "the fresh engine answers as the first did"
    );
    let metrics = server_client()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("pruneserve:engine_restarts_total{model_name=\"tiny\"} 1"),
        "{metrics}"
    );

    // A second failure within the window: the base gives up.
    let (status, _) = post(&format!("{url}/v1/completions"), &poison);
    assert_eq!(status, 500);
    let (status, body) = health(&url);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["failed"][0]["model"], "tiny");
    assert!(body["failed"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("injected fault"));
    let (status, body) = greedy(&url);
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unhealthy"));
}

#[test]
fn with_two_engines_a_failed_one_is_bypassed_until_both_have_failed() {
    let root = tempfile::tempdir().unwrap();
    // No restarts: an engine's first failure is its last.
    let url = start_faulty_server(root.path(), 2, 0);
    let (status, reference) = greedy(&url);
    assert_eq!(status, 200, "{reference}");
    let poison = json!({"model": "tiny", "prompt": POISON, "max_tokens": 4});
    let routed = |engine: &str| {
        metric(
            &url,
            &format!("pruneserve:engine_sequences_total{{engine=\"{engine}\""),
        )
    };

    // Both idle: the poisoned request goes to engine 0, which gives up.
    let (status, _) = post(&format!("{url}/v1/completions"), &poison);
    assert_eq!(status, 500);
    assert_eq!(routed("cpu:0"), 2.0);
    let (status, body) = health(&url);
    assert_eq!(status, 200, "one engine still serves: {body}");
    for _ in 0..3 {
        let (status, again) = greedy(&url);
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["choices"][0]["text"], reference["choices"][0]["text"]);
    }
    assert_eq!(routed("cpu:0"), 2.0, "the failed engine gets nothing new");
    assert_eq!(routed("cpu:1"), 3.0);

    // The last engine fails too: the base is unhealthy, naming both.
    let (status, _) = post(&format!("{url}/v1/completions"), &poison);
    assert_eq!(status, 500);
    let (status, body) = health(&url);
    assert_eq!(status, 503, "{body}");
    let reason = body["failed"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("cpu:0: ")
            && reason.contains("cpu:1: ")
            && reason.contains("injected fault"),
        "{reason}"
    );
    let (status, body) = greedy(&url);
    assert_eq!(status, 503, "{body}");
}
