//! LoRA adapters over HTTP: vLLM's runtime load/unload endpoints (an unloaded adapter finishes
//! the requests that hold it; new ones get 404), manifests and `--variant ...+adapter:DIR`,
//! `/v1/models` cards, and a clear 4xx for every kind of bad adapter while the server serves on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::server::{client, ServerProc};
use common::*;
use pruneserve::engine::adapters::LoraAdapter;
use pruneserve::engine::RunSpec;
use pruneserve::plan::PlanSpec;
use serde_json::{json, Value};

fn load(s: &ServerProc, name: &str, path: &Path, on: Option<&str>) -> (u16, Value) {
    let mut body = json!({"lora_name": name, "lora_path": path});
    if let Some(on) = on {
        body["base_model_name"] = json!(on);
    }
    s.post("/v1/load_lora_adapter", &body.to_string())
}

#[test]
fn adapters_load_serve_and_unload_at_runtime_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("rec");
    write_smollm2_adapter(&adapter, 8, &ALL_MODULES, 1);
    let s = ServerProc::start_default(&[]);
    let (status, card) = load(&s, "rev25-rec", &adapter, Some("rev25"));
    assert_eq!(status, 200, "{card}");
    assert_eq!(card["parent"], "rev25");
    assert_eq!(card["root"], adapter.to_str().unwrap());
    assert_eq!(card["adapter"]["r"], 8);
    assert_eq!(
        card["adapter"]["target_modules"].as_array().unwrap().len(),
        7
    );
    assert_eq!(card["kept_layers"], json!((0..22).collect::<Vec<_>>()));
    assert!(card["adapter"]["bytes"].as_u64().unwrap() > 0);
    let listed = s.get("/v1/lora_adapters");
    assert_eq!(listed["data"][0]["id"], "rev25-rec");
    assert!(s.get("/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "rev25-rec"));

    // What the server returns equals the engine's plan + adapter (checked against numpy in
    // tests/lora.rs), and differs from the plan alone.
    let prompt = pseudo_tokens(18, 49152, 2);
    let served = s.echo_logprobs("rev25-rec", &prompt);
    let model = load_cpu(&smollm2_dir());
    let lora =
        LoraAdapter::load(&adapter, model.config(), model.device(), model.dtype(), 64).unwrap();
    let spec = RunSpec {
        plan: Arc::new(PlanSpec::Reverse(0.25).resolve(30).unwrap()),
        overlay: None,
        lora: Some(Arc::new(lora)),
    };
    let direct = score_spec(&model, &spec, std::slice::from_ref(&prompt)).remove(0);
    for (a, b) in served.iter().zip(&direct) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_ne!(served, s.echo_logprobs("rev25", &prompt));
    // An ad-hoc suffix keeps the adapter.
    let composed = s.echo_logprobs("rev25-rec@drop=3", &prompt);
    assert_ne!(composed, served);

    // A long streamed request on the adapter; unloading it lets that request finish.
    let long = json!({"model": "rev25-rec", "prompt": [1, 2, 3], "max_tokens": 120,
                      "ignore_eos": true, "stream": true});
    let url = s.url("/v1/completions");
    let stream = std::thread::spawn(move || {
        let r = client().post(url).json(&long).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        BufReader::new(r)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.metric("pruneserve:num_requests_running").unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "the long request never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, r) = s.post("/v1/unload_lora_adapter", r#"{"lora_name": "rev25-rec"}"#);
    assert_eq!(status, 200, "{r}");
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "rev25-rec", "prompt": [1, 2], "max_tokens": 2}"#,
    );
    assert_eq!(status, 404, "{r}");
    let events = stream.join().unwrap();
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{events:?}"
    );
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("length")
    );
    assert_eq!(s.get("/v1/lora_adapters")["data"], json!([]));
}

#[test]
fn every_kind_of_bad_adapter_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let good = root.join("good");
    write_smollm2_adapter(&good, 8, &["q_proj", "v_proj"], 2);
    let high_rank = root.join("r32");
    write_smollm2_adapter(&high_rank, 32, &["q_proj"], 3);
    let no_weights = root.join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(
        good.join("adapter_config.json"),
        no_weights.join("adapter_config.json"),
    )
    .unwrap();
    let edited = |name: &str, edit: &dyn Fn(&mut Value)| {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            good.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(good.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        dir
    };
    let embed = edited("embed", &|c| {
        c["target_modules"] = json!(["embed_tokens", "q_proj"])
    });
    let dora = edited("dora", &|c| c["use_dora"] = json!(true));
    let not_targeted = edited("not-targeted", &|c| c["target_modules"] = json!(["q_proj"]));
    let rank_config = edited("rank-config", &|c| c["r"] = json!(4));
    // Shapes of another model: a tiny Llama's adapter.
    let tiny = root.join("tiny-lora");
    let spec = AdapterSpec {
        r: 4,
        alpha: 8.0,
        rslora: false,
        targets: &["q_proj"],
        rank_pattern: &[],
        alpha_pattern: &[],
        layers: 2,
        scale: 0.1,
        base_model: None,
    };
    write_adapter(&tiny, &tiny_config("LlamaForCausalLM"), &spec, 4);
    // An adapter trained on the rev25 checkpoint, loaded onto another plan.
    let pruned = root.join("pruned");
    pruneserve::checkpoint::prune::prune_checkpoint(
        &pruneserve::checkpoint::ModelDir::open(&smollm2_dir()).unwrap(),
        "smollm2",
        &PlanSpec::Reverse(0.25),
        &pruned,
    )
    .unwrap();
    let on_pruned = root.join("on-pruned");
    let spec = AdapterSpec {
        layers: 22,
        base_model: Some(&pruned),
        targets: &["o_proj"],
        ..spec
    };
    write_adapter(&on_pruned, &smollm2_config(), &spec, 5);
    let file = good.join("adapter_config.json");

    let s = ServerProc::start_default(&["--max-lora-rank", "16", "--max-loras", "2"]);
    let cases: Vec<(&Path, Option<&str>, u16, &str)> = vec![
        (&file, None, 400, "not a directory"),
        (Path::new("/no/such/dir"), None, 400, "not a directory"),
        (&no_weights, None, 400, "adapter_model.safetensors: missing"),
        (&tiny, None, 400, "has shape"),
        (&high_rank, None, 400, "above --max-lora-rank 16"),
        (&embed, None, 400, "target_modules"),
        (&dora, None, 400, "use_dora"),
        (&not_targeted, None, 400, "not named by target_modules"),
        (
            &rank_config,
            None,
            400,
            "rank 8 in the weights, 4 in adapter_config.json",
        ),
        (
            &on_pruned,
            Some("smollm2-135m"),
            400,
            "trained on base layers 0-21",
        ),
        (&good, Some("nonexistent"), 404, "does not exist"),
    ];
    for (i, (path, on, status, needle)) in cases.iter().enumerate() {
        let (got, r) = load(&s, &format!("bad{i}"), path, *on);
        assert_eq!(got, *status, "{}: {r}", path.display());
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{}: {msg}", path.display());
    }
    // The adapter trained on the pruned checkpoint serves on its own plan.
    assert_eq!(load(&s, "rev25-ft", &on_pruned, Some("rev25")).0, 200);
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "rev25-ft@drop=3", "prompt": [1, 2], "max_tokens": 1}"#,
    );
    assert_eq!(status, 400, "{r}");
    assert_eq!(load(&s, "good", &good, None).0, 200);
    let (status, r) = load(&s, "good", &good, None);
    assert_eq!(status, 409, "{r}");
    let (status, r) = load(&s, "third", &good, None);
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-loras"));
    let (status, _) = s.post("/v1/unload_lora_adapter", r#"{"lora_name": "rev25"}"#);
    assert_eq!(status, 400);
    let (status, _) = s.post("/v1/unload_lora_adapter", r#"{"lora_name": "nothing"}"#);
    assert_eq!(status, 404);
    let (status, r) = s.post(
        "/v1/completions",
        r#"{"model": "good", "prompt": [1, 2, 3], "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{r}");
}

#[test]
fn adapters_declared_at_start_by_flag_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("a");
    write_smollm2_adapter(&adapter, 4, &["q_proj", "down_proj"], 9);
    let dir = smollm2_dir();
    let flag = format!("rec=reverse:0.25+adapter:{}", adapter.display());
    let s = ServerProc::start(&["--model", dir.to_str().unwrap(), "--variant", &flag]);
    let cards = s.get("/v1/models");
    let rec = cards["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "rec")
        .unwrap()
        .clone();
    assert_eq!(rec["dropped_layers"], json!((22..30).collect::<Vec<_>>()));
    assert_eq!(
        rec["adapter"]["target_modules"],
        json!(["q_proj", "down_proj"])
    );
    let prompt = pseudo_tokens(12, 49152, 1);
    let by_flag = s.echo_logprobs("rec", &prompt);
    drop(s);

    let manifest = tmp.path().join("m.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[model]]\nname = \"smol\"\nsource = \"{}\"\nlayers = 30\n[[model.variant]]\nname = \"rec\"\nreverse = 0.25\nadapter = \"{}\"\n",
            dir.display(),
            adapter.display()
        ),
    )
    .unwrap();
    let s = ServerProc::start(&["--manifest", manifest.to_str().unwrap()]);
    assert_eq!(s.echo_logprobs("rec", &prompt), by_flag);
}
