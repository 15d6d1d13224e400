//! The CPU-heavy part of accepting a request: chat templating, tokenizing and detokenizing on a
//! bounded blocking pool, after refusing texts that are certainly too long by their byte length.

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{check_messages, check_token_ids, ValidationError};
use crate::chat_template::ChatMessage;
use crate::limits::Limits;
use crate::registry::Base;

/// A text of `bytes` bytes against the context, by its length alone (see
/// [`Limits::min_tokens_of_text`]).
fn check_bytes(limits: &Limits, bytes: usize, param: &'static str) -> Result<(), ValidationError> {
    let min_tokens = limits.min_tokens_of_text(bytes);
    if min_tokens > limits.max_model_len {
        return Err(ValidationError::TextTooLong {
            param,
            bytes,
            min_tokens,
            max_token_bytes: limits.max_token_bytes,
            max_model_len: limits.max_model_len,
        });
    }
    Ok(())
}

/// Texts at least this long hand the tokenizer's freed memory back to the OS when done.
const LARGE_TEXT_BYTES: usize = 256 << 10;

/// Gives freed heap pages back to the OS: tokenizing a long text allocates per token (strings,
/// offsets) and glibc would otherwise keep those pages in its arenas for good.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs tokenizer work on tokio's blocking threads, at most `workers` at once; requests beyond
/// that wait (asynchronously) for a permit.
pub struct Validator {
    permits: Arc<Semaphore>,
}

impl Validator {
    pub fn new(workers: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(workers.max(1))),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ValidationError> + Send + 'static,
    ) -> Result<T, ValidationError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ValidationError::TokenizerPanicked)?;
        // The permit moves into the work, so a client that goes away does not free it early.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|_| ValidationError::TokenizerPanicked)?
    }

    /// Tokenizes texts (a prompt or a batch of them), refusing any that is certainly longer
    /// than the context before tokenizing anything.
    pub async fn encode(
        &self,
        base: &Arc<Base>,
        texts: Vec<String>,
        add_special_tokens: bool,
        param: &'static str,
    ) -> Result<Vec<Vec<u32>>, ValidationError> {
        for t in &texts {
            check_bytes(&base.limits, t.len(), param)?;
        }
        let base = base.clone();
        self.blocking(move || {
            let ids = texts
                .iter()
                .map(|t| Ok(base.model.encode(t, add_special_tokens)?))
                .collect();
            if texts.iter().map(String::len).sum::<usize>() >= LARGE_TEXT_BYTES {
                release_freed_memory();
            }
            ids
        })
        .await
    }

    /// Renders a conversation with the model's chat template and tokenizes it (no extra special
    /// tokens: the template has them).
    pub async fn encode_chat(
        &self,
        base: &Arc<Base>,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ValidationError> {
        check_messages(&messages)?;
        let content: usize = messages.iter().map(|m| m.content.len()).sum();
        check_bytes(&base.limits, content, "messages")?;
        let base = base.clone();
        self.blocking(move || {
            let template = base
                .model
                .chat_template
                .as_ref()
                .ok_or(ValidationError::NoChatTemplate)?;
            let text = template.render(&messages, add_generation_prompt)?;
            check_bytes(&base.limits, text.len(), "messages")?;
            let ids = base.model.encode(&text, false)?;
            if text.len() >= LARGE_TEXT_BYTES {
                release_freed_memory();
            }
            Ok(ids)
        })
        .await
    }

    /// Decodes ids (at most `max_model_len` of them) to text.
    pub async fn decode(&self, base: &Arc<Base>, ids: Vec<u32>) -> Result<String, ValidationError> {
        let limits = &base.limits;
        if ids.len() > limits.max_model_len {
            return Err(ValidationError::TooManyTokens {
                param: "tokens",
                given: ids.len(),
                max: limits.max_model_len,
            });
        }
        check_token_ids(limits, &ids, "tokens")?;
        let base = base.clone();
        self.blocking(move || Ok(base.model.decode(&ids))).await
    }
}
