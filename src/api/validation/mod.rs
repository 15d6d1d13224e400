//! Request validation, the one place every endpoint consults (as TGI's `validation.rs`): it holds
//! each request against its base's [`Limits`] and the constants of [`crate::limits`] (generation
//! here, layer importance in [`importance`]), and it does the CPU-heavy part of accepting a request
//! (chat templating, tokenizing, detokenizing) on a bounded blocking pool ([`tokenizing`]), after
//! refusing texts that are certainly too long by their byte length.
//!
//! Contract: nothing reaches the scheduler that could fail there for a reason the client can
//! change; every refusal names its parameter and the limit; no request costs the async runtime
//! more than parsing its body.

mod importance;
mod tokenizing;

use std::borrow::Cow;

use serde::Deserialize;

use super::error::ApiError;
use crate::chat_template::ChatMessage;
use crate::engine::batch::GenRequest;
use crate::engine::sample::sampler::SamplingParams;
use crate::limits::{
    Limits, DEFAULT_CHAT_MAX_TOKENS_CAP, MAX_LOGPROBS, MAX_MODEL_FIELD_BYTES, MAX_N,
    MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_STOP_TOKEN_IDS,
};
use crate::registry::Resolved;
use crate::scheduler::OutputSpec;
pub use importance::{check_importance, CalibrationField, ImportanceInput};
pub use tokenizing::Validator;

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("{param} must be {rule}")]
    Invalid {
        param: &'static str,
        rule: Cow<'static, str>,
    },
    #[error("the model field is {bytes} bytes; at most {MAX_MODEL_FIELD_BYTES} are accepted")]
    ModelField { bytes: usize },
    #[error("at most {MAX_STOP_STRINGS} stop strings are accepted, {0} given")]
    TooManyStops(usize),
    #[error("a stop string is {0} bytes; at most {MAX_STOP_STRING_BYTES} are accepted")]
    StopTooLong(usize),
    #[error("stop strings must not be empty")]
    EmptyStop,
    #[error("at most {MAX_STOP_TOKEN_IDS} stop_token_ids are accepted, {0} given")]
    TooManyStopIds(usize),
    #[error("token id {id} is out of range (vocabulary size {vocab})")]
    TokenOutOfRange {
        param: &'static str,
        id: u32,
        vocab: usize,
    },
    #[error("the prompt must not be empty")]
    EmptyPrompt { param: &'static str },
    #[error("the text is {bytes} bytes, so at least {min_tokens} tokens (no token of this model is longer than {max_token_bytes} bytes): more than max_model_len {max_model_len}")]
    TextTooLong {
        param: &'static str,
        bytes: usize,
        min_tokens: usize,
        max_token_bytes: usize,
        max_model_len: usize,
    },
    #[error("context too long: {prompt} prompt tokens + {max_tokens} max_tokens exceeds max_model_len {max_model_len}")]
    ContextTooLong {
        prompt: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("{tokens} tokens (prompt + max_tokens) can never fit the KV cache, which holds {capacity} tokens of one sequence of this plan")]
    KvTooSmall { tokens: usize, capacity: usize },
    #[error("this request needs {needed} sequences (prompts × n) but at most {max} can be in flight (--max-in-flight)")]
    TooManySequences { needed: usize, max: usize },
    #[error("`top_logprobs` needs `logprobs: true`")]
    TopLogprobsWithoutLogprobs,
    #[error("messages[{index}].role `{role}` is not supported (system, user, assistant)")]
    BadRole { index: usize, role: String },
    #[error("messages[{index}]: content part type `{kind}` is not supported (text)")]
    ContentPart { index: usize, kind: String },
    #[error("messages must not be empty")]
    NoMessages,
    #[error("this model has no chat template")]
    NoChatTemplate,
    #[error(transparent)]
    Template(#[from] crate::chat_template::TemplateError),
    #[error(transparent)]
    Tokenize(#[from] crate::loaded::TokenizeError),
    #[error("give exactly one of `prompt` or `messages`")]
    PromptOrMessages,
    #[error("{given} tokens given; at most max_model_len ({max}) are accepted")]
    TooManyTokens {
        param: &'static str,
        given: usize,
        max: usize,
    },
    #[error("the tokenizer failed on this input")]
    TokenizerPanicked,
}

impl ValidationError {
    fn param(&self) -> Option<&'static str> {
        use ValidationError as E;
        match self {
            E::Invalid { param, .. }
            | E::TokenOutOfRange { param, .. }
            | E::EmptyPrompt { param }
            | E::TextTooLong { param, .. }
            | E::TooManyTokens { param, .. } => Some(param),
            E::ModelField { .. } => Some("model"),
            E::TooManyStops(_) | E::StopTooLong(_) | E::EmptyStop => Some("stop"),
            E::TooManyStopIds(_) => Some("stop_token_ids"),
            E::ContextTooLong { .. } | E::KvTooSmall { .. } => Some("max_tokens"),
            E::TooManySequences { .. } => Some("n"),
            E::TopLogprobsWithoutLogprobs => Some("top_logprobs"),
            E::BadRole { .. } | E::ContentPart { .. } | E::NoMessages | E::Template(_) => {
                Some("messages")
            }
            E::NoChatTemplate | E::PromptOrMessages => Some("messages"),
            E::Tokenize(_) | E::TokenizerPanicked => None,
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::TokenizerPanicked => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string(), e.param()),
        }
    }
}

fn invalid(param: &'static str, rule: impl Into<Cow<'static, str>>) -> ValidationError {
    ValidationError::Invalid {
        param,
        rule: rule.into(),
    }
}

/// The model field's size; checked before it is resolved or echoed.
pub fn check_model_field(model: &str) -> Result<(), ValidationError> {
    if model.len() > MAX_MODEL_FIELD_BYTES {
        return Err(ValidationError::ModelField { bytes: model.len() });
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and control fields common to `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

impl SamplingFields {
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    fn n(&self, prompts: usize, limits: &Limits) -> Result<usize, ValidationError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(invalid("n", format!("between 1 and {MAX_N}")));
        }
        let needed = n.saturating_mul(prompts);
        if needed > limits.max_sequences {
            return Err(ValidationError::TooManySequences {
                needed,
                max: limits.max_sequences,
            });
        }
        Ok(n)
    }

    fn stops(&self) -> Result<Vec<String>, ValidationError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOP_STRINGS {
            return Err(ValidationError::TooManyStops(stops.len()));
        }
        if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
            return Err(ValidationError::StopTooLong(long.len()));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ValidationError::EmptyStop);
        }
        Ok(stops)
    }

    fn stop_token_ids(&self, limits: &Limits) -> Result<Vec<u32>, ValidationError> {
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ValidationError::TooManyStopIds(self.stop_token_ids.len()));
        }
        check_token_ids(limits, &self.stop_token_ids, "stop_token_ids")?;
        Ok(self.stop_token_ids.clone())
    }

    fn params(&self, top_logprobs: usize) -> Result<SamplingParams, ValidationError> {
        let finite = |param: &'static str, v: Option<f32>, default: f32| match v {
            Some(x) if !x.is_finite() => Err(invalid(param, "a finite number")),
            v => Ok(v.unwrap_or(default)),
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(_) => return Err(invalid("top_k", "-1 or positive")),
        };
        let p = SamplingParams {
            temperature: finite("temperature", self.temperature, 1.0)?,
            top_p: finite("top_p", self.top_p, 1.0)?,
            top_k,
            min_p: finite("min_p", self.min_p, 0.0)?,
            repetition_penalty: finite("repetition_penalty", self.repetition_penalty, 1.0)?,
            frequency_penalty: finite("frequency_penalty", self.frequency_penalty, 0.0)?,
            presence_penalty: finite("presence_penalty", self.presence_penalty, 0.0)?,
            seed: self.seed,
            top_logprobs,
        };
        if p.temperature < 0.0 {
            return Err(invalid("temperature", ">= 0"));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid("top_p", "in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(invalid("min_p", "in [0, 1]"));
        }
        if p.repetition_penalty <= 0.0 {
            return Err(invalid("repetition_penalty", "> 0"));
        }
        if !(-2.0..=2.0).contains(&p.frequency_penalty) {
            return Err(invalid("frequency_penalty", "in [-2, 2]"));
        }
        if !(-2.0..=2.0).contains(&p.presence_penalty) {
            return Err(invalid("presence_penalty", "in [-2, 2]"));
        }
        Ok(p)
    }
}

/// The number of alternatives asked for, checked (`param` is `logprobs` or `top_logprobs`).
pub fn check_logprobs(param: &'static str, top: usize) -> Result<usize, ValidationError> {
    if top > MAX_LOGPROBS {
        return Err(invalid(param, format!("at most {MAX_LOGPROBS}")));
    }
    Ok(top)
}

/// Chat's `logprobs`/`top_logprobs` pair, as vLLM checks it.
pub fn chat_top_logprobs(logprobs: bool, top: Option<usize>) -> Result<usize, ValidationError> {
    match (logprobs, top) {
        (false, Some(_)) => Err(ValidationError::TopLogprobsWithoutLogprobs),
        (false, None) => Ok(0),
        (true, top) => check_logprobs("top_logprobs", top.unwrap_or(0)),
    }
}

/// Rejects token ids outside the vocabulary, naming the request parameter.
pub fn check_token_ids(
    limits: &Limits,
    ids: &[u32],
    param: &'static str,
) -> Result<(), ValidationError> {
    match ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
        Some(&id) => Err(ValidationError::TokenOutOfRange {
            param,
            id,
            vocab: limits.vocab_size,
        }),
        None => Ok(()),
    }
}

/// A generation (or scoring) request that passed validation.
pub struct Generation {
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub prompt_logprobs: Option<usize>,
}

/// What decides `max_tokens` when the request gives none.
pub enum MaxTokens {
    Given(usize),
    /// Completions: OpenAI's legacy default.
    CompletionDefault,
    /// Chat: the room left in the context, at most [`DEFAULT_CHAT_MAX_TOKENS_CAP`].
    ChatDefault,
}

impl MaxTokens {
    /// Completions: 0 only with `echo` (prompt scoring).
    pub fn completion(max_tokens: Option<usize>, echo: bool) -> Result<Self, ValidationError> {
        match max_tokens {
            Some(0) if !echo => Err(invalid(
                "max_tokens",
                "at least 1 without echo (0 scores the prompt only with echo)",
            )),
            Some(m) => Ok(MaxTokens::Given(m)),
            None => Ok(MaxTokens::CompletionDefault),
        }
    }

    /// Chat: `max_completion_tokens` or the older `max_tokens`, at least 1.
    pub fn chat(
        max_completion_tokens: Option<usize>,
        max_tokens: Option<usize>,
    ) -> Result<Self, ValidationError> {
        match max_completion_tokens.or(max_tokens) {
            Some(0) => Err(invalid("max_tokens", "at least 1")),
            Some(m) => Ok(MaxTokens::Given(m)),
            None => Ok(MaxTokens::ChatDefault),
        }
    }
}

impl Generation {
    /// Checks a request's prompts (already tokenized) and fields against `target`'s limits.
    pub fn new(
        target: &Resolved,
        prompts: Vec<Vec<u32>>,
        fields: &SamplingFields,
        max_tokens: MaxTokens,
        top_logprobs: usize,
        prompt_logprobs: Option<usize>,
    ) -> Result<Self, ValidationError> {
        let limits = &target.base.limits;
        let n = fields.n(prompts.len(), limits)?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let room = limits
            .max_sequence_tokens(target.plan.layers().len())
            .saturating_sub(longest);
        let max_tokens = match max_tokens {
            MaxTokens::Given(m) => m,
            MaxTokens::CompletionDefault => crate::limits::DEFAULT_COMPLETION_MAX_TOKENS,
            MaxTokens::ChatDefault => room.clamp(1, DEFAULT_CHAT_MAX_TOKENS_CAP),
        };
        for p in &prompts {
            check_prompt(target, p, max_tokens)?;
        }
        Ok(Self {
            n,
            max_tokens,
            params: fields.params(top_logprobs)?,
            stops: fields.stops()?,
            stop_token_ids: fields.stop_token_ids(limits)?,
            ignore_eos: fields.ignore_eos,
            prompt_logprobs,
            prompts,
        })
    }

    /// One engine request per prompt and choice (seeded choices get consecutive seeds), each
    /// with its output processing.
    pub fn jobs(
        &self,
        target: &Resolved,
        mut output: impl FnMut() -> OutputSpec,
    ) -> Vec<(GenRequest, OutputSpec)> {
        let mut jobs = Vec::with_capacity(self.prompts.len() * self.n);
        for prompt in &self.prompts {
            for i in 0..self.n {
                let mut sampling = self.params.clone();
                sampling.seed = self.params.seed.map(|s| s.wrapping_add(i as u64));
                let req = GenRequest {
                    plan: target.plan.clone(),
                    overlay: target.overlay.clone(),
                    lora: target.lora.clone(),
                    prompt: prompt.clone(),
                    max_tokens: self.max_tokens,
                    sampling,
                    prompt_logprobs: self.prompt_logprobs,
                    stop_token_ids: self.stop_token_ids.clone(),
                    eos_token_ids: target.base.model.dir.eos_token_ids.clone(),
                    ignore_eos: self.ignore_eos,
                };
                let mut spec = output();
                spec.stops = self.stops.clone();
                jobs.push((req, spec));
            }
        }
        jobs
    }
}

/// A tokenized prompt against the context and the KV pool.
fn check_prompt(
    target: &Resolved,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<(), ValidationError> {
    let limits = &target.base.limits;
    if prompt.is_empty() {
        return Err(ValidationError::EmptyPrompt { param: "prompt" });
    }
    check_token_ids(limits, prompt, "prompt")?;
    let total = prompt.len().saturating_add(max_tokens);
    if total > limits.max_model_len {
        return Err(ValidationError::ContextTooLong {
            prompt: prompt.len(),
            max_tokens,
            max_model_len: limits.max_model_len,
        });
    }
    let capacity = limits.kv.max_tokens(target.plan.layers().len());
    if total > capacity {
        return Err(ValidationError::KvTooSmall {
            tokens: total,
            capacity,
        });
    }
    Ok(())
}

/// Chat roles the templates know.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Checks chat messages' roles (their contents were flattened to text by the caller).
pub fn check_messages(messages: &[ChatMessage]) -> Result<(), ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::NoMessages);
    }
    match messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        Some((index, m)) => Err(ValidationError::BadRole {
            index,
            role: m.role.chars().take(64).collect(),
        }),
        None => Ok(()),
    }
}
