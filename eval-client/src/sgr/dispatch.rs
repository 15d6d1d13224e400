//! Spreading requests over several servers by their free capacity: each request goes to the live
//! server with the fewest requests in flight (under its `--concurrency`); a server that refuses
//! for load (429/503) is tried again a moment later, one that fails (connection refused, reset,
//! 5xx) is set aside with a growing back-off and its request is retried on another. The run goes
//! on as long as one server lives; with none alive for `give_up`, it stops with that error.
//! Requests are async (one tokio runtime drives every request in flight: a blocking client
//! handed each request and its answer between threads, which made most of the client's CPU).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use super::SgrError;

struct Server {
    url: String,
    http: reqwest::Client,
    in_flight: AtomicUsize,
    /// Set aside until this instant, after `failures` failures in a row.
    down: Mutex<(Option<Instant>, u32)>,
    done: AtomicUsize,
    completion_tokens: AtomicU64,
    failures_total: AtomicUsize,
}

/// One server's share of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStats {
    pub url: String,
    pub requests: usize,
    pub completion_tokens: u64,
    pub failures: usize,
}

pub struct Dispatcher {
    servers: Vec<Server>,
    per_server: usize,
    api_key: Option<String>,
    give_up: Duration,
}

/// A claimed slot of a server, given back when the request ends or is dropped (a run that stops
/// drops the requests still in flight).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Outcome {
    Done(Value),
    /// Busy (429/503): try again soon, anywhere.
    Busy,
    /// The server failed; set it aside.
    Failed(String),
}

impl Dispatcher {
    pub fn new(urls: &[String], per_server: usize, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(crate::client::REQUEST_TIMEOUT)
            .pool_max_idle_per_host(per_server.max(1))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let servers = urls
            .iter()
            .map(|u| Server {
                url: u.trim_end_matches('/').trim_end_matches("/v1").to_string(),
                http: http.clone(),
                in_flight: AtomicUsize::new(0),
                down: Mutex::new((None, 0)),
                done: AtomicUsize::new(0),
                completion_tokens: AtomicU64::new(0),
                failures_total: AtomicUsize::new(0),
            })
            .collect();
        Self {
            servers,
            per_server: per_server.max(1),
            api_key,
            give_up: Duration::from_secs(600),
        }
    }

    /// Requests the run may keep in flight (every server's share).
    pub fn concurrency(&self) -> usize {
        self.per_server * self.servers.len()
    }

    /// The live server with the most free room, claimed (its in-flight count raised).
    fn claim(&self) -> Option<usize> {
        let now = Instant::now();
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.servers.iter().enumerate() {
            let down = s
                .down
                .lock()
                .map(|d| d.0.is_some_and(|t| t > now))
                .unwrap_or(false);
            let n = s.in_flight.load(Ordering::SeqCst);
            if !down && n < self.per_server && best.is_none_or(|(_, m)| n < m) {
                best = Some((i, n));
            }
        }
        let (i, _) = best?;
        self.servers[i].in_flight.fetch_add(1, Ordering::SeqCst);
        Some(i)
    }

    async fn send(&self, server: &Server, path: &str, body: &Value) -> Outcome {
        let mut req = server.http.post(format!("{}{path}", server.url)).json(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let status = resp.status().as_u16();
        match status {
            200..=299 => match resp.json::<Value>().await {
                Ok(v) => Outcome::Done(v),
                Err(e) => Outcome::Failed(format!("invalid response: {e}")),
            },
            429 | 503 => Outcome::Busy,
            400..=499 => {
                let text = resp.text().await.unwrap_or_default();
                Outcome::Done(serde_json::json!({"client_error": status, "body": text}))
            }
            _ => Outcome::Failed(format!("status {status}")),
        }
    }

    /// POSTs `body` to `path` on some live server until one answers; a 4xx answer (the request
    /// itself is wrong) comes back as `{"client_error": status, "body": text}`.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, SgrError> {
        let mut last_live = Instant::now();
        let mut last_error = String::from("no server was tried");
        loop {
            // Every server failing or down for `give_up`: the run cannot go on.
            if last_live.elapsed() > self.give_up {
                return Err(SgrError::NoServer(last_error));
            }
            let Some(i) = self.claim() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let server = &self.servers[i];
            let outcome = {
                let _claimed = InFlight(&server.in_flight);
                self.send(server, path, body).await
            };
            match outcome {
                Outcome::Done(v) => {
                    if let Ok(mut d) = server.down.lock() {
                        *d = (None, 0);
                    }
                    server.done.fetch_add(1, Ordering::SeqCst);
                    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    server.completion_tokens.fetch_add(tokens, Ordering::SeqCst);
                    return Ok(v);
                }
                Outcome::Busy => {
                    last_live = Instant::now();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Outcome::Failed(why) => {
                    server.failures_total.fetch_add(1, Ordering::SeqCst);
                    last_error = format!("{}: {why}", server.url);
                    if let Ok(mut d) = server.down.lock() {
                        let n = d.1.saturating_add(1).min(6);
                        *d = (Some(Instant::now() + Duration::from_millis(250 << n)), n);
                    }
                }
            }
        }
    }

    pub fn stats(&self) -> Vec<ServerStats> {
        self.servers
            .iter()
            .map(|s| ServerStats {
                url: s.url.clone(),
                requests: s.done.load(Ordering::SeqCst),
                completion_tokens: s.completion_tokens.load(Ordering::SeqCst),
                failures: s.failures_total.load(Ordering::SeqCst),
            })
            .collect()
    }
}
