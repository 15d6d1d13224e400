//! Calibration text for layer importance: the paper's default (the first 100 GSM8K test items,
//! written as lm-eval's Llama-style chain-of-thought text, embedded so that it works offline) or
//! the user's own file, and its tokenization with BOS added.
//!
//! Contract: every prompt is non-empty text; a file's bad line is named by its number.

use std::path::Path;

use serde::Deserialize;

/// The name of the built-in calibration set.
pub const GSM8K_COT: &str = "gsm8k-cot";

/// The first 100 rows of GSM8K's test split (openai/grade-school-math, MIT), as published.
const GSM8K_TEST_FIRST_100: &str = include_str!("gsm8k_test_first100.jsonl");

/// Items in the built-in set.
pub const GSM8K_COT_ITEMS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read the calibration file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("calibration file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("calibration prompt {index} is empty")]
    Empty { index: usize },
    #[error("the calibration set has no prompts")]
    NoPrompts,
    #[error("{GSM8K_COT} has {GSM8K_COT_ITEMS} items; {asked} were asked for")]
    TooManyItems { asked: usize },
    #[error("tokenizing calibration prompt {index}: {error}")]
    Tokenize {
        index: usize,
        error: crate::loaded::TokenizeError,
    },
}

/// A line of a calibration file: a text, or a GSM8K-shaped item.
#[derive(Deserialize)]
#[serde(untagged)]
enum CalibrationRow {
    Text { text: String },
    Gsm8k { question: String, answer: String },
}

/// lm-eval's `gsm8k_cot_llama` instruction around a question.
fn llama_cot_instruction(question: &str) -> String {
    format!(
        "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\nYour response should end with \"The final answer is [answer]\" where [answer] is the response to the problem.\n"
    )
}

/// A GSM8K item as chain-of-thought text: the instruction with the question, the rationale (the
/// dataset's calculator annotations `<<…>>` removed) and "The final answer is N".
pub fn gsm8k_cot_text(question: &str, answer: &str) -> String {
    let (rationale, number) = answer.rsplit_once("####").unwrap_or((answer, ""));
    let mut clean = String::with_capacity(rationale.len());
    let mut rest = rationale.trim();
    while let Some(open) = rest.find("<<") {
        clean.push_str(&rest[..open]);
        match rest[open..].find(">>") {
            Some(close) => rest = &rest[open + close + 2..],
            None => {
                rest = &rest[open..];
                break;
            }
        }
    }
    clean.push_str(rest);
    format!(
        "{}{}\nThe final answer is {}",
        llama_cot_instruction(question),
        clean,
        number.trim().replace(',', "")
    )
}

fn parse_rows(text: &str) -> Result<Vec<String>, CalibrationError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: CalibrationRow =
            serde_json::from_str(line).map_err(|e| CalibrationError::Line {
                line: i + 1,
                reason: format!("expected {{\"text\"}} or {{\"question\", \"answer\"}}: {e}"),
            })?;
        out.push(match row {
            CalibrationRow::Text { text } => text,
            CalibrationRow::Gsm8k { question, answer } => gsm8k_cot_text(&question, &answer),
        });
    }
    check_texts(&out)?;
    Ok(out)
}

/// Refuses an empty set or an empty prompt.
pub fn check_texts(texts: &[String]) -> Result<(), CalibrationError> {
    if texts.is_empty() {
        return Err(CalibrationError::NoPrompts);
    }
    match texts.iter().position(|t| t.is_empty()) {
        Some(index) => Err(CalibrationError::Empty { index }),
        None => Ok(()),
    }
}

/// The first `items` (at most 100) prompts of the built-in set.
pub fn gsm8k_cot(items: usize) -> Result<Vec<String>, CalibrationError> {
    if items > GSM8K_COT_ITEMS {
        return Err(CalibrationError::TooManyItems { asked: items });
    }
    let mut texts = parse_rows(GSM8K_TEST_FIRST_100)?;
    texts.truncate(items);
    check_texts(&texts)?;
    Ok(texts)
}

/// `gsm8k-cot`, or a JSONL file of `{"text"}` or `{"question", "answer"}` (GSM8K) rows.
pub fn load(source: &str) -> Result<Vec<String>, CalibrationError> {
    if source == GSM8K_COT {
        return gsm8k_cot(GSM8K_COT_ITEMS);
    }
    let text =
        std::fs::read_to_string(Path::new(source)).map_err(|error| CalibrationError::Read {
            path: source.to_string(),
            error,
        })?;
    parse_rows(&text)
}

/// Puts `bos` first unless the tokenizer already did.
pub fn with_bos(ids: &mut Vec<u32>, bos: Option<u32>) {
    if let Some(b) = bos {
        if ids.first() != Some(&b) {
            ids.insert(0, b);
        }
    }
}

/// Token ids of each text with the model's BOS first (added when the tokenizer does not add it).
pub fn tokenize(
    texts: &[String],
    bos: Option<u32>,
    encode: impl Fn(&str) -> Result<Vec<u32>, crate::loaded::TokenizeError>,
) -> Result<Vec<Vec<u32>>, CalibrationError> {
    texts
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let mut ids = encode(t).map_err(|error| CalibrationError::Tokenize { index, error })?;
            with_bos(&mut ids, bos);
            Ok(ids)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_items_read_as_chain_of_thought() {
        let texts = gsm8k_cot(100).unwrap();
        assert_eq!(texts.len(), 100);
        let first = &texts[0];
        assert!(first.starts_with("Given the following problem, reason and give a final answer to the problem.\nProblem: Janet\u{2019}s ducks lay 16 eggs"), "{first}");
        assert!(
            first.contains("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"),
            "{first}"
        );
        assert!(
            first.ends_with("every day at the farmer\u{2019}s market.\nThe final answer is 18"),
            "{first}"
        );
        assert!(texts
            .iter()
            .all(|t| !t.contains("<<") && !t.contains("####")));
    }

    #[test]
    fn thousands_separators_leave_the_answer() {
        let t = gsm8k_cot_text("Q?", "It is 1000+234=<<1000+234=1234>>1,234\n#### 1,234");
        assert!(
            t.ends_with("It is 1000+234=1,234\nThe final answer is 1234"),
            "{t}"
        );
    }

    #[test]
    fn files_take_texts_and_gsm8k_rows_and_name_bad_lines() {
        let rows = "{\"text\": \"a b c\"}\n\n{\"question\": \"q\", \"answer\": \"r\\n#### 5\"}\n";
        let texts = parse_rows(rows).unwrap();
        assert_eq!(texts[0], "a b c");
        assert!(texts[1].ends_with("Problem: q\nYour response should end with \"The final answer is [answer]\" where [answer] is the response to the problem.\nr\nThe final answer is 5"));
        let err = parse_rows("{\"text\": \"a\"}\n{\"prompt\": 1}\n").unwrap_err();
        assert!(
            err.to_string().starts_with("calibration file line 2:"),
            "{err}"
        );
        assert!(matches!(
            parse_rows("{\"text\": \"\"}"),
            Err(CalibrationError::Empty { index: 0 })
        ));
        assert!(matches!(parse_rows("\n"), Err(CalibrationError::NoPrompts)));
    }

    #[test]
    fn bos_is_added_once() {
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect());
        let ids = tokenize(&["ab".into()], Some(7), enc).unwrap();
        assert_eq!(ids, vec![vec![7, 97, 98]]);
        let with_bos = |t: &str| Ok([7].into_iter().chain(t.bytes().map(u32::from)).collect());
        assert_eq!(
            tokenize(&["a".into()], Some(7), with_bos).unwrap(),
            vec![vec![7, 97]]
        );
    }
}
