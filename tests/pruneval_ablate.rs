//! `pruneval ablate` against a SmolLM2 server on the arithmetic probe (10 items, CI-sized): a
//! single-layer sweep and a second greedy iteration over layers 26-29. Every candidate's score is
//! its own evaluation's accuracy over the baseline's (one candidate checked through a separate
//! `pruneval eval`), the chosen layer is the best with ties to the later one, the second
//! iteration runs on the first's plan, and a rerun answers from the cache.

mod common;

use std::path::Path;
use std::process::Command;

use common::server::ServerProc;
use common::*;
use serde_json::Value;

fn pruneval(args: &[&str]) -> String {
    let out = Command::new(pruneval_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pruneval {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn accuracy(out_dir: &Path, model: &str) -> f64 {
    let path = out_dir.join(model).join("arithmetic.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    r["acc"].as_f64().unwrap()
}

#[test]
fn sweep_and_greedy_iterations_choose_the_best_candidate_and_resume() {
    let server = ServerProc::start_default(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let args = [
        "ablate",
        "--base-url",
        &server.base,
        "--model",
        "smollm2-135m",
        "--tasks",
        "arithmetic",
        "--limit",
        "10",
        "--data-dir",
        data.to_str().unwrap(),
        "--candidates",
        "26-29",
        "--iterations",
        "2",
        "--out-dir",
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--concurrency",
        "4",
        "--parallel-candidates",
        "3",
    ];
    let first = pruneval(&args);
    let dir = out.join("ablate/smollm2-135m");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ablation.json")).unwrap()).unwrap();
    let baseline = accuracy(&out, "smollm2-135m");
    assert!(baseline > 0.0, "the baseline must solve an item");
    assert_eq!(report["baseline"][0]["value"].as_f64(), Some(baseline));
    let mut dropped: Vec<u64> = Vec::new();
    for (i, it) in report["iterations"].as_array().unwrap().iter().enumerate() {
        let cands = it["candidates"].as_array().unwrap();
        let layers: Vec<u64> = cands.iter().map(|c| c["layer"].as_u64().unwrap()).collect();
        let expected: Vec<u64> = (26..=29).filter(|l| !dropped.contains(l)).collect();
        assert_eq!(layers, expected, "iteration {}", i + 1);
        let mut best = (f64::MIN, 0);
        for c in cands {
            let model = c["model"].as_str().unwrap();
            let acc = accuracy(&out, model);
            let score = c["score"].as_f64().unwrap();
            assert!(
                (score - acc / baseline).abs() < 1e-12,
                "{model}: {score} vs {acc}/{baseline}"
            );
            if score >= best.0 {
                best = (score, c["layer"].as_u64().unwrap());
            }
            let mut plan = dropped.clone();
            plan.push(c["layer"].as_u64().unwrap());
            plan.sort_unstable();
            let list: Vec<String> = plan.iter().map(u64::to_string).collect();
            assert_eq!(model, format!("smollm2-135m@drop={}", list.join(",")));
        }
        assert_eq!(it["chosen"].as_u64(), Some(best.1), "iteration {}", i + 1);
        dropped.push(best.1);
        println!(
            "iteration {}: scores {:?}, chosen {}",
            i + 1,
            cands
                .iter()
                .map(|c| c["score"].as_f64().unwrap())
                .collect::<Vec<_>>(),
            best.1
        );
    }
    // One candidate through a separate evaluation (its own cache).
    let separate = tmp.path().join("separate");
    pruneval(&[
        "eval",
        "--base-url",
        &server.base,
        "--model",
        "smollm2-135m@drop=27",
        "--tasks",
        "arithmetic",
        "--limit",
        "10",
        "--data-dir",
        data.to_str().unwrap(),
        "--out-dir",
        separate.to_str().unwrap(),
        "--cache-dir",
        separate.join("cache").to_str().unwrap(),
    ]);
    assert_eq!(
        accuracy(&separate, "smollm2-135m@drop=27"),
        accuracy(&out, "smollm2-135m@drop=27")
    );
    let md = std::fs::read_to_string(dir.join("ablation.md")).unwrap();
    assert!(
        md.contains("## Iteration 2") && md.contains("**chosen**"),
        "{md}"
    );
    for f in ["sweep.png", "heatmap.png"] {
        let bytes = std::fs::read(dir.join(f)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 1000,
            "{f}: {} bytes",
            bytes.len()
        );
    }
    // A rerun sends nothing but the model listing and writes the same report.
    let json_before = std::fs::read(dir.join("ablation.json")).unwrap();
    let again = pruneval(&args);
    assert!(again.contains("requests sent: 1\n"), "{again}");
    assert!(!first.contains("requests sent: 1\n"));
    assert_eq!(
        std::fs::read(dir.join("ablation.json")).unwrap(),
        json_before
    );
}
