//! Where SGR prompts come from: rows of a local JSONL / JSON / parquet file or of a hub dataset
//! (`hub:org/name[:config[:split]]`, through [`crate::hub_data`]: its cache and
//! `HF_HUB_OFFLINE` honoured), in one of three shapes, detected or named:
//! - ShareGPT: `conversations: [{from, value}]` (`from` `human`/`user` for the user);
//! - OpenAI: `messages: [{role, content}]` (content a string or text parts);
//! - Alpaca: `instruction` (+ `input`, appended after a blank line when not empty).
//!
//! The rule for multi-turn rows: a conversation contributes its **first user turn** only. Rows
//! without a usable user turn are counted by reason and skipped, never silently.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::SgrError;

/// The row shapes `pruneval sgr` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Sharegpt,
    Messages,
    Alpaca,
}

/// Why a row gave no prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The conversation has no user turn.
    NoUserTurn,
    /// The first user turn (or instruction) is empty or only whitespace.
    EmptyUserTurn,
    /// The row is not of the shape (missing or mistyped field).
    Malformed,
}

impl Skip {
    pub fn name(self) -> &'static str {
        match self {
            Skip::NoUserTurn => "no_user_turn",
            Skip::EmptyUserTurn => "empty_user_turn",
            Skip::Malformed => "malformed_row",
        }
    }
}

/// A prompt taken from a source row.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The row's index in the source, the record key with the sample index.
    pub row: usize,
    pub user: String,
}

/// Reads every row of `spec`: a `.jsonl`, `.json` (an array) or `.parquet` file, or
/// `hub:org/name[:config[:split]]` (default config `default`, split `train`).
pub fn read_rows(spec: &str) -> Result<Vec<Value>, SgrError> {
    if let Some(hub) = spec.strip_prefix("hub:") {
        let mut parts = hub.split(':');
        let repo = parts.next().unwrap_or_default();
        let config = parts.next().unwrap_or("default");
        let split = parts.next().unwrap_or("train");
        let files = crate::hub_data::fetch(repo, config, split).map_err(SgrError::Data)?;
        return crate::hub_data::read_rows(&files).map_err(SgrError::Data);
    }
    let path = PathBuf::from(spec);
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => {
            crate::hub_data::read_rows(std::slice::from_ref(&path)).map_err(SgrError::Data)
        }
        Some("json") => {
            let text = std::fs::read_to_string(&path).map_err(|e| SgrError::io(&path, e))?;
            match serde_json::from_str(&text) {
                Ok(Value::Array(rows)) => Ok(rows),
                Ok(_) => Err(SgrError::Input(format!(
                    "{}: a .json file holds an array of rows",
                    path.display()
                ))),
                Err(e) => Err(SgrError::Input(format!("{}: {e}", path.display()))),
            }
        }
        _ => read_jsonl(&path),
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<Value>, SgrError> {
    let file = std::fs::File::open(path).map_err(|e| SgrError::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| SgrError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line)
            .map_err(|e| SgrError::Input(format!("{} line {}: {e}", path.display(), i + 1)))?;
        rows.push(row);
    }
    Ok(rows)
}

/// The shape of the first row that has one of the three shapes' keys.
pub fn detect(rows: &[Value]) -> Option<Shape> {
    rows.iter().find_map(|r| {
        if r.get("conversations").is_some() {
            Some(Shape::Sharegpt)
        } else if r.get("messages").is_some() {
            Some(Shape::Messages)
        } else if r.get("instruction").is_some() {
            Some(Shape::Alpaca)
        } else {
            None
        }
    })
}

/// Text of a message content: a string, or the text parts of a list.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect(),
        ),
        _ => None,
    }
}

/// The first user turn of a row of `shape`.
pub fn user_turn(row: &Value, shape: Shape) -> Result<String, Skip> {
    let text = match shape {
        Shape::Sharegpt | Shape::Messages => {
            let (list, who, text) = match shape {
                Shape::Sharegpt => ("conversations", "from", "value"),
                _ => ("messages", "role", "content"),
            };
            let turns = row[list].as_array().ok_or(Skip::Malformed)?;
            let user = turns
                .iter()
                .find(|t| matches!(t[who].as_str(), Some("human" | "user")))
                .ok_or(Skip::NoUserTurn)?;
            content_text(&user[text]).ok_or(Skip::Malformed)?
        }
        Shape::Alpaca => {
            let instruction = row["instruction"].as_str().ok_or(Skip::Malformed)?;
            match row["input"].as_str().map(str::trim) {
                Some(input) if !input.is_empty() => format!("{instruction}\n\n{input}"),
                _ => instruction.to_string(),
            }
        }
    };
    if text.trim().is_empty() {
        return Err(Skip::EmptyUserTurn);
    }
    Ok(text)
}

/// The rows' prompts in the order of a `seed`ed shuffle, with the skipped rows counted by reason.
pub fn shuffled_prompts(
    rows: &[Value],
    shape: Shape,
    seed: u64,
) -> (Vec<Prompt>, BTreeMap<&'static str, usize>) {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut skipped = BTreeMap::new();
    let mut prompts = Vec::with_capacity(rows.len());
    for row in order {
        match user_turn(&rows[row], shape) {
            Ok(user) => prompts.push(Prompt { row, user }),
            Err(why) => *skipped.entry(why.name()).or_default() += 1,
        }
    }
    (prompts, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_shape_gives_its_first_user_turn() {
        let sharegpt = json!({"conversations": [{"from": "system", "value": "be brief"},
            {"from": "human", "value": "first"}, {"from": "gpt", "value": "a"},
            {"from": "human", "value": "second"}]});
        assert_eq!(user_turn(&sharegpt, Shape::Sharegpt).unwrap(), "first");
        let messages = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
            {"type": "image_url"}, {"type": "text", "text": "there"}]}, {"role": "assistant", "content": "x"}]});
        assert_eq!(user_turn(&messages, Shape::Messages).unwrap(), "hi there");
        let alpaca = json!({"instruction": "Sum", "input": "2 and 3", "output": "5"});
        assert_eq!(user_turn(&alpaca, Shape::Alpaca).unwrap(), "Sum\n\n2 and 3");
        let bare = json!({"instruction": "Say hi", "input": "  ", "output": "hi"});
        assert_eq!(user_turn(&bare, Shape::Alpaca).unwrap(), "Say hi");
        assert_eq!(detect(&[json!({"x": 1}), alpaca]), Some(Shape::Alpaca));
        assert_eq!(detect(&[json!({"x": 1})]), None);
    }

    #[test]
    fn unusable_rows_are_named() {
        let cases = [
            (
                json!({"conversations": [{"from": "gpt", "value": "a"}]}),
                Shape::Sharegpt,
                Skip::NoUserTurn,
            ),
            (
                json!({"messages": [{"role": "user", "content": "  \n"}]}),
                Shape::Messages,
                Skip::EmptyUserTurn,
            ),
            (
                json!({"messages": "not a list"}),
                Shape::Messages,
                Skip::Malformed,
            ),
            (json!({"instruction": 5}), Shape::Alpaca, Skip::Malformed),
            (
                json!({"messages": [{"role": "user", "content": 7}]}),
                Shape::Messages,
                Skip::Malformed,
            ),
        ];
        for (row, shape, why) in cases {
            assert_eq!(user_turn(&row, shape), Err(why), "{row}");
        }
    }

    #[test]
    fn the_shuffle_is_seeded_and_counts_skips() {
        let rows: Vec<Value> = (0..50)
            .map(|i| {
                if i % 10 == 0 {
                    json!({"messages": []})
                } else {
                    json!({"messages": [{"role": "user", "content": format!("q{i}")}]})
                }
            })
            .collect();
        let (a, skipped) = shuffled_prompts(&rows, Shape::Messages, 42);
        let (b, _) = shuffled_prompts(&rows, Shape::Messages, 42);
        let (c, _) = shuffled_prompts(&rows, Shape::Messages, 7);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 45);
        assert_eq!(skipped.get("no_user_turn"), Some(&5));
        assert!(a.iter().all(|p| p.user == format!("q{}", p.row)));
        assert_ne!(
            a.iter().map(|p| p.row).collect::<Vec<_>>(),
            (0..50).filter(|i| i % 10 != 0).collect::<Vec<_>>()
        );
    }
}
