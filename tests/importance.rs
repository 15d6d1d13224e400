//! Layer importance on SmolLM2 against the float64 numpy forward over the GGUF's tensors
//! (tests/reference/llama_gguf_reference.py): Block Influence per layer and angular distances per
//! block, on the full model and through `POST /v1/layer_importance` on a plan; the suggested drop
//! sets; the endpoint's limits, and generation running while an importance run is in progress.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::server::{client, ServerProc};
use common::*;
use pruneserve::importance::{self, calibration, Metric};
use pruneserve::loaded::LoadedModel;
use pruneserve::plan::{format_layer_list, LayerPlan};
use serde_json::{json, Value};

/// BI and angular distance in f32 against the float64 reference.
const TOLERANCE: f64 = 1e-4;

fn reference(prompts: &[Vec<u32>], layers: &[usize], block: usize) -> (Vec<f64>, Vec<f64>) {
    let r = run_python(
        "llama_gguf_reference.py",
        &json!({"gguf": smollm2_gguf(), "prompts": prompts, "layers": layers,
                "block": block, "logprobs": false}),
    );
    let get = |k: &str| serde_json::from_value::<Vec<f64>>(r[k].clone()).unwrap();
    (get("bi"), get("angular"))
}

/// The `k` layers of lowest score, ascending (ties to the later layer), as the contract says.
fn lowest(layers: &[usize], scores: &[f64], k: usize) -> Vec<usize> {
    let mut v: Vec<(usize, f64)> = layers.iter().copied().zip(scores.iter().copied()).collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    let mut out: Vec<usize> = v[..k].iter().map(|x| x.0).collect();
    out.sort_unstable();
    out
}

fn assert_close(what: &str, ours: &[f64], want: &[f64]) -> f64 {
    assert_eq!(ours.len(), want.len(), "{what}: lengths");
    let d = ours
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("{what}: max |diff| {d:.2e} over {} values", ours.len());
    assert!(d < TOLERANCE, "{what}: max diff {d}");
    d
}

fn gsm8k_prompts(loaded: &LoadedModel, items: usize) -> Vec<Vec<u32>> {
    let texts = calibration::gsm8k_cot(items).unwrap();
    let bos = loaded.model.config().bos_token_id;
    calibration::tokenize(&texts, bos, |t| loaded.encode(t, true)).unwrap()
}

#[test]
fn block_influence_and_angular_distance_match_numpy_on_smollm2() {
    let loaded =
        LoadedModel::load(smollm2_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let prompts = gsm8k_prompts(&loaded, 6);
    let bos = loaded.model.config().bos_token_id.unwrap();
    assert!(prompts.iter().all(|p| p[0] == bos && p[1] != bos));
    let plan = Arc::new(LayerPlan::full(30));
    let report =
        importance::run_to_end(loaded.model.clone(), plan, prompts.clone(), Metric::Bi, 8).unwrap();
    let layers: Vec<usize> = (0..30).collect();
    let (bi, angular) = reference(&prompts, &layers, 8);
    let ours_bi: Vec<f64> = report.block_influence.iter().map(|s| s.score).collect();
    assert_close("BI per layer", &ours_bi, &bi);
    let ours_ang: Vec<f64> = report.angular_distance.iter().map(|b| b.distance).collect();
    assert_close("angular distance per 8-layer block", &ours_ang, &angular);
    // The suggested set for K = 8 is the reference's eight layers of lowest BI.
    assert_eq!(report.drop, lowest(&layers, &bi, 8), "BI {bi:?}");
    assert_eq!(report.tokens, prompts.iter().map(Vec::len).sum::<usize>());
    println!("suggested drop (K = 8): {:?}", report.drop);
    // The angular metric's suggestion is the reference's closest block.
    let plan = Arc::new(LayerPlan::full(30));
    let by_angle =
        importance::run_to_end(loaded.model.clone(), plan, prompts, Metric::Angular, 8).unwrap();
    let best = lowest(&(0..angular.len()).collect::<Vec<_>>(), &angular, 1)[0];
    assert_eq!(by_angle.drop, (best..best + 8).collect::<Vec<_>>());
}

fn importance_request(server: &ServerProc, body: &Value) -> (u16, Value) {
    server.post("/v1/layer_importance", &body.to_string())
}

#[test]
fn the_endpoint_scores_a_plan_like_numpy_and_names_the_pruned_model() {
    let server = ServerProc::start_default(&[]);
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Question: What is 12 + 30?\nAnswer: 12 + 30 = 42. The final answer is 42",
        "def add(a, b):\n    return a + b\n",
    ];
    let model = "smollm2-135m@drop=3,17,25";
    let (status, body) = importance_request(
        &server,
        &json!({"model": model, "calibration": texts, "drop": 4}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "layer_importance");
    assert_eq!(body["model"], model);
    let layers: Vec<usize> = (0..30).filter(|l| ![3, 17, 25].contains(l)).collect();
    assert_eq!(body["plan_layers"], json!(layers));
    // The same ids the server used: its tokenizer, BOS first.
    let (_, tok) = server.post(
        "/tokenize",
        &json!({"model": model, "prompt": texts[0]}).to_string(),
    );
    let loaded =
        LoadedModel::load(smollm2_dir().to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let bos = loaded.model.config().bos_token_id;
    let prompts =
        calibration::tokenize(&texts.map(String::from), bos, |t| loaded.encode(t, true)).unwrap();
    let mut first: Vec<u32> = serde_json::from_value(tok["tokens"].clone()).unwrap();
    calibration::with_bos(&mut first, bos);
    assert_eq!(first, prompts[0]);
    let (bi, angular) = reference(&prompts, &layers, 4);
    let ours = |k: &str, f: &str| -> Vec<f64> {
        body[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[f].as_f64().unwrap())
            .collect()
    };
    assert_close(
        "BI per layer of the plan (API)",
        &ours("block_influence", "score"),
        &bi,
    );
    assert_close(
        "angular distance per 4-layer block (API)",
        &ours("angular_distance", "distance"),
        &angular,
    );
    let drop = lowest(&layers, &bi, 4);
    assert_eq!(body["drop"], json!(drop));
    let mut all: Vec<usize> = [3, 17, 25].into_iter().chain(drop).collect();
    all.sort_unstable();
    let suggested = format!("smollm2-135m@drop={}", format_layer_list(&all));
    assert_eq!(body["suggested_model"], json!(suggested));
    // The suggested name serves.
    let (status, out) = server.post(
        "/v1/completions",
        &json!({"model": suggested, "prompt": "Hello", "max_tokens": 2}).to_string(),
    );
    assert_eq!(status, 200, "{out}");
}

#[test]
fn bad_importance_requests_get_openai_errors_naming_the_field() {
    let server = ServerProc::start_default(&[]);
    let cases = [
        (json!({"model": "smollm2-135m", "drop": 30}), "drop", 400),
        (json!({"model": "smollm2-135m", "drop": 0}), "drop", 400),
        (json!({"model": "rev25", "drop": 23}), "drop", 400),
        (
            json!({"model": "smollm2-135m", "calibration": "wikitext"}),
            "calibration",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "calibration": []}),
            "calibration",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "calibration": ["a", ""]}),
            "calibration",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "max_prompts": 101}),
            "max_prompts",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "calibration": vec!["x"; 1001]}),
            "calibration",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "calibration": ["x".repeat(3_000_000)]}),
            "calibration",
            400,
        ),
        (
            json!({"model": "smollm2-135m", "metric": "cosine"}),
            "",
            400,
        ),
        (json!({"model": "smollm2-135m", "layers": [1]}), "", 400),
        (json!({"model": "nope"}), "model", 404),
        (json!({"model": "smollm2-135m@drop=40"}), "model", 400),
    ];
    for (body, param, status) in cases {
        let (got, err) = importance_request(&server, &body);
        let shown: String = body.to_string().chars().take(80).collect();
        assert_eq!(got, status, "{shown}: {err}");
        let e = &err["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{shown}: {err}");
        }
    }
    // Still serving.
    let (status, _) = importance_request(
        &server,
        &json!({"model": "rev25", "max_prompts": 1, "drop": 2}),
    );
    assert_eq!(status, 200);
}

/// A long run shares the engine thread with generation a chunk at a time: a completion sent while
/// it runs finishes first. At most two runs wait per base; a client that leaves frees its place.
#[test]
fn generation_runs_while_importance_runs_and_runs_are_bounded() {
    let server = ServerProc::start_default(&[]);
    let url = server.url("/v1/layer_importance");
    let full = json!({"model": "smollm2-135m", "max_prompts": 40}).to_string();
    let long = {
        let (url, full) = (url.clone(), full.clone());
        std::thread::spawn(move || {
            let r = client().post(url).body(full).send().unwrap();
            (
                Instant::now(),
                r.status().as_u16(),
                r.json::<Value>().unwrap(),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (status, out) = server.post(
        "/v1/completions",
        &json!({"model": "smollm2-135m", "prompt": "1, 2, 3,", "max_tokens": 8}).to_string(),
    );
    let completion_done = Instant::now();
    assert_eq!(status, 200, "{out}");
    // A second run waits its turn; a third is refused while both are queued.
    let leaving = {
        let (url, full) = (url.clone(), full.clone());
        std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder()
                .timeout(Duration::from_millis(1500))
                .build()
                .unwrap();
            c.post(url).body(full).send().is_err()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (status, err) = importance_request(&server, &json!({"model": "smollm2-135m"}));
    assert_eq!(status, 503, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry later"),
        "{err}"
    );
    assert!(leaving.join().unwrap(), "the leaving client timed out");
    let (finished, status, report) = long.join().unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["prompts"], 40);
    assert!(
        completion_done < finished,
        "the completion waited for the whole importance run"
    );
    println!(
        "importance run of {} tokens finished {:.1} s after an 8-token completion sent during it",
        report["tokens"],
        finished.duration_since(completion_done).as_secs_f64()
    );
    // The abandoned run gave its place back.
    let (status, _) =
        importance_request(&server, &json!({"model": "smollm2-135m", "max_prompts": 1}));
    assert_eq!(status, 200);
}

#[test]
fn the_influence_command_reports_and_refuses_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_dir();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pruneserve"))
            .arg("influence")
            .args(["--model", model.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json_path = tmp.path().join("bi.json");
    let (ok, stdout, stderr) = run(&[
        "--limit",
        "2",
        "--plan",
        "drop=28,29",
        "--metric",
        "angular",
        "--drop",
        "3",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("suggested drop:"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["prompts"], 2);
    assert_eq!(report["plan_layers"].as_array().unwrap().len(), 28);
    assert_eq!(report["angular_distance"].as_array().unwrap().len(), 26);
    let drop: Vec<usize> = serde_json::from_value(report["drop"].clone()).unwrap();
    assert_eq!(drop.len(), 3);
    assert_eq!(drop[2] - drop[0], 2, "a contiguous block: {drop:?}");
    let bad_file = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_file, "{\"text\": \"ok\"}\nnot json\n").unwrap();
    let missing = tmp.path().join("missing.jsonl");
    for (args, needle) in [
        (
            vec!["--plan", "drop29"],
            "--plan must be drop=LIST or keep=LIST",
        ),
        (vec!["--plan", "drop=30"], "30"),
        (
            vec!["--calibration", missing.to_str().unwrap()],
            "cannot read the calibration file",
        ),
        (
            vec!["--calibration", bad_file.to_str().unwrap()],
            "calibration file line 2",
        ),
        (vec!["--limit", "0"], "no prompts"),
        (vec!["--limit", "1", "--drop", "30"], "cannot drop 30"),
    ] {
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{args:?} succeeded");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
