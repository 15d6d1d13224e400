//! `POST /v1/fine_tuning/jobs` bodies: OpenAI's fields (`model`, `training_file`,
//! `validation_file`, `suffix`, `seed`, `method.supervised.hyperparameters` or the older top-level
//! `hyperparameters`, `"auto"` allowed) plus the extension object `pruneserve` (LoRA r, alpha,
//! dropout, target modules, 4-bit base, sequence length, warmup, a step cap). Every limit a request
//! is held to is here; defaults are the paper's.

use serde::Deserialize;
use serde_json::{json, Value};

use super::jobs::{Extension, Hyperparameters};
use super::FinetuneError;
use crate::engine::adapters::peft::PROJECTION_NAMES;

/// The paper's recipe: LoRA r 64, alpha 16, dropout 0.05, lr 2e-4, 50 warmup steps, batch 4 × 2.
pub const DEFAULT_LORA_R: usize = 64;
pub const DEFAULT_LORA_ALPHA: f64 = 16.0;
pub const DEFAULT_LORA_DROPOUT: f64 = 0.05;
pub const BASE_LEARNING_RATE: f64 = 2e-4;
pub const DEFAULT_WARMUP_STEPS: u32 = 50;
pub const DEFAULT_BATCH_SIZE: u32 = 8;
pub const DEFAULT_MAX_SEQ_LEN: usize = 8192;
pub const MAX_EPOCHS: u32 = 50;
pub const MAX_BATCH_SIZE: u32 = 256;
pub const MAX_LR_MULTIPLIER: f64 = 100.0;
pub const MAX_SEQ_LEN: usize = 131_072;
pub const MAX_SUFFIX_CHARS: usize = 40;

/// A number or `"auto"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Value(T),
    Auto(AutoWord),
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub enum AutoWord {
    #[serde(rename = "auto")]
    Auto,
}

impl<T: Copy> AutoOr<T> {
    fn or(x: Option<Self>, default: T) -> T {
        match x {
            Some(AutoOr::Value(v)) => v,
            _ => default,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HyperRequest {
    n_epochs: Option<AutoOr<u32>>,
    batch_size: Option<AutoOr<u32>>,
    learning_rate_multiplier: Option<AutoOr<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Supervised {
    hyperparameters: Option<HyperRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Method {
    #[serde(rename = "type")]
    kind: String,
    supervised: Option<Supervised>,
    dpo: Option<Value>,
    reinforcement: Option<Value>,
}

/// The extension object; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionRequest {
    lora_r: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    target_modules: Option<Vec<String>>,
    load_in_4bit: Option<Value>,
    max_seq_len: Option<usize>,
    warmup_steps: Option<u32>,
    max_steps: Option<u32>,
    trainer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    hyperparameters: Option<HyperRequest>,
    method: Option<Method>,
    integrations: Option<Vec<Value>>,
    pub metadata: Option<Value>,
    pruneserve: Option<ExtensionRequest>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> FinetuneError {
    FinetuneError::Invalid {
        param,
        message: message.into(),
    }
}

/// What a request resolves to, before the job exists.
pub struct Settings {
    pub hyperparameters: Hyperparameters,
    pub method: Value,
    pub extension: Extension,
    pub suffix: Option<String>,
}

impl CreateJob {
    /// Checks every field; `max_rank` is the serving base's `--max-lora-rank`.
    pub fn settings(
        &self,
        base: &str,
        plan_layers: Vec<usize>,
        max_rank: usize,
    ) -> Result<Settings, FinetuneError> {
        if self.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(invalid("integrations", "integrations are not supported"));
        }
        let hyper = self.hyperparameters()?;
        let n_epochs = AutoOr::or(hyper.n_epochs, 1);
        let batch_size = AutoOr::or(hyper.batch_size, DEFAULT_BATCH_SIZE);
        let lr_mult = AutoOr::or(hyper.learning_rate_multiplier, 1.0);
        if !(1..=MAX_EPOCHS).contains(&n_epochs) {
            return Err(invalid(
                "n_epochs",
                format!("n_epochs is 1 to {MAX_EPOCHS}"),
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(invalid(
                "batch_size",
                format!("batch_size is 1 to {MAX_BATCH_SIZE}"),
            ));
        }
        if !(lr_mult > 0.0 && lr_mult <= MAX_LR_MULTIPLIER) {
            return Err(invalid(
                "learning_rate_multiplier",
                format!("learning_rate_multiplier is above 0 and at most {MAX_LR_MULTIPLIER}"),
            ));
        }
        let hyperparameters = Hyperparameters {
            n_epochs,
            batch_size,
            learning_rate_multiplier: lr_mult,
        };
        let extension = extension(
            self.pruneserve.as_ref(),
            base,
            plan_layers,
            max_rank,
            BASE_LEARNING_RATE * lr_mult,
        )?;
        Ok(Settings {
            method: json!({"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}),
            hyperparameters,
            extension,
            suffix: self.checked_suffix()?,
        })
    }

    fn hyperparameters(&self) -> Result<&HyperRequest, FinetuneError> {
        static NONE: HyperRequest = HyperRequest {
            n_epochs: None,
            batch_size: None,
            learning_rate_multiplier: None,
        };
        let from_method = match &self.method {
            None => None,
            Some(m) if m.kind != "supervised" || m.dpo.is_some() || m.reinforcement.is_some() => {
                return Err(invalid(
                    "method",
                    format!("method `{}` is not supported; use `supervised`", m.kind),
                ))
            }
            Some(m) => m
                .supervised
                .as_ref()
                .and_then(|s| s.hyperparameters.as_ref()),
        };
        match (from_method, &self.hyperparameters) {
            (Some(_), Some(_)) => Err(invalid(
                "hyperparameters",
                "give hyperparameters in `method.supervised` or at the top level, not both",
            )),
            (Some(h), None) | (None, Some(h)) => Ok(h),
            (None, None) => Ok(&NONE),
        }
    }

    fn checked_suffix(&self) -> Result<Option<String>, FinetuneError> {
        let Some(s) = &self.suffix else {
            return Ok(None);
        };
        let ok = !s.is_empty()
            && s.chars().count() <= MAX_SUFFIX_CHARS
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            return Err(invalid(
                "suffix",
                format!("suffix is 1 to {MAX_SUFFIX_CHARS} of letters, digits, '.', '_', '-'"),
            ));
        }
        Ok(Some(s.clone()))
    }
}

fn extension(
    req: Option<&ExtensionRequest>,
    base: &str,
    plan_layers: Vec<usize>,
    max_rank: usize,
    learning_rate: f64,
) -> Result<Extension, FinetuneError> {
    let empty = ExtensionRequest::default();
    let r = req.unwrap_or(&empty);
    let lora_r = r.lora_r.unwrap_or(DEFAULT_LORA_R.min(max_rank));
    if lora_r == 0 || lora_r > max_rank {
        return Err(invalid(
            "pruneserve.lora_r",
            format!("lora_r is 1 to {max_rank} (the server's --max-lora-rank)"),
        ));
    }
    let lora_alpha = r.lora_alpha.unwrap_or(DEFAULT_LORA_ALPHA);
    if !(lora_alpha.is_finite() && lora_alpha > 0.0) {
        return Err(invalid(
            "pruneserve.lora_alpha",
            "lora_alpha is a positive number",
        ));
    }
    let lora_dropout = r.lora_dropout.unwrap_or(DEFAULT_LORA_DROPOUT);
    if !(0.0..1.0).contains(&lora_dropout) {
        return Err(invalid(
            "pruneserve.lora_dropout",
            "lora_dropout is in [0, 1)",
        ));
    }
    let target_modules = match &r.target_modules {
        None => PROJECTION_NAMES.iter().map(|s| s.to_string()).collect(),
        Some(t) if t.is_empty() => {
            return Err(invalid(
                "pruneserve.target_modules",
                "name at least one module",
            ))
        }
        Some(t) => {
            if let Some(bad) = t.iter().find(|m| !PROJECTION_NAMES.contains(&m.as_str())) {
                return Err(invalid(
                    "pruneserve.target_modules",
                    format!("`{bad}` is not one of {}", PROJECTION_NAMES.join(", ")),
                ));
            }
            t.clone()
        }
    };
    let load_in_4bit = r.load_in_4bit.clone().unwrap_or(json!("auto"));
    if !(load_in_4bit.is_boolean() || load_in_4bit == "auto") {
        return Err(invalid(
            "pruneserve.load_in_4bit",
            "load_in_4bit is true, false or \"auto\"",
        ));
    }
    let max_seq_len = r.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN);
    if !(16..=MAX_SEQ_LEN).contains(&max_seq_len) {
        return Err(invalid(
            "pruneserve.max_seq_len",
            format!("max_seq_len is 16 to {MAX_SEQ_LEN}"),
        ));
    }
    let trainer = r.trainer.clone().unwrap_or_else(|| "auto".into());
    if !["auto", "trl", "transformers"].contains(&trainer.as_str()) {
        return Err(invalid(
            "pruneserve.trainer",
            "trainer is \"auto\", \"trl\" or \"transformers\"",
        ));
    }
    if r.max_steps == Some(0) {
        return Err(invalid("pruneserve.max_steps", "max_steps is at least 1"));
    }
    Ok(Extension {
        base: base.to_string(),
        plan_layers,
        lora_r,
        lora_alpha,
        lora_dropout,
        target_modules,
        load_in_4bit,
        max_seq_len,
        warmup_steps: r.warmup_steps.unwrap_or(DEFAULT_WARMUP_STEPS),
        max_steps: r.max_steps,
        learning_rate,
        trainer,
        training_checkpoint: None,
        adapter_dir: None,
        train_tokens_per_second: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(body: Value) -> Result<Settings, FinetuneError> {
        let req: CreateJob = serde_json::from_value(body).map_err(|e| FinetuneError::Invalid {
            param: "body",
            message: e.to_string(),
        })?;
        req.settings("b", vec![0, 1], 64)
    }

    #[test]
    fn defaults_are_the_papers_and_auto_means_default() {
        let s = settings(json!({"model": "m", "training_file": "file-a",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "auto", "batch_size": 4}}}}))
        .unwrap();
        assert_eq!(s.hyperparameters.n_epochs, 1);
        assert_eq!(s.hyperparameters.batch_size, 4);
        assert_eq!(s.extension.lora_r, 64);
        assert_eq!(s.extension.lora_alpha, 16.0);
        assert_eq!(s.extension.target_modules.len(), 7);
        assert!((s.extension.learning_rate - 2e-4).abs() < 1e-12);
        let s = settings(json!({"model": "m", "training_file": "f", "hyperparameters": {"learning_rate_multiplier": 0.5}})).unwrap();
        assert!((s.extension.learning_rate - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (json!({"hyperparameters": {"n_epochs": 0}}), "n_epochs"),
            (
                json!({"hyperparameters": {"batch_size": 1000}}),
                "batch_size",
            ),
            (
                json!({"hyperparameters": {"learning_rate_multiplier": -1.0}}),
                "learning_rate_multiplier",
            ),
            (json!({"method": {"type": "dpo"}}), "method"),
            (json!({"suffix": "a b"}), "suffix"),
            (json!({"pruneserve": {"lora_r": 65}}), "pruneserve.lora_r"),
            (
                json!({"pruneserve": {"target_modules": ["lm_head"]}}),
                "pruneserve.target_modules",
            ),
            (
                json!({"pruneserve": {"load_in_4bit": "yes"}}),
                "pruneserve.load_in_4bit",
            ),
            (
                json!({"pruneserve": {"max_steps": 0}}),
                "pruneserve.max_steps",
            ),
            (json!({"integrations": [{"type": "wandb"}]}), "integrations"),
        ];
        for (extra, param) in cases {
            let mut body = json!({"model": "m", "training_file": "f"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            match settings(body) {
                Err(FinetuneError::Invalid { param: p, .. }) => assert_eq!(p, param),
                other => panic!("{param}: {:?}", other.err()),
            }
        }
    }
}
