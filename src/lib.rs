//! pruneserve: an OpenAI-compatible model server for layer-pruned LLMs.
//!
//! Data path: [`api`] (validation against [`limits`]) → [`registry`] → [`scheduler`] (engine loop,
//! output step) → [`engine`] (model, KV cache, sampler); checkpoint I/O lives apart in
//! [`checkpoint`]; [`plan`] describes which base layers a variant runs.

pub mod api;
pub mod bench;
pub mod chat_template;
pub mod checkpoint;
pub mod engine;
pub mod finetune;
pub mod importance;
pub mod limits;
pub mod loaded;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod registry;
pub mod scheduler;
pub mod selftest;
pub mod serve;
