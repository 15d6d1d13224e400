//! Turning logits into tokens and scores: per-request sampling ([`sampler`], with linear-time
//! truncation in [`truncation`]) and log-softmax scoring with device-side greedy picks
//! ([`scoring`], kernel in `sampling.cu`).

pub mod sampler;
pub mod scoring;
pub mod truncation;
