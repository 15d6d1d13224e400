//! The code-failure taxonomy of HumanEval(+)/MBPP(+) samples: why a program failed, from its
//! outcome and the Python exception that ended it (the last `Name: message` line of stderr).
//!
//! Classes, first match wins: passed; timeout or recursion depth (a timed-out run, or
//! `RecursionError`); unclosed/unmatched bracket (a `SyntaxError` saying "was never closed",
//! "unmatched" or "opening parenthesis"); other syntax error (`SyntaxError`, `IndentationError`,
//! `TabError`); name not defined (`NameError`, `UnboundLocalError`); assertion failed
//! (`AssertionError`); other (any other exception, or none found).

use serde::{Deserialize, Serialize};

use crate::sandbox::{Execution, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    Passed,
    AssertionFailed,
    UnclosedBracket,
    OtherSyntaxError,
    NameNotDefined,
    TimeoutOrRecursion,
    Other,
}

impl FailureClass {
    pub const ALL: [FailureClass; 7] = [
        FailureClass::Passed,
        FailureClass::AssertionFailed,
        FailureClass::UnclosedBracket,
        FailureClass::OtherSyntaxError,
        FailureClass::NameNotDefined,
        FailureClass::TimeoutOrRecursion,
        FailureClass::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureClass::Passed => "passed",
            FailureClass::AssertionFailed => "assertion failed",
            FailureClass::UnclosedBracket => "unclosed/unmatched bracket",
            FailureClass::OtherSyntaxError => "other syntax error",
            FailureClass::NameNotDefined => "name not defined",
            FailureClass::TimeoutOrRecursion => "timeout or recursion depth",
            FailureClass::Other => "other",
        }
    }
}

/// The exception line that ended a Python run: the last line starting `SomeName:` or being a bare
/// exception name (`AssertionError`).
fn final_exception(stderr: &str) -> Option<&str> {
    stderr.lines().rev().map(str::trim).find(|l| {
        let name = l.split(':').next().unwrap_or("");
        !name.is_empty()
            && !name.contains(' ')
            && (name.ends_with("Error") || name.ends_with("Exception") || name.contains('.'))
            && name.chars().next().is_some_and(char::is_alphabetic)
    })
}

/// Classifies one run.
pub fn classify(outcome: Outcome, stderr: &str) -> FailureClass {
    match outcome {
        Outcome::Passed => return FailureClass::Passed,
        Outcome::TimedOut => return FailureClass::TimeoutOrRecursion,
        Outcome::Failed => {}
    }
    let Some(line) = final_exception(stderr) else {
        return FailureClass::Other;
    };
    let (name, message) = line.split_once(':').unwrap_or((line, ""));
    let name = name.rsplit('.').next().unwrap_or(name);
    match name {
        "RecursionError" => FailureClass::TimeoutOrRecursion,
        "SyntaxError"
            if ["was never closed", "unmatched", "opening parenthesis"]
                .iter()
                .any(|m| message.contains(m)) =>
        {
            FailureClass::UnclosedBracket
        }
        "SyntaxError" | "IndentationError" | "TabError" => FailureClass::OtherSyntaxError,
        "NameError" | "UnboundLocalError" => FailureClass::NameNotDefined,
        "AssertionError" => FailureClass::AssertionFailed,
        _ => FailureClass::Other,
    }
}

/// How many samples fell in a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCount {
    pub class: FailureClass,
    pub count: usize,
}

/// Counts per class, in [`FailureClass::ALL`] order.
pub fn count(executions: &[Execution]) -> Vec<FailureCount> {
    let classes: Vec<FailureClass> = executions
        .iter()
        .map(|e| classify(e.outcome, &e.stderr_tail))
        .collect();
    FailureClass::ALL
        .iter()
        .map(|&class| FailureCount {
            class,
            count: classes.iter().filter(|&&x| x == class).count(),
        })
        .collect()
}
