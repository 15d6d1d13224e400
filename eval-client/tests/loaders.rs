//! Task loaders: the shared data files (gsm8k, humaneval, arithmetic, mmlu) and, for sets not
//! available offline, small samples in their Hugging Face schemas written here (openbookqa,
//! hellaswag, mbpp, mbpp+, humaneval+, xsum). Prompts are checked against lm-eval's formats.

use std::path::{Path, PathBuf};

use pruneval::gen_tasks::{self, Check, Prompt};
use pruneval::tasks;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn shared_data_loads_in_lm_eval_formats() {
    let gsm = gen_tasks::load("gsm8k", &data_dir()).unwrap().unwrap();
    assert_eq!(gsm.len(), 1319);
    let Prompt::Completion(p) = &gsm[0].prompt else {
        panic!()
    };
    assert!(p.starts_with("Q: There are 15 trees in the grove."));
    assert_eq!(p.matches("The answer is").count(), 8);
    assert!(p.ends_with("\nA:"));
    assert_eq!(gsm[0].check, Check::Number("18".into()));
    let chat = gen_tasks::load("gsm8k_chat", &data_dir()).unwrap().unwrap();
    let Prompt::Chat(turns) = &chat[0].prompt else {
        panic!()
    };
    assert_eq!(turns.len(), 17);

    let he = gen_tasks::load("humaneval", &data_dir()).unwrap().unwrap();
    assert_eq!(he.len(), 164);
    assert_eq!(he[0].id, "HumanEval/0");
    let Check::Program { after, .. } = &he[0].check else {
        panic!()
    };
    assert!(after.ends_with("check(has_close_elements)\n"));

    let arith = tasks::load("arithmetic", &data_dir()).unwrap();
    assert!(
        !arith.is_empty() && arith.len() < 2000,
        "only one-digit answers: {}",
        arith.len()
    );
    assert_eq!(arith[0].continuations.len(), 10);
    assert!(arith[0].contexts[0].starts_with("Question: What is (4 * 4) * 1?\nAnswer: 16\n\n"));
    assert!(arith[0].contexts[0].ends_with("?\nAnswer:"));

    let mmlu = tasks::load("mmlu", &data_dir()).unwrap();
    assert_eq!(mmlu.len(), 14079);
    let c = &mmlu[0].contexts[0];
    assert!(c.starts_with(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    ));
    assert_eq!(
        c.matches("\nAnswer:").count(),
        6,
        "5 shots and the question"
    );
    assert_eq!(mmlu[0].continuations, [" A", " B", " C", " D"]);
    let zero = tasks::load_with_shots("mmlu", &data_dir(), Some(0)).unwrap();
    assert_eq!(zero[0].contexts[0].matches("\nAnswer:").count(), 1);
}

#[test]
fn hub_format_samples_load() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(
        d,
        "openbookqa/test.jsonl",
        r#"{"id": "7-980", "question_stem": "The sun is responsible for", "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting"], "label": ["A", "B"]}, "answerKey": "B"}"#,
    );
    write(
        d,
        "hellaswag/validation.jsonl",
        r#"{"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing [title] on a roof."], "source_id": "x", "split": "val", "split_type": "indomain", "label": "1"}"#,
    );
    write(
        d,
        "mbpp/test.jsonl",
        r#"{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.", "code": "def remove_Occ(s,ch):\n    return s", "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\""], "test_setup_code": "", "challenge_test_list": []}"#,
    );
    write(
        d,
        "mbppplus/test.jsonl",
        r#"{"task_id": 2, "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))", "prompt": "Write a function to find the shared elements from the given two lists.", "source_file": "x", "test_imports": ["import math"], "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"], "test": "assert similar_elements((1,), (1,)) == (1,)\n"}"#,
    );
    write(
        d,
        "humanevalplus/HumanEvalPlus.jsonl",
        r#"{"task_id": "HumanEval/2", "prompt": "def truncate_number(number: float) -> float:\n", "canonical_solution": "    return number % 1.0\n", "entry_point": "truncate_number", "test": "def check(candidate):\n    assert candidate(3.5) == 0.5\n"}"#,
    );
    write(
        d,
        "xsum/test.jsonl",
        r#"{"document": "The full cost of damage in Newton Stewart is still being assessed.\nRepair work is ongoing.", "summary": "Clean-up operations are continuing.", "id": "35232142"}"#,
    );

    let obqa = tasks::load("openbookqa", d).unwrap();
    assert_eq!(obqa[0].contexts[0], "The sun is responsible for");
    assert_eq!(
        obqa[0].continuations[1],
        " plants sprouting, blooming and wilting"
    );
    assert_eq!(obqa[0].gold, 1);

    let hs = tasks::load("hellaswag", d).unwrap();
    assert_eq!(
        hs[0].contexts[0],
        "Roof shingle removal: A man is sitting on a roof. He"
    );
    assert_eq!(
        hs[0].continuations[1],
        " starts pulling up roofing. on a roof."
    );
    assert_eq!(hs[0].gold, 1);

    let mbpp = gen_tasks::load("mbpp", d).unwrap().unwrap();
    let Prompt::Completion(p) = &mbpp[0].prompt else {
        panic!()
    };
    assert!(p.starts_with(
        "You are an expert Python programmer, and here is your task: Write a python function"
    ));
    assert!(p.ends_with("== \"heo\"\n[BEGIN]\n"));
    assert_eq!(mbpp[0].stop, ["[DONE]"]);

    let plus = gen_tasks::load("mbppplus", d).unwrap().unwrap();
    let Check::Program { after, .. } = &plus[0].check else {
        panic!()
    };
    assert!(after.contains("import math") && after.contains("assert similar_elements((1,), (1,))"));

    let hep = gen_tasks::load("humanevalplus", d).unwrap().unwrap();
    let Check::Program { before, after } = &hep[0].check else {
        panic!()
    };
    assert!(before.starts_with("def truncate_number"));
    assert!(after.ends_with("check(truncate_number)\n"));
    // The canonical solution passes in the sandbox; a wrong one fails.
    let iso = pruneval::sandbox::Isolation::detect();
    let limits = pruneval::sandbox::Limits::default();
    let runs = pruneval::sandbox::run_many(
        &[
            format!("{before}    return number % 1.0\n{after}"),
            format!("{before}    return 0.0\n{after}"),
        ],
        &limits,
        &iso,
        2,
    );
    assert_eq!(
        runs[0].outcome,
        pruneval::sandbox::Outcome::Passed,
        "{}",
        runs[0].stderr_tail
    );
    assert_eq!(runs[1].outcome, pruneval::sandbox::Outcome::Failed);

    let xsum = gen_tasks::load("xsum", d).unwrap().unwrap();
    let Prompt::Completion(p) = &xsum[0].prompt else {
        panic!()
    };
    assert!(p.starts_with("Article: The full cost") && p.ends_with("Summary:"));
    assert_eq!(
        xsum[0].check,
        Check::Rouge("Clean-up operations are continuing.".into())
    );

    let missing = tasks::load("openbookqa", &d.join("nowhere")).unwrap_err();
    assert!(
        missing.to_string().contains("openbookqa/test.jsonl"),
        "{missing}"
    );
}
