//! The limits of a layer-importance request: its calibration set (the built-in one or the
//! request's texts) against [`MAX_CALIBRATION_PROMPTS`], [`MAX_CALIBRATION_TOKENS`] and the
//! context, and the drop count against the plan.

use serde::Deserialize;

use super::{invalid, ValidationError, Validator};
use crate::importance::calibration::{self, GSM8K_COT, GSM8K_COT_ITEMS};
use crate::importance::default_drop;
use crate::limits::{MAX_CALIBRATION_PROMPTS, MAX_CALIBRATION_TOKENS};
use crate::registry::Resolved;

/// `"gsm8k-cot"` or the texts themselves.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CalibrationField {
    Named(String),
    Texts(Vec<String>),
}

/// A checked request: token ids with BOS first, and the drop count.
pub struct ImportanceInput {
    pub source: String,
    pub prompts: Vec<Vec<u32>>,
    pub drop: usize,
}

fn calibration_texts(
    field: Option<CalibrationField>,
    max_prompts: Option<usize>,
) -> Result<(String, Vec<String>), ValidationError> {
    let (source, mut texts) = match field {
        None => (GSM8K_COT.to_string(), Vec::new()),
        Some(CalibrationField::Named(name)) if name == GSM8K_COT => (name, Vec::new()),
        Some(CalibrationField::Named(_)) => {
            return Err(invalid(
                "calibration",
                format!("\"{GSM8K_COT}\" or an array of texts"),
            ))
        }
        Some(CalibrationField::Texts(texts)) => ("texts".to_string(), texts),
    };
    if source == GSM8K_COT {
        let items = max_prompts.unwrap_or(GSM8K_COT_ITEMS);
        if items == 0 || items > GSM8K_COT_ITEMS {
            return Err(invalid(
                "max_prompts",
                format!("1 to {GSM8K_COT_ITEMS} for {GSM8K_COT}"),
            ));
        }
        texts = calibration::gsm8k_cot(items)
            .map_err(|e| invalid("calibration", format!("usable: {e}")))?;
    } else if let Some(n) = max_prompts {
        texts.truncate(n);
    }
    if texts.len() > MAX_CALIBRATION_PROMPTS {
        return Err(invalid(
            "calibration",
            format!(
                "at most {MAX_CALIBRATION_PROMPTS} texts, not {}",
                texts.len()
            ),
        ));
    }
    if let Err(e) = calibration::check_texts(&texts) {
        return Err(invalid("calibration", format!("non-empty texts ({e})")));
    }
    Ok((source, texts))
}

/// Checks and tokenizes a layer-importance request for `target`.
pub async fn check_importance(
    validator: &Validator,
    target: &Resolved,
    field: Option<CalibrationField>,
    max_prompts: Option<usize>,
    drop: Option<usize>,
) -> Result<ImportanceInput, ValidationError> {
    let plan_len = target.plan.layers().len();
    let drop = drop.unwrap_or(default_drop(plan_len));
    if plan_len < 2 || drop == 0 || drop >= plan_len {
        return Err(invalid(
            "drop",
            format!(
                "between 1 and {} (the plan runs {plan_len} layers)",
                plan_len.saturating_sub(1)
            ),
        ));
    }
    let (source, texts) = calibration_texts(field, max_prompts)?;
    let base = &target.base;
    let ids = validator.encode(base, texts, true, "calibration").await?;
    let bos = base.model.model.config().bos_token_id;
    let max = base.limits.max_model_len;
    let mut prompts = Vec::with_capacity(ids.len());
    let mut total = 0usize;
    for mut p in ids {
        calibration::with_bos(&mut p, bos);
        if p.len() > max {
            return Err(ValidationError::TooManyTokens {
                param: "calibration",
                given: p.len(),
                max,
            });
        }
        total += p.len();
        prompts.push(p);
    }
    if total > MAX_CALIBRATION_TOKENS {
        return Err(invalid(
            "calibration",
            format!("at most {MAX_CALIBRATION_TOKENS} tokens in all, not {total}"),
        ));
    }
    Ok(ImportanceInput {
        source,
        prompts,
        drop,
    })
}
