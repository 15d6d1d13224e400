//! pruneval: runs benchmarks against any OpenAI-compatible server and compares variants.
//!
//! Data path: [`tasks`] / [`gen_tasks`] load documents (from `--data-dir`, or [`hub_data`]) → [`loglikelihood`] scores them, or
//! [`generation`] generates and [`sandbox`] runs programs, through [`client`] → [`metrics`] →
//! [`eval`] writes result files → [`compare`] (retention with paired bootstrap CIs, McNemar) and
//! [`plot`]. [`loadgen`] is the HTTP load generator of `pruneval bench`; [`sgr`] generates
//! Self-Generated Response training files (`pruneval sgr`); [`ablate`] runs layer ablation
//! sweeps and greedy pruning over a server's ad-hoc plans (`pruneval ablate`).

pub mod ablate;
pub mod analysis;
pub mod client;
pub mod compare;
pub mod compare_command;
pub mod eval;
pub mod eval_command;
pub mod finetune;
pub mod gen_tasks;
pub mod generation;
pub mod hub_data;
pub mod loadgen;
pub mod loglikelihood;
pub mod metrics;
pub mod plot;
pub mod recover;
pub mod sandbox;
pub mod sgr;
pub mod shared_choice;
pub mod tasks;
pub mod workers;
