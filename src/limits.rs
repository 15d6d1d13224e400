//! Every request limit, in one place. [`Limits`] is decided once per base at start (from the
//! flags and the model) and is what every endpoint reports and enforces: the API's validation
//! ([`crate::api::validation`]) is its only reader on the request path, and the engine is built
//! with the same context length. The README's "Limits" section lists each of these.

use crate::engine::kv::KvCapacity;

/// Choices per request (`n`, `best_of` is not supported).
pub const MAX_N: usize = 128;
/// Alternatives per token (`logprobs` on completions, `top_logprobs` on chat).
pub const MAX_LOGPROBS: usize = 20;
/// Stop strings per request, and bytes in each.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_STRING_BYTES: usize = 256;
/// Entries of `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 4096;
/// `max_tokens` of a completion that gives none (OpenAI's legacy default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// A chat without `max_tokens` generates up to the room left in the context, at most this many.
pub const DEFAULT_CHAT_MAX_TOKENS_CAP: usize = 4096;
/// Bytes of a request's `model` field (names are at most 128 characters; ad-hoc plan suffixes
/// take the rest).
pub const MAX_MODEL_FIELD_BYTES: usize = 1024;
/// Length of a served name (base or variant).
pub const MAX_NAME_CHARS: usize = 128;
/// Distinct ad-hoc plan names (`base@drop=...`) that get their own metrics series; later ones
/// share `<base>@other`.
pub const MAX_AD_HOC_METRIC_SERIES: usize = 64;

/// Layer importance (`POST /v1/layer_importance`): calibration prompts, and their tokens in all,
/// per request (the paper's set is 100 prompts, 22,660 Llama-3 tokens). Each prompt must also fit
/// `max_model_len`; at most `scheduler::MAX_ENGINE_TASKS` runs wait per base.
pub const MAX_CALIBRATION_PROMPTS: usize = 1000;
pub const MAX_CALIBRATION_TOKENS: usize = 262_144;

/// The limits of one base and every variant served over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest sequence, prompt plus generated tokens: `--max-model-len`, at most the model's
    /// `max_position_embeddings` (the default).
    pub max_model_len: usize,
    /// Sequences (prompts × `n`) in flight at once, `--max-in-flight`: a request needing more can
    /// never run (400); one arriving while they are taken waits for none (503 + Retry-After).
    pub max_sequences: usize,
    pub vocab_size: usize,
    /// Bytes of the longest vocabulary entry: a text of `B` bytes is at least `B / this` tokens,
    /// so a text far over the context is refused before it is tokenized.
    pub max_token_bytes: usize,
    /// Room in the KV pool: one sequence (prompt + `max_tokens`) must fit an empty pool.
    pub kv: KvCapacity,
    /// LoRA adapters loaded at once (`--max-loras`); a batch may mix all of them.
    pub max_loras: usize,
    /// Highest adapter rank accepted (`--max-lora-rank`).
    pub max_lora_rank: usize,
}

impl Limits {
    /// The context length a base is served with: the flag, capped by the model's own limit.
    pub fn context_length(flag: Option<usize>, model_max: usize) -> usize {
        flag.map_or(model_max, |m| m.min(model_max)).max(1)
    }

    /// Most tokens (prompt + generated) one sequence of a `plan_len`-layer plan can ever hold.
    pub fn max_sequence_tokens(&self, plan_len: usize) -> usize {
        self.max_model_len.min(self.kv.max_tokens(plan_len))
    }

    /// The fewest tokens a text of `bytes` bytes can tokenize to.
    pub fn min_tokens_of_text(&self, bytes: usize) -> usize {
        bytes / self.max_token_bytes.max(1)
    }
}
