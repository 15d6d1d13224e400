//! Generative tasks in their published formats: GSM8K (lm-eval's 8-shot `gsm8k_cot`, and a chat
//! variant with the same shots as turns), HumanEval / HumanEval+ and MBPP / MBPP+ (programs run
//! in the sandbox), and XSUM (ROUGE-L F1). Prompts, stop sequences and answer extraction follow
//! lm-evaluation-harness and the original benchmark code.

use std::io::Read;
use std::path::Path;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::tasks::{read_jsonl, TaskError};

/// How a generative item is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Completion(String),
    /// `(role, content)` turns for /v1/chat/completions.
    Chat(Vec<(String, String)>),
}

/// How a response is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// The reference number; strict and flexible extraction (GSM8K).
    Number(String),
    /// A Python program around the completion: `before + completion + after` must exit 0.
    Program { before: String, after: String },
    /// ROUGE-L F1 against a reference summary.
    Rouge(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenDoc {
    pub id: String,
    pub prompt: Prompt,
    pub stop: Vec<String>,
    pub max_tokens: usize,
    pub check: Check,
}

pub const GEN_TASKS: [&str; 9] = [
    "gsm8k",
    "gsm8k_train",
    "gsm8k_chat",
    "humaneval",
    "humanevalplus",
    "mbpp",
    "mbppplus",
    "xsum",
    "gsm8k_cot",
];

/// The eight chain-of-thought exemplars of lm-eval's `gsm8k_cot` (Wei et al., 2022).
const GSM8K_SHOTS: [(&str, &str); 8] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
];

#[derive(Deserialize)]
struct Gsm8kRow {
    question: String,
    answer: String,
}

/// The reference number after `####`, normalised as lm-eval does (commas and `$` removed).
pub fn gsm8k_target(answer: &str) -> String {
    let n = answer.rsplit("####").next().unwrap_or("").trim();
    normalize_number(n)
}

fn normalize_number(s: &str) -> String {
    s.replace([',', '$'], "")
        .trim()
        .trim_end_matches('.')
        .to_string()
}

/// lm-eval's `strict-match` (`The answer is N.` or `#### N`) and `flexible-extract` (the last
/// number in the response).
pub fn extract_numbers(response: &str) -> (Option<String>, Option<String>) {
    let strict = Regex::new(r"The answer is (\-?[0-9\.\,]+)|#### (\-?[0-9\.\,]+)")
        .ok()
        .and_then(|re| re.captures(response))
        .and_then(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| normalize_number(m.as_str()));
    let flexible = Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
        .ok()
        .and_then(|re| re.find_iter(response).last())
        .map(|m| normalize_number(m.as_str()));
    (strict, flexible)
}

/// Mean strict and flexible exact match of `responses` against `target`, and per response the
/// extracted answers as `strict | flexible` (`-` when none).
pub fn score_numbers(responses: &[String], target: &str) -> (f64, f64, Vec<String>) {
    let (mut strict, mut flexible) = (0.0, 0.0);
    let mut shown = Vec::with_capacity(responses.len());
    for r in responses {
        let (s, f) = extract_numbers(r);
        strict += f64::from(s.as_deref() == Some(target));
        flexible += f64::from(f.as_deref() == Some(target));
        shown.push(format!(
            "{} | {}",
            s.as_deref().unwrap_or("-"),
            f.as_deref().unwrap_or("-")
        ));
    }
    let n = responses.len().max(1) as f64;
    (strict / n, flexible / n, shown)
}

fn gsm8k(data_dir: &Path, split: &str, chat: bool) -> Result<Vec<GenDoc>, TaskError> {
    let rows: Vec<Gsm8kRow> = read_jsonl(&data_dir.join(format!("gsm8k/{split}.jsonl")))?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let prompt = if chat {
                let mut turns = Vec::new();
                for (q, a) in GSM8K_SHOTS {
                    turns.push(("user".to_string(), format!("Q: {q}")));
                    turns.push(("assistant".to_string(), format!("A: {a}")));
                }
                turns.push(("user".to_string(), format!("Q: {}", r.question)));
                Prompt::Chat(turns)
            } else {
                let mut text = String::new();
                for (q, a) in GSM8K_SHOTS {
                    text.push_str(&format!("Q: {q}\nA: {a}\n\n"));
                }
                text.push_str(&format!("Q: {}\nA:", r.question));
                Prompt::Completion(text)
            };
            GenDoc {
                id: match split {
                    "test" => format!("gsm8k/{i}"),
                    _ => format!("gsm8k/{split}/{i}"),
                },
                prompt,
                stop: vec!["Q:".into(), "</s>".into(), "<|im_end|>".into()],
                max_tokens: 256,
                check: Check::Number(gsm8k_target(&r.answer)),
            }
        })
        .collect())
}

/// Reads `.jsonl` or `.jsonl.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<Value>, TaskError> {
    let err = |message: String| TaskError::Data {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut s)
            .map_err(|e| err(e.to_string()))?;
        s
    } else {
        String::from_utf8(bytes).map_err(|e| err(e.to_string()))?
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: {e}", i + 1))))
        .collect()
}

fn field<'a>(row: &'a Value, name: &str, path: &Path) -> Result<&'a str, TaskError> {
    row[name].as_str().ok_or_else(|| TaskError::Data {
        path: path.display().to_string(),
        message: format!("missing string field `{name}`"),
    })
}

/// The first existing file among `names` under `dir`.
fn first_existing(dir: &Path, names: &[&str]) -> Result<std::path::PathBuf, TaskError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .ok_or_else(|| TaskError::Data {
            path: dir.display().to_string(),
            message: format!("none of {} found", names.join(", ")),
        })
}

/// HumanEval (and HumanEval+, same schema with more tests): complete the prompt; the program is
/// prompt + completion + tests + `check(entry_point)`.
fn humaneval(data_dir: &Path, plus: bool) -> Result<Vec<GenDoc>, TaskError> {
    let path = if plus {
        first_existing(
            &data_dir.join("humanevalplus"),
            &[
                "HumanEvalPlus.jsonl.gz",
                "HumanEvalPlus.jsonl",
                "test.jsonl",
            ],
        )?
    } else {
        first_existing(
            &data_dir.join("humaneval"),
            &["HumanEval.jsonl.gz", "HumanEval.jsonl"],
        )?
    };
    read_maybe_gz(&path)?
        .iter()
        .map(|r| {
            let prompt = field(r, "prompt", &path)?;
            let test = field(r, "test", &path)?;
            let entry = field(r, "entry_point", &path)?;
            Ok(GenDoc {
                id: field(r, "task_id", &path)?.to_string(),
                prompt: Prompt::Completion(prompt.to_string()),
                stop: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
                    .map(String::from)
                    .to_vec(),
                max_tokens: 512,
                check: Check::Program {
                    before: prompt.to_string(),
                    after: format!("\n\n{test}\n\ncheck({entry})\n"),
                },
            })
        })
        .collect()
}

/// MBPP (google-research-datasets/mbpp) and MBPP+ (evalplus/mbppplus), lm-eval's prompt:
/// the task, its tests, then `[BEGIN]`; generation stops at `[DONE]`.
fn mbpp(data_dir: &Path, plus: bool) -> Result<Vec<GenDoc>, TaskError> {
    let dir = data_dir.join(if plus { "mbppplus" } else { "mbpp" });
    let path = first_existing(&dir, &["test.jsonl", "mbpp.jsonl", "mbppplus.jsonl"])?;
    read_maybe_gz(&path)?
        .iter()
        .map(|r| {
            let text = if plus {
                field(r, "prompt", &path)?
            } else {
                field(r, "text", &path)?
            };
            let tests: Vec<String> = r["test_list"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
                .unwrap_or_default();
            let prompt = format!(
                "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{}\n[BEGIN]\n",
                tests.join("\n")
            );
            let after = if plus {
                let imports: Vec<String> = r["test_imports"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
                    .unwrap_or_default();
                format!("\n{}\n{}\n", imports.join("\n"), field(r, "test", &path)?)
            } else {
                let setup = r["test_setup_code"].as_str().unwrap_or("");
                format!("\n{setup}\n{}\n", tests.join("\n"))
            };
            Ok(GenDoc {
                id: r["task_id"].to_string(),
                prompt: Prompt::Completion(prompt),
                stop: vec!["[DONE]".into()],
                max_tokens: 512,
                check: Check::Program {
                    before: String::new(),
                    after,
                },
            })
        })
        .collect()
}

/// XSUM (EdinburghNLP/xsum): one-sentence summary of the document, ROUGE-L F1 vs the reference.
fn xsum(data_dir: &Path) -> Result<Vec<GenDoc>, TaskError> {
    let path = first_existing(&data_dir.join("xsum"), &["test.jsonl", "validation.jsonl"])?;
    read_maybe_gz(&path)?
        .iter()
        .map(|r| {
            Ok(GenDoc {
                id: field(r, "id", &path)?.to_string(),
                prompt: Prompt::Completion(format!(
                    "Article: {}\nSummarize the article in one sentence. Summary:",
                    field(r, "document", &path)?.trim()
                )),
                stop: vec!["\n".into()],
                max_tokens: 64,
                check: Check::Rouge(field(r, "summary", &path)?.to_string()),
            })
        })
        .collect()
}

/// Loads a generative task, or `None` if `task` is not one.
pub fn load(task: &str, data_dir: &Path) -> Option<Result<Vec<GenDoc>, TaskError>> {
    Some(match task {
        "gsm8k" | "gsm8k_cot" => gsm8k(data_dir, "test", false),
        "gsm8k_train" => gsm8k(data_dir, "train", false),
        "gsm8k_chat" => gsm8k(data_dir, "test", true),
        "humaneval" => humaneval(data_dir, false),
        "humanevalplus" => humaneval(data_dir, true),
        "mbpp" => mbpp(data_dir, false),
        "mbppplus" => mbpp(data_dir, true),
        "xsum" => xsum(data_dir),
        _ => return None,
    })
}

/// rouge-score's default tokenizer: lowercase, non-alphanumerics as spaces.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// ROUGE-L F1 (longest common subsequence of tokens), as `rouge_score.rouge_scorer` computes it.
pub fn rouge_l_f1(reference: &str, candidate: &str) -> f64 {
    let (r, c) = (rouge_tokens(reference), rouge_tokens(candidate));
    if r.is_empty() || c.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; c.len() + 1];
    for rt in &r {
        let mut cur = vec![0usize; c.len() + 1];
        for (j, ct) in c.iter().enumerate() {
            cur[j + 1] = if rt == ct {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        prev = cur;
    }
    let lcs = prev[c.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_extraction_follows_lm_eval() {
        assert_eq!(gsm8k_target("so 5 + 3 = 8\n#### 1,008"), "1008");
        let (s, f) = extract_numbers("She has 10 - 2 = 8 left. The answer is 8.\n\nQ");
        assert_eq!((s.as_deref(), f.as_deref()), (Some("8"), Some("8")));
        let (s, f) = extract_numbers("First 3 apples, then $1,250.");
        assert_eq!((s, f.as_deref()), (None, Some("1250")));
        let (s, _) = extract_numbers("#### -12");
        assert_eq!(s.as_deref(), Some("-12"));
        let responses = ["The answer is 8.".to_string(), "maybe 8 or 9".to_string()];
        let (strict, flexible, shown) = score_numbers(&responses, "8");
        assert_eq!((strict, flexible), (0.5, 0.5));
        assert_eq!(shown, ["8 | 8", "- | 9"]);
    }

    #[test]
    fn rouge_l_matches_hand_computed_values() {
        // LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4.
        let f = rouge_l_f1("The cat sat on the mat.", "the cat lay on a mat");
        assert!((f - 2.0 * (4.0 / 6.0) * (4.0 / 6.0) / (8.0 / 6.0)).abs() < 1e-12);
        assert_eq!(rouge_l_f1("a b c", "a b c"), 1.0);
        assert_eq!(rouge_l_f1("a b c", "x y"), 0.0);
        assert_eq!(rouge_l_f1("", "x"), 0.0);
    }
}
