//! `pruneval bench`: a load generator measuring a server through HTTP the way users see it:
//! streamed completions at several concurrency levels (TTFT, output tok/s), batch-1 decode speed,
//! and echo-logprob scoring throughput (the lm-eval loglikelihood request shape).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::workers::run_indexed;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("request to {url} failed: {msg}")]
    Http { url: String, msg: String },
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed stream: {0}")]
    Stream(String),
}

/// What one streamed request saw.
#[derive(Debug, Clone)]
struct StreamTiming {
    ttft: Duration,
    total: Duration,
    output_tokens: usize,
    /// Milliseconds between successive streamed chunks after the first (inter-token latency).
    gaps_ms: Vec<f64>,
}

/// A generation load level's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub model: String,
    pub concurrency: usize,
    pub requests: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub output_tok_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Inter-token latency over every gap between streamed tokens of every request.
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Per request: (output tokens - 1) / (total - ttft), averaged.
    pub decode_tok_per_s_per_request: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScoringReport {
    pub model: String,
    pub prompts: usize,
    pub prompt_tokens: usize,
    pub wall_s: f64,
    pub prompt_tok_per_s: f64,
}

pub struct LoadGen {
    http: reqwest::blocking::Client,
    base_url: String,
    api_key: Option<String>,
}

/// Deterministic pseudo-random token ids in `lo..hi`, different per `salt`.
pub fn token_prompt(len: usize, salt: u64, lo: u32, hi: u32) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lo + (x % u64::from(hi - lo)) as u32
        })
        .collect()
}

/// The `q`-quantile (0..1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl LoadGen {
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self, LoadError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(1800))
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| LoadError::Http {
                url: base_url.into(),
                msg: e.to_string(),
            })?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
        })
    }

    fn post(&self, body: &Value) -> Result<reqwest::blocking::Response, LoadError> {
        let url = format!("{}/v1/completions", self.base_url);
        let mut req = self.http.post(&url).json(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().map_err(|e| LoadError::Http {
            url: url.clone(),
            msg: e.to_string(),
        })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.text().unwrap_or_default();
            return Err(LoadError::Status { status, body });
        }
        Ok(resp)
    }

    /// One streamed completion of `prompt` (token ids), `max_tokens` long regardless of EOS.
    fn stream_one(
        &self,
        model: &str,
        prompt: &[u32],
        max_tokens: usize,
    ) -> Result<StreamTiming, LoadError> {
        let body = json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
        });
        let start = Instant::now();
        let resp = self.post(&body)?;
        let mut ttft = None;
        let mut output_tokens = None;
        let (mut last, mut gaps_ms) = (None::<Instant>, Vec::new());
        for line in BufReader::new(resp).lines() {
            let line = line.map_err(|e| LoadError::Stream(e.to_string()))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: Value =
                serde_json::from_str(data).map_err(|e| LoadError::Stream(e.to_string()))?;
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                match last {
                    Some(t) => gaps_ms.push((now - t).as_secs_f64() * 1e3),
                    None => ttft = Some(now - start),
                }
                last = Some(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                output_tokens = Some(n as usize);
            }
        }
        Ok(StreamTiming {
            ttft: ttft.ok_or_else(|| LoadError::Stream("no token arrived".into()))?,
            total: start.elapsed(),
            output_tokens: output_tokens
                .ok_or_else(|| LoadError::Stream("no usage in the stream".into()))?,
            gaps_ms,
        })
    }

    /// `requests` streamed completions from `concurrency` workers; request `i` goes to
    /// `models[i % models.len()]` (one model, or a mix of them in the same batches).
    pub fn generation_level(
        &self,
        models: &[String],
        concurrency: usize,
        requests: usize,
        prompt_len: usize,
        max_tokens: usize,
    ) -> Result<LevelReport, LoadError> {
        let start = Instant::now();
        let timings = run_indexed(
            requests,
            concurrency,
            |i| {
                let prompt = token_prompt(prompt_len, i as u64, 1000, 100_000);
                self.stream_one(&models[i % models.len().max(1)], &prompt, max_tokens)
            },
            || LoadError::Stream("a request was not run".into()),
        )?;
        let wall = start.elapsed().as_secs_f64();
        let output_tokens: usize = timings.iter().map(|t| t.output_tokens).sum();
        let mut ttfts: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
        ttfts.sort_by(f64::total_cmp);
        let mut gaps: Vec<f64> = timings
            .iter()
            .flat_map(|t| t.gaps_ms.iter().copied())
            .collect();
        gaps.sort_by(f64::total_cmp);
        let per_request: Vec<f64> = timings
            .iter()
            .filter(|t| t.output_tokens > 1 && t.total > t.ttft)
            .map(|t| (t.output_tokens - 1) as f64 / (t.total - t.ttft).as_secs_f64())
            .collect();
        Ok(LevelReport {
            model: models.join("+"),
            concurrency,
            requests,
            output_tokens,
            wall_s: wall,
            output_tok_per_s: output_tokens as f64 / wall,
            ttft_p50_ms: quantile(&ttfts, 0.5),
            ttft_p99_ms: quantile(&ttfts, 0.99),
            itl_p50_ms: quantile(&gaps, 0.5),
            itl_p99_ms: quantile(&gaps, 0.99),
            decode_tok_per_s_per_request: per_request.iter().sum::<f64>()
                / per_request.len().max(1) as f64,
        })
    }

    /// Echo + logprobs scoring of `prompts` prompts of `prompt_len` tokens, `batch` prompts per
    /// request, `concurrency` requests in flight.
    pub fn scoring(
        &self,
        model: &str,
        prompts: usize,
        prompt_len: usize,
        batch: usize,
        concurrency: usize,
    ) -> Result<ScoringReport, LoadError> {
        let batches = prompts.div_ceil(batch);
        let start = Instant::now();
        let tokens = run_indexed(
            batches,
            concurrency,
            |b| {
                let ids: Vec<Vec<u32>> = (b * batch..((b + 1) * batch).min(prompts))
                    .map(|i| token_prompt(prompt_len, 1_000_000 + i as u64, 1000, 100_000))
                    .collect();
                let body = json!({
                    "model": model, "prompt": ids, "max_tokens": 1, "echo": true,
                    "logprobs": 1, "temperature": 0.0,
                });
                let v: Value = self.post(&body)?.json().map_err(|e| LoadError::Http {
                    url: self.base_url.clone(),
                    msg: e.to_string(),
                })?;
                Ok(v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize)
            },
            || LoadError::Stream("a scoring batch was not run".into()),
        )?;
        let prompt_tokens: usize = tokens.iter().sum();
        let wall = start.elapsed().as_secs_f64();
        Ok(ScoringReport {
            model: model.into(),
            prompts,
            prompt_tokens,
            wall_s: wall,
            prompt_tok_per_s: prompt_tokens as f64 / wall,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn token_prompts_are_deterministic_in_range_and_differ_by_salt() {
        let a = token_prompt(512, 1, 1000, 100_000);
        assert_eq!(a, token_prompt(512, 1, 1000, 100_000));
        assert_ne!(a, token_prompt(512, 2, 1000, 100_000));
        assert!(a.iter().all(|&t| (1000..100_000).contains(&t)));
    }
}
