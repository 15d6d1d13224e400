//! Multiple-choice tasks in lm-evaluation-harness's prompt formats, loaded from the published
//! files under a data directory (see ../shared/data/README.md for the layouts).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

/// One multiple-choice item: choice `i` is scored as `contexts[i]` followed by `continuations[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    pub gold: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task `{0}` (known: {known})", known = known_tasks())]
    Unknown(String),
    #[error("{path}: {message}")]
    Data { path: String, message: String },
}

pub const TASKS: [&str; 8] = [
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "openbookqa",
    "hellaswag",
    "mmlu",
    "arithmetic",
];

/// Every task name `eval` accepts.
pub fn known_tasks() -> String {
    let mut all: Vec<&str> = TASKS.to_vec();
    all.extend(crate::gen_tasks::GEN_TASKS);
    all.join(", ")
}

#[derive(Deserialize)]
struct QueryChoices {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

#[derive(Deserialize)]
struct PartialScoring {
    context_options: Vec<String>,
    continuation: String,
    gold: usize,
}

pub(crate) fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, TaskError> {
    let err = |message: String| TaskError::Data {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(format!("line {}: {e}", i + 1))))
        .collect()
}

/// `Question: ...\nAnswer:` + ` {choice}` (lm-eval's arc_* and piqa).
fn question_answer(rows: Vec<QueryChoices>) -> Vec<Doc> {
    rows.into_iter()
        .map(|r| {
            let q = r.query.trim_end();
            let q = if q.starts_with("Question:") {
                q.to_string()
            } else {
                format!("Question: {q}")
            };
            Doc {
                contexts: vec![format!("{q}\nAnswer:"); r.choices.len()],
                continuations: r.choices.iter().map(|c| format!(" {c}")).collect(),
                gold: r.gold,
            }
        })
        .collect()
}

/// Winogrande with partial scoring: the continuation after each filled-in context.
fn partial(rows: Vec<PartialScoring>) -> Vec<Doc> {
    rows.into_iter()
        .map(|r| Doc {
            continuations: vec![
                format!(" {}", r.continuation.trim_start());
                r.context_options.len()
            ],
            contexts: r.context_options,
            gold: r.gold,
        })
        .collect()
}

#[derive(Deserialize)]
struct OpenBookQaChoices {
    text: Vec<String>,
    label: Vec<String>,
}

#[derive(Deserialize)]
struct OpenBookQaRow {
    question_stem: String,
    choices: OpenBookQaChoices,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

/// allenai/openbookqa (`main`): the stem as context, ` {choice}` continuations.
fn openbookqa(rows: Vec<OpenBookQaRow>) -> Result<Vec<Doc>, TaskError> {
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let gold = r
                .choices
                .label
                .iter()
                .position(|l| *l == r.answer_key)
                .ok_or_else(|| TaskError::Data {
                    path: "openbookqa".into(),
                    message: format!("item {i}: answerKey {} not among labels", r.answer_key),
                })?;
            Ok(Doc {
                contexts: vec![r.question_stem.clone(); r.choices.text.len()],
                continuations: r.choices.text.iter().map(|c| format!(" {c}")).collect(),
                gold,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct HellaSwagRow {
    activity_label: String,
    ctx_a: String,
    ctx_b: String,
    endings: Vec<String>,
    label: Value,
}

/// lm-eval's hellaswag `preprocess`.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let t = regex::Regex::new(r"\[.*?\]")
        .map(|re| re.replace_all(&t, "").into_owned())
        .unwrap_or(t);
    t.replace("  ", " ")
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// Rowan/hellaswag: `{activity}: {ctx_a} {Ctx_b}` and the preprocessed endings.
fn hellaswag(rows: Vec<HellaSwagRow>) -> Result<Vec<Doc>, TaskError> {
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let gold = match &r.label {
                Value::String(s) => s.parse().ok(),
                Value::Number(n) => n.as_u64().map(|n| n as usize),
                _ => None,
            }
            .ok_or_else(|| TaskError::Data {
                path: "hellaswag".into(),
                message: format!("item {i}: label {} is not an index", r.label),
            })?;
            let ctx = format!("{} {}", r.ctx_a, capitalize(&r.ctx_b));
            let query = hellaswag_preprocess(&format!("{}: {ctx}", r.activity_label));
            Ok(Doc {
                contexts: vec![query; r.endings.len()],
                continuations: r
                    .endings
                    .iter()
                    .map(|e| format!(" {}", hellaswag_preprocess(e)))
                    .collect(),
                gold,
            })
        })
        .collect()
}

/// One MMLU CSV row: question, four choices, answer letter.
fn mmlu_rows(path: &Path) -> Result<Vec<[String; 6]>, TaskError> {
    let err = |message: String| TaskError::Data {
        path: path.display().to_string(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .map_err(|e| err(e.to_string()))?;
    reader
        .records()
        .map(|r| {
            let r = r.map_err(|e| err(e.to_string()))?;
            if r.len() != 6 {
                return Err(err(format!("expected 6 columns, found {}", r.len())));
            }
            Ok(std::array::from_fn(|i| r[i].to_string()))
        })
        .collect()
}

fn mmlu_question(row: &[String; 6]) -> String {
    format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        row[0].trim(),
        row[1],
        row[2],
        row[3],
        row[4]
    )
}

/// hendrycks/test CSVs, lm-eval's `mmlu` prompt: a subject description, `shots` solved dev
/// questions, then the test question; continuations ` A` .. ` D`.
fn mmlu(data_dir: &Path, shots: usize) -> Result<Vec<Doc>, TaskError> {
    let test_dir = data_dir.join("mmlu/test");
    let mut files: Vec<_> = std::fs::read_dir(&test_dir)
        .map_err(|e| TaskError::Data {
            path: test_dir.display().to_string(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for test in files {
        let stem = test.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let subject = stem.strip_suffix("_test").unwrap_or(stem);
        let dev = data_dir.join(format!("mmlu/dev/{subject}_dev.csv"));
        let mut prefix = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        for row in mmlu_rows(&dev)?.iter().take(shots) {
            prefix.push_str(&format!("{} {}\n\n", mmlu_question(row), row[5].trim()));
        }
        for (i, row) in mmlu_rows(&test)?.iter().enumerate() {
            let gold = ["A", "B", "C", "D"]
                .iter()
                .position(|l| *l == row[5].trim())
                .ok_or_else(|| TaskError::Data {
                    path: test.display().to_string(),
                    message: format!("row {}: answer {} is not A-D", i + 1, row[5]),
                })?;
            docs.push(Doc {
                contexts: vec![format!("{prefix}{}", mmlu_question(row)); 4],
                continuations: [" A", " B", " C", " D"].map(String::from).to_vec(),
                gold,
            });
        }
    }
    Ok(docs)
}

#[derive(Deserialize)]
struct ArithmeticRow {
    context: String,
    completion: String,
}

/// The paper's few-shot prefix for the arithmetic probe.
const ARITHMETIC_SHOTS: [(&str, &str); 3] = [
    ("What is (4 * 4) * 1?", "16"),
    ("What is (7 - 2) + 3?", "8"),
    ("What is (6 * 2) - 9?", "3"),
];

/// The arithmetic probe over `single_digit_three_ops`: items whose answer is one digit, asked as
/// `Question: ...\nAnswer:` after `shots` solved examples; the prediction is the argmax over the
/// ten continuations ` 0` .. ` 9` (the digit tokens' logprobs at the answer position).
fn arithmetic(rows: Vec<ArithmeticRow>, shots: usize) -> Vec<Doc> {
    let prefix: String = ARITHMETIC_SHOTS
        .iter()
        .take(shots)
        .map(|(q, a)| format!("Question: {q}\nAnswer: {a}\n\n"))
        .collect();
    rows.into_iter()
        .filter_map(|r| {
            let answer: usize = r.completion.trim().parse().ok().filter(|&a| a < 10)?;
            let q = r.context.trim().trim_start_matches("Q:").trim();
            let q = q.trim_end_matches("A:").trim();
            Some(Doc {
                contexts: vec![format!("{prefix}Question: {q}\nAnswer:"); 10],
                continuations: (0..10).map(|d| format!(" {d}")).collect(),
                gold: answer,
            })
        })
        .collect()
}

/// Loads a task's documents from `data_dir`. `num_fewshot` overrides mmlu's 5 and arithmetic's 3.
pub fn load_with_shots(
    task: &str,
    data_dir: &Path,
    num_fewshot: Option<usize>,
) -> Result<Vec<Doc>, TaskError> {
    let docs = match task {
        "openbookqa" => openbookqa(read_jsonl(&data_dir.join("openbookqa/test.jsonl"))?)?,
        "hellaswag" => hellaswag(read_jsonl(&data_dir.join("hellaswag/validation.jsonl"))?)?,
        "mmlu" => mmlu(data_dir, num_fewshot.unwrap_or(5))?,
        "arithmetic" => arithmetic(
            read_jsonl(&data_dir.join("arithmetic/single_digit_three_ops.jsonl"))?,
            num_fewshot.unwrap_or(3),
        ),
        _ => return load(task, data_dir),
    };
    check_gold(task, docs)
}

fn check_gold(task: &str, docs: Vec<Doc>) -> Result<Vec<Doc>, TaskError> {
    for (i, d) in docs.iter().enumerate() {
        if d.gold >= d.continuations.len() {
            return Err(TaskError::Data {
                path: task.into(),
                message: format!("item {i}: gold {} out of range", d.gold),
            });
        }
    }
    Ok(docs)
}

/// Loads a task's documents from `data_dir`.
pub fn load(task: &str, data_dir: &Path) -> Result<Vec<Doc>, TaskError> {
    let docs = match task {
        "arc_easy" => question_answer(read_jsonl(&data_dir.join("arc/arc_easy.jsonl"))?),
        "arc_challenge" => question_answer(read_jsonl(&data_dir.join("arc/arc_challenge.jsonl"))?),
        "piqa" => question_answer(read_jsonl(&data_dir.join("piqa/piqa.jsonl"))?),
        "winogrande" => partial(read_jsonl(&data_dir.join("winogrande/winogrande.jsonl"))?),
        "openbookqa" | "hellaswag" | "mmlu" | "arithmetic" => {
            return load_with_shots(task, data_dir, None)
        }
        other => return Err(TaskError::Unknown(other.to_string())),
    };
    check_gold(task, docs)
}

/// `--limit`: a count (`50`) or a fraction (`0.2`) of the documents, taken from the start.
pub fn apply_limit(n: usize, limit: Option<f64>) -> usize {
    match limit {
        None => n,
        Some(l) if l < 1.0 => ((n as f64) * l).ceil() as usize,
        Some(l) => (l as usize).min(n),
    }
}
