//! Warm-up of a CUDA engine before it takes requests: one short scored greedy request and one
//! seeded sampled request, run to the end, so that the first client does not wait for what every
//! engine pays once (the driver loading and JIT-compiling the kernels' PTX modules, the LoRA
//! kernels' included, cuBLAS initialisation, the first decode graph captures, the device draw).
//! Measured on the H200 (8B shape): the first request after start took 12.6 s without it.
//!
//! The warm-up's prompt goes through the prefix cache like any other (when it is on), and its
//! tokens count in the engine's prefix-cache counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Batcher, GenRequest};
use crate::engine::sample::sampler::SamplingParams;
use crate::engine::EngineError;
use crate::plan::LayerPlan;

/// Prompt length of the warm-up requests (capped by the engine's longest sequence).
const PROMPT_TOKENS: usize = 32;
/// Tokens each warm-up request generates: enough decode steps for the first graph capture.
const NEW_TOKENS: usize = 8;

impl Batcher {
    /// Runs the warm-up requests on the base's full plan (a CUDA engine only: a CPU engine has
    /// nothing to load). Returns how long it took, or the first request's error.
    pub fn warm_up(&mut self) -> Result<Duration, EngineError> {
        if !self.engine().model().device().is_cuda() {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        // The adapter kernels' module too: the first request on an adapter would otherwise wait
        // for its JIT compilation.
        #[cfg(feature = "cuda")]
        crate::engine::adapters::cuda::preload(self.engine().model().device())?;
        self.run_warm_up_requests()?;
        Ok(started.elapsed())
    }

    /// The two warm-up requests, run to the end on any device.
    fn run_warm_up_requests(&mut self) -> Result<(), EngineError> {
        let model = self.engine().model().clone();
        let config = model.config();
        let plan = Arc::new(LayerPlan::full(config.num_hidden_layers));
        let prompt_len =
            PROMPT_TOKENS.min(self.engine().max_len().saturating_sub(NEW_TOKENS).max(1));
        let prompt: Vec<u32> = (0..prompt_len)
            .map(|i| ((i * 31 + 7) % config.vocab_size) as u32)
            .collect();
        let request = |sampling: SamplingParams, prompt_logprobs: Option<usize>| GenRequest {
            plan: plan.clone(),
            overlay: None,
            lora: None,
            prompt: prompt.clone(),
            max_tokens: NEW_TOKENS,
            sampling,
            prompt_logprobs,
            stop_token_ids: vec![],
            eos_token_ids: vec![],
            ignore_eos: true,
        };
        let sampled = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(0),
            ..SamplingParams::default()
        };
        let requests = vec![
            request(SamplingParams::greedy(), Some(1)),
            request(sampled, None),
        ];
        for outcome in self.run_all(requests) {
            outcome?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::super::prefill_cap_tests::{batcher, request, tiny};

    /// After the warm-up requests the batcher is idle, every KV block is free again (or held by
    /// the prefix cache, when it is on), and a request gives the tokens it gives on a fresh
    /// batcher.
    #[test]
    fn the_warm_up_leaves_the_engine_as_it_found_it() {
        let (_dir, model) = tiny(DType::F32);
        let tokens = |b: &mut super::Batcher| -> Vec<u32> {
            let out = b.run_all(vec![request(&model, 40, 12, false)]);
            out.into_iter()
                .next()
                .unwrap()
                .unwrap()
                .tokens
                .iter()
                .map(|s| s.token)
                .collect()
        };
        let want = tokens(&mut batcher(&model, 64, 0));
        let mut warmed = batcher(&model, 64, 0);
        let before = warmed.engine().kv_usage();
        warmed.run_warm_up_requests().unwrap();
        let after = warmed.engine().kv_usage();
        assert!(warmed.is_idle());
        assert_eq!((after.used_blocks, after.cached_blocks), (0, 0));
        assert_eq!(before.used_blocks, 0);
        assert_eq!(tokens(&mut warmed), want);
        // A CPU engine skips the warm-up.
        assert!(warmed.warm_up().unwrap().is_zero());
    }
}
