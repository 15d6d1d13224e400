//! The output step, on its own thread beside the engine loop (as vLLM v1 keeps detokenizing out of
//! the engine core): each request's tokens become text incrementally, stop strings end requests
//! (and cancel their sequences in the engine), per-request metrics are observed, and clients that
//! went away are cancelled. The HTTP layer only formats what arrives here.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use tokio::sync::mpsc as tmpsc;

use super::detokenize::IncrementalText;
use super::Command;
use crate::engine::batch::{BatchEvent, FinishReason, GenOutput};
use crate::engine::sample::sampler::Sampled;
use crate::engine::sample::scoring::TokenScore;
use crate::engine::{EngineError, SeqId};
use crate::metrics::RequestObserver;

/// What a request's stream yields.
#[derive(Debug)]
pub enum OutputEvent {
    /// Text that is now final, and the tokens that produced it (some tokens may come with empty
    /// text while it is held back).
    Delta {
        text: String,
        tokens: Vec<Sampled>,
    },
    /// The end: why, and the prompt's logprobs when they were asked for.
    Done {
        finish: FinishReason,
        prompt_scores: Vec<TokenScore>,
    },
    Failed(EngineError),
}

/// How a request's output is processed.
#[derive(Default)]
pub struct OutputSpec {
    /// Stop strings (non-empty): the text ends before the first one, which ends the request.
    pub stops: Vec<String>,
    pub observer: Option<RequestObserver>,
}

/// What the engine loop tells the output thread, in order.
pub(super) enum OutputMsg {
    Register {
        id: SeqId,
        output: OutputSpec,
        events: tmpsc::UnboundedSender<OutputEvent>,
    },
    Reject {
        events: tmpsc::UnboundedSender<OutputEvent>,
        error: EngineError,
    },
    Events(Vec<BatchEvent>),
    Fail {
        ids: Vec<SeqId>,
        error: EngineError,
    },
}

struct RequestOutput {
    events: tmpsc::UnboundedSender<OutputEvent>,
    text: IncrementalText,
    observer: Option<RequestObserver>,
    /// Tokens whose text has not been released yet.
    unsent: Vec<Sampled>,
    generated: usize,
    prompt_scores: Vec<TokenScore>,
}

impl RequestOutput {
    /// Feeds one token; true when a stop string ended the request.
    fn token(&mut self, token: Sampled) -> bool {
        if let Some(o) = self.observer.as_mut() {
            o.token();
        }
        self.generated += 1;
        let step = self.text.push(token.token);
        self.unsent.push(token);
        if !step.delta.is_empty() || step.stopped {
            let tokens = std::mem::take(&mut self.unsent);
            let _ = self.events.send(OutputEvent::Delta {
                text: step.delta,
                tokens,
            });
        }
        if step.stopped {
            self.done(FinishReason::Stop);
        }
        step.stopped
    }

    /// The engine finished the sequence (eos, stop id or length).
    fn finished(&mut self, output: GenOutput) {
        let rest = self.text.finish();
        if !rest.is_empty() || !self.unsent.is_empty() {
            let _ = self.events.send(OutputEvent::Delta {
                text: rest,
                tokens: std::mem::take(&mut self.unsent),
            });
        }
        if self.prompt_scores.is_empty() {
            self.prompt_scores = output.prompt_scores;
        }
        self.done(output.finish);
    }

    fn done(&mut self, finish: FinishReason) {
        if let Some(o) = &self.observer {
            o.finished(self.generated, finish.as_str());
        }
        let _ = self.events.send(OutputEvent::Done {
            finish,
            prompt_scores: std::mem::take(&mut self.prompt_scores),
        });
    }
}

struct OutputLoop {
    tokenizer: Arc<tokenizers::Tokenizer>,
    requests: HashMap<SeqId, RequestOutput>,
    cancel: Sender<Command>,
}

impl OutputLoop {
    fn handle(&mut self, msg: OutputMsg) {
        match msg {
            OutputMsg::Register { id, output, events } => {
                let text = IncrementalText::new(self.tokenizer.clone(), output.stops);
                self.requests.insert(
                    id,
                    RequestOutput {
                        events,
                        text,
                        observer: output.observer,
                        unsent: Vec::new(),
                        generated: 0,
                        prompt_scores: Vec::new(),
                    },
                );
            }
            OutputMsg::Reject { events, error } => {
                let _ = events.send(OutputEvent::Failed(error));
            }
            OutputMsg::Events(events) => {
                for event in events {
                    self.event(event);
                }
            }
            OutputMsg::Fail { ids, error } => {
                for id in ids {
                    if let Some(r) = self.requests.remove(&id) {
                        let _ = r.events.send(OutputEvent::Failed(error.clone()));
                    }
                }
            }
        }
    }

    fn event(&mut self, event: BatchEvent) {
        match event {
            BatchEvent::PromptScored { id, scores } => {
                if let Some(r) = self.requests.get_mut(&id) {
                    r.prompt_scores = scores;
                }
            }
            BatchEvent::Token { id, token } => {
                let stopped = self.requests.get_mut(&id).is_some_and(|r| r.token(token));
                if stopped {
                    self.requests.remove(&id);
                    let _ = self.cancel.send(Command::Cancel(id));
                }
            }
            BatchEvent::Finished { id, output } => {
                if let Some(mut r) = self.requests.remove(&id) {
                    r.finished(output);
                }
            }
            BatchEvent::Failed { id, error } => {
                if let Some(r) = self.requests.remove(&id) {
                    let _ = r.events.send(OutputEvent::Failed(error));
                }
            }
        }
    }

    /// Cancels the sequences of clients that went away.
    fn drop_gone(&mut self) {
        let gone: Vec<SeqId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.requests.remove(&id);
            let _ = self.cancel.send(Command::Cancel(id));
        }
    }

    /// After a panic here: fail and cancel everything this thread was carrying.
    fn fail_all(&mut self, message: String) {
        tracing::error!(error = %message, "the output step panicked; failing its requests");
        for (id, r) in self.requests.drain() {
            let _ = r
                .events
                .send(OutputEvent::Failed(EngineError::Crashed(message.clone())));
            let _ = self.cancel.send(Command::Cancel(id));
        }
    }
}

pub(super) fn run(
    rx: Receiver<OutputMsg>,
    cancel: Sender<Command>,
    tokenizer: Arc<tokenizers::Tokenizer>,
) {
    let mut state = OutputLoop {
        tokenizer,
        requests: HashMap::new(),
        cancel,
    };
    while let Ok(msg) = rx.recv() {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| {
            state.handle(msg);
            state.drop_gone();
        })) {
            state.fail_all(super::engine_loop::panic_message(p.as_ref()));
        }
    }
}
