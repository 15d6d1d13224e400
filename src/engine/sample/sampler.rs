//! Token sampling with a per-request seed. Reported logprobs are natural-log probabilities of the
//! model's raw distribution (log-softmax of the unprocessed logits, before penalties, temperature
//! and truncation) — vLLM's default `raw_logprobs` — so they are comparable across sampling settings.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::scoring::{log_sum_exp, raw_logprob, top_logprobs};
use super::truncation::Candidates;

/// Sampling settings of one request (OpenAI/vLLM names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 (or -1 on the API) disables.
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: Option<u64>,
    /// How many top alternatives to report per sampled token.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether the next token can be drawn on the device (`engine::sample::scoring::draw_rows`):
    /// sampled (temperature > 0), no penalties, no top alternatives asked for.
    pub fn device_draw(&self) -> bool {
        self.temperature > 0.0 && !self.has_penalties() && self.top_logprobs == 0
    }

    /// Whether a penalty changes the logits (and the generated tokens are needed).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    /// `Some(top_logprobs)` when the next token is plain argmax of the raw logits (temperature 0,
    /// no penalties), so the engine can pick it on the device.
    pub fn device_greedy_top(&self) -> Option<usize> {
        (self.temperature == 0.0 && !self.has_penalties()).then_some(self.top_logprobs)
    }
}

/// A draw done on the device: the request's truncation settings and the uniform number its own
/// generator gave for this token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceDraw {
    pub u: f64,
    pub temperature: f32,
    pub top_p: f32,
    pub min_p: f32,
    /// 0: every id.
    pub top_k: usize,
}

impl DeviceDraw {
    pub fn new(params: &SamplingParams, u: f64) -> Self {
        Self {
            u,
            temperature: params.temperature,
            top_p: params.top_p,
            min_p: params.min_p,
            top_k: params.top_k,
        }
    }
}

/// One sampled token with its raw-distribution logprob and top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler state: the request's own RNG, so batching never changes its draws.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Index of the largest value (first on ties).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The `k` best `(id, value)` pairs, descending (by `total_cmp`, the lower id first on ties).
pub fn top_k_pairs(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k == 1 {
        // One scan (lm-eval asks for one alternative): the first of the largest in the same order.
        let (best, value) = values
            .iter()
            .enumerate()
            .skip(1)
            .fold((0, values[0]), |b, (i, &x)| {
                if x.total_cmp(&b.1).is_gt() {
                    (i, x)
                } else {
                    b
                }
            });
        return vec![(best as u32, value)];
    }
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        values[b].total_cmp(&values[a]).then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i as u32, values[i])).collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from last-position `logits`. The repetition penalty covers prompt and
    /// output tokens; frequency/presence penalties cover the generated `output` only.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> Sampled {
        let lse = log_sum_exp(logits);
        let token = if self.params.has_penalties() {
            let mut x = logits.to_vec();
            self.apply_penalties(&mut x, prompt, output);
            self.pick(&x)
        } else {
            self.pick(logits)
        };
        Sampled {
            token: token as u32,
            logprob: raw_logprob(logits[token], lse),
            top: top_logprobs(logits, lse, self.params.top_logprobs),
        }
    }

    /// The uniform number of the next draw: one per sampled token, whether the host draws it
    /// ([`Sampler::sample`]) or the device ([`DeviceDraw`]), so both give a seeded request the
    /// same sequence of numbers.
    pub fn next_uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    fn pick(&mut self, x: &[f32]) -> usize {
        if self.params.temperature == 0.0 {
            argmax(x)
        } else {
            self.draw(x)
        }
    }

    fn apply_penalties(&self, x: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(output) {
                if seen.insert(t) {
                    if let Some(v) = x.get_mut(t as usize) {
                        *v = if *v > 0.0 {
                            *v / p.repetition_penalty
                        } else {
                            *v * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts = std::collections::HashMap::new();
            for &t in output {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (t, c) in counts {
                if let Some(v) = x.get_mut(t as usize) {
                    *v -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Draws from softmax(x / temperature) after top-k, top-p and min-p truncation: one uniform
    /// number per draw, walked over the kept candidates in id order (as the device kernel does).
    fn draw(&mut self, x: &[f32]) -> usize {
        let p = &self.params;
        let c = Candidates::new(x, p.temperature, p.top_k);
        let kept = c.kept(p.top_p, p.min_p);
        let total: f64 = c
            .weights
            .iter()
            .zip(&kept)
            .filter(|(_, &k)| k)
            .map(|(w, _)| w)
            .sum();
        let mut u = self.next_uniform() * total;
        let mut last = None;
        for ((&(id, _), &w), &k) in c.items.iter().zip(&c.weights).zip(&kept) {
            if !k {
                continue;
            }
            if u < w {
                return id as usize;
            }
            u -= w;
            last = Some(id);
        }
        // Rounding ran past the end: the last kept candidate.
        last.map_or_else(|| argmax(x), |id| id as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_raw_logprobs() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..SamplingParams::greedy()
        });
        let out = s.sample(&[0.0, 2.0, 1.0], &[], &[]);
        assert_eq!(out.token, 1);
        let lse = (1f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((out.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn penalties_change_the_greedy_pick() {
        let logits = [0.0, 2.0, 1.9];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[1], &[]).token, 2);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[1], &[1]).token, 2);
    }

    #[test]
    fn seeded_draws_repeat_and_truncation_holds() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..20)
                .map(|_| s.sample(&logits, &[], &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&logits, &[], &[]).token == 6));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            min_p: 0.99,
            seed: Some(1),
            ..Default::default()
        });
        let allowed: Vec<u32> = (0..50).filter(|i| i % 7 == 6).collect();
        assert!((0..20).all(|_| allowed.contains(&s.sample(&logits, &[], &[]).token)));
    }
}
