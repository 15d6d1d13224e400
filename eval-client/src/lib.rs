//! pruneval: runs benchmarks against any OpenAI-compatible server and compares variants.
//!
//! Data path: [`tasks`] load documents → [`loglikelihood`] scores them through [`client`] →
//! [`metrics`] → result files → [`compare`] (retention with paired bootstrap CIs, McNemar).

pub mod client;
pub mod compare;
pub mod eval;
pub mod loglikelihood;
pub mod metrics;
pub mod tasks;
