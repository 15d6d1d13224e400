//! HTTP client for OpenAI-compatible servers: retries with backoff on 429/503, one clear error
//! per failure, and an on-disk cache of every response keyed by (path, request body — which names
//! the model), so a killed run resumes and a re-run costs no requests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use std::time::Instant;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: invalid response: {message}")]
    Invalid { url: String, message: String },
    #[error("cache {path}: {message}")]
    Cache { path: String, message: String },
}

/// How long one request may take, queueing on the server included (a CPU server works through a
/// generative task's queue slowly).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// What a request carries.
enum Body {
    Json(String),
    File { path: PathBuf, purpose: String },
}

pub struct Client {
    http: reqwest::blocking::Client,
    base_url: String,
    api_key: Option<String>,
    cache_dir: Option<PathBuf>,
    sent: AtomicUsize,
    /// Nanoseconds spent waiting on HTTP round trips (summed over threads).
    waiting_ns: AtomicU64,
}

/// FNV-1a 64: a cache key that stays the same across builds and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl Client {
    /// `base_url` is the server root (with or without a trailing `/v1`).
    pub fn new(base_url: &str, api_key: Option<String>, cache_dir: Option<PathBuf>) -> Self {
        let base_url = base_url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        let http = reqwest::blocking::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::blocking::Client::new());
        Self {
            http,
            base_url,
            api_key,
            cache_dir,
            sent: AtomicUsize::new(0),
            waiting_ns: AtomicU64::new(0),
        }
    }

    /// Requests actually sent to the server (cache hits excluded).
    pub fn requests_sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Seconds spent waiting on the server (request sent to response parsed), over all threads.
    pub fn waiting_seconds(&self) -> f64 {
        self.waiting_ns.load(Ordering::SeqCst) as f64 / 1e9
    }

    /// POSTs JSON, answering from the cache when this exact request was answered before.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let text = body.to_string();
        let key = format!("{path}\n{text}");
        let cache_file = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{:016x}.json", fnv1a(key.as_bytes()))));
        if let Some(f) = &cache_file {
            if let Ok(cached) = std::fs::read_to_string(f) {
                if let Ok(v) = serde_json::from_str(&cached) {
                    return Ok(v);
                }
            }
        }
        let v = self.send(path, Some(&Body::Json(text)))?;
        if let Some(f) = &cache_file {
            let cache_err = |e: std::io::Error| ClientError::Cache {
                path: f.display().to_string(),
                message: e.to_string(),
            };
            if let Some(dir) = f.parent() {
                std::fs::create_dir_all(dir).map_err(cache_err)?;
            }
            // Unique per write: two threads may answer the same request at once.
            static WRITES: AtomicUsize = AtomicUsize::new(0);
            let n = WRITES.fetch_add(1, Ordering::Relaxed);
            let tmp = f.with_extension(format!("tmp{}-{n}", std::process::id()));
            std::fs::write(&tmp, v.to_string()).map_err(cache_err)?;
            std::fs::rename(&tmp, f).map_err(cache_err)?;
        }
        Ok(v)
    }

    /// GETs JSON (never cached: listings such as `/v1/models` change).
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(path, None)
    }

    /// POSTs JSON, never from the cache (actions such as creating a job).
    pub fn post_uncached(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.send(path, Some(&Body::Json(body.to_string())))
    }

    /// Uploads a file as OpenAI's `POST /v1/files` takes it (multipart `file` + `purpose`).
    pub fn upload(&self, file: &Path, purpose: &str) -> Result<Value, ClientError> {
        self.send(
            "/v1/files",
            Some(&Body::File {
                path: file.to_path_buf(),
                purpose: purpose.to_string(),
            }),
        )
    }

    fn send(&self, path: &str, body: Option<&Body>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base_url);
        let mut delay = Duration::from_millis(250);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = match body {
                Some(Body::Json(body)) => self
                    .http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone()),
                Some(Body::File { path, purpose }) => {
                    let form = reqwest::blocking::multipart::Form::new()
                        .text("purpose", purpose.clone())
                        .file("file", path)
                        .map_err(|e| ClientError::Invalid {
                            url: url.clone(),
                            message: format!("cannot read {}: {e}", path.display()),
                        })?;
                    self.http.post(&url).multipart(form)
                }
                None => self.http.get(&url),
            };
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            let resp = req.send().map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                message: if e.is_timeout() {
                    format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
                } else {
                    e.to_string()
                },
            })?;
            let status = resp.status().as_u16();
            if (status == 429 || status == 503) && attempt <= 6 {
                std::thread::sleep(delay);
                delay *= 2;
                continue;
            }
            let v: Result<Value, _> = resp.json();
            self.waiting_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::SeqCst);
            let v = v.map_err(|e| ClientError::Invalid {
                url: url.clone(),
                message: e.to_string(),
            })?;
            if status != 200 {
                let message = v["error"]["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                return Err(ClientError::Status {
                    url,
                    status,
                    message,
                });
            }
            return Ok(v);
        }
    }
}
