//! pruneval's analyses against independent references: rep-n and intra-response Self-BLEU-4 equal
//! nltk's on a fixed set of texts (tests/reference/degeneration_reference.py); the code-failure
//! taxonomy classifies real Python failures run in the sandbox; one-forward multiple choice equals
//! scoring every choice on SmolLM2.

mod common;

use std::time::Duration;

use common::server::ServerProc;
use common::*;
use pruneval::analysis::degeneration::{intra_self_bleu4, repetition, words};
use pruneval::analysis::failures::classify;
use pruneval::analysis::FailureClass;
use pruneval::client::Client;
use pruneval::sandbox::{run_python as run_sandboxed, Isolation, Limits, Outcome};
use pruneval::tasks::Doc;
use serde_json::{json, Value};

const TEXTS: [&str; 8] = [
    "The answer is 42. The answer is 42. The answer is 42. The answer is 42.",
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer's market.\nThe final answer is 18",
    "so so so so so so so so so so so so",
    "Short.",
    "Photosynthesis turns light into chemical energy! Plants use it to make sugar from water and carbon dioxide. Is it efficient? Not very: about one percent of the light becomes sugar.",
    "First we add the numbers. Then we add the numbers again. Then we add the numbers again and again. Finally we add the numbers.",
    "def f(x):\n    return x + 1\n\ndef f(x):\n    return x + 1\n",
    "A b c d e. A b c d f! Unrelated words in this sentence here? a B C D E",
];

fn reference_value(v: &Value) -> Option<f64> {
    v.as_f64()
}

#[test]
fn rep_n_and_self_bleu_equal_the_nltk_reference() {
    let r = run_python("degeneration_reference.py", &json!({ "texts": TEXTS }));
    let mut compared = 0;
    for (i, text) in TEXTS.iter().enumerate() {
        let w = words(text);
        for n in [2usize, 3, 4] {
            let want = reference_value(&r["rep"][n.to_string()][i]);
            let got = repetition(&w, n);
            match (got, want) {
                (Some(g), Some(x)) => {
                    assert!((g - x).abs() < 1e-12, "text {i} rep-{n}: {g} vs {x}");
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("text {i} rep-{n}: {got:?} vs {want:?}"),
            }
        }
        let want = reference_value(&r["self_bleu_4"][i]);
        let got = intra_self_bleu4(text);
        match (got, want) {
            (Some(g), Some(x)) => {
                assert!((g - x).abs() < 1e-9, "text {i} Self-BLEU-4: {g} vs {x}");
                println!("text {i}: Self-BLEU-4 {g:.6} (nltk {x:.6})");
                compared += 1;
            }
            (None, None) => {}
            _ => panic!("text {i} Self-BLEU-4: {got:?} vs {want:?}"),
        }
    }
    // Most texts have every figure; the degenerate ones score high.
    assert!(compared >= 25, "{compared} values compared");
    assert!(repetition(&words(TEXTS[2]), 2).unwrap() > 0.9);
    assert!(intra_self_bleu4(TEXTS[0]).unwrap() > 0.99);
}

#[test]
fn the_taxonomy_classifies_real_python_failures() {
    let cases = [
        ("assert 1 + 1 == 2\n", FailureClass::Passed),
        (
            "def f(x):\n    return x\nassert f(1) == 2\n",
            FailureClass::AssertionFailed,
        ),
        ("def f(x:\n    return x\n", FailureClass::UnclosedBracket),
        ("x = [1, 2\n", FailureClass::UnclosedBracket),
        ("x = (1, 2]\n", FailureClass::UnclosedBracket),
        ("x = 1)\n", FailureClass::UnclosedBracket),
        ("def f(x) return x\n", FailureClass::OtherSyntaxError),
        ("def f(x):\nreturn x\n", FailureClass::OtherSyntaxError),
        ("print(undefined_name)\n", FailureClass::NameNotDefined),
        (
            "def f():\n    return f()\nf()\n",
            FailureClass::TimeoutOrRecursion,
        ),
        ("while True:\n    pass\n", FailureClass::TimeoutOrRecursion),
        ("1 / 0\n", FailureClass::Other),
        ("import sys\nsys.exit(3)\n", FailureClass::Other),
    ];
    let limits = Limits {
        wall: Duration::from_secs(2),
        cpu_seconds: 5,
        ..Limits::default()
    };
    let iso = Isolation::detect();
    for (program, want) in cases {
        let run = run_sandboxed(program, &limits, &iso);
        let got = classify(run.outcome, &run.stderr_tail);
        assert_eq!(
            got, want,
            "{program:?}: {:?}, stderr {:?}",
            run.outcome, run.stderr_tail
        );
        if want == FailureClass::Passed {
            assert_eq!(run.outcome, Outcome::Passed);
        }
    }
}

#[test]
fn one_forward_choices_equal_scoring_every_choice_on_smollm2() {
    let server = ServerProc::start_default(&[]);
    let client = Client::new(&server.base, None, None);
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let docs: Vec<Doc> = pruneval::tasks::load("arithmetic", &data)
        .unwrap()
        .into_iter()
        .take(6)
        .collect();
    let shared =
        pruneval::shared_choice::score_docs(&client, "smollm2-135m", &docs, 4, &|_| {}).unwrap();
    let pairs: Vec<(String, String)> = docs
        .iter()
        .flat_map(|d| {
            d.contexts
                .iter()
                .cloned()
                .zip(d.continuations.iter().cloned())
        })
        .collect();
    let full =
        pruneval::loglikelihood::score_pairs(&client, "smollm2-135m", &pairs, 16, 4, &|_| {})
            .unwrap();
    let mut worst = 0f64;
    for (i, lls) in shared.iter().enumerate() {
        let lls = lls.as_ref().expect("the probe's digits are in the top 20");
        for (j, &ll) in lls.iter().enumerate() {
            let want = full[i * 10 + j].loglikelihood;
            if ll > f64::MIN {
                worst = worst.max((ll - want).abs());
            } else {
                // Below the top 20: lower than the best choice.
                assert!(want < lls.iter().cloned().fold(f64::MIN, f64::max));
            }
        }
        let best_full = (0..10)
            .max_by(|&a, &b| {
                full[i * 10 + a]
                    .loglikelihood
                    .total_cmp(&full[i * 10 + b].loglikelihood)
            })
            .unwrap();
        assert_eq!(pruneval::metrics::argmax(lls), best_full, "item {i}");
    }
    println!("one forward vs every choice: max |dLL| {worst:.2e} over 6 items");
    assert!(worst < 1e-4, "{worst}");
}
