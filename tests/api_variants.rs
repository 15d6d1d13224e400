//! Variants over HTTP: lineage in /v1/models, runtime plan variants that serve at once for almost
//! no memory, ad-hoc `@drop=` plans, removal, and a manifest-started server.

mod common;

use std::sync::Arc;

use common::server::{rss_bytes, ServerProc};
use common::*;
use pruneserve::plan::{LayerPlan, PlanSpec};
use serde_json::{json, Value};

#[test]
fn runtime_variants_serve_at_once_and_share_the_weights() {
    let dir = smollm2_dir();
    let s = ServerProc::start(&[
        "--manifest",
        concat!(env!("CARGO_MANIFEST_DIR"), "/models/default.toml"),
    ]);
    let models = s.get("/v1/models");
    let cards = models["data"].as_array().unwrap();
    let ids: Vec<&str> = cards.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smollm2-135m", "rev25", "drop-mid"]);
    assert_eq!(
        cards[2]["dropped_layers"],
        json!((11..19).collect::<Vec<_>>())
    );
    assert_eq!(cards[2]["parent"], "smollm2-135m");
    assert_eq!(cards[0]["max_model_len"], 8192);

    let prompt = pseudo_tokens(24, 49152, 9);
    s.echo_logprobs("smollm2-135m", &prompt);
    let before = rss_bytes(s.pid());
    let (status, card) = s.post(
        "/v1/variants",
        r#"{"base": "smollm2-135m", "name": "no-3-7", "drop": "3,7"}"#,
    );
    assert_eq!(status, 201, "{card}");
    assert_eq!(card["dropped_layers"], json!([3, 7]));
    assert_eq!(card["created_at_runtime"], true);
    let served = s.echo_logprobs("no-3-7", &prompt);
    let after = rss_bytes(s.pid());
    let weights = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    let growth = after.saturating_sub(before);
    println!(
        "RSS before {before}, after {after}: +{growth} bytes = {:.2}% of {weights} weight bytes",
        100.0 * growth as f64 / weights as f64
    );
    assert!((growth as f64) < 0.05 * weights as f64);

    let model = load_cpu(&dir);
    let plan = Arc::new(PlanSpec::Drop(vec![3, 7].into()).resolve(30).unwrap());
    assert_eq!(
        served,
        score_all(&model, &plan, std::slice::from_ref(&prompt))[0]
    );
    // An ad-hoc plan needs no setup and gives the same numbers.
    assert_eq!(s.echo_logprobs("smollm2-135m@drop=3,7", &prompt), served);
    let keep = Arc::new(LayerPlan::new((0..20).collect(), 30).unwrap());
    assert_eq!(
        s.echo_logprobs("smollm2-135m@keep=0-19", &prompt),
        score_all(&model, &keep, std::slice::from_ref(&prompt))[0]
    );

    for (body, status) in [
        (
            r#"{"base": "smollm2-135m", "name": "no-3-7", "drop": [1]}"#,
            409,
        ),
        (r#"{"base": "nope", "name": "x", "drop": [1]}"#, 404),
        (
            r#"{"base": "smollm2-135m", "name": "x", "drop": [30]}"#,
            400,
        ),
        (
            r#"{"base": "smollm2-135m", "name": "x", "keep": [1, 1]}"#,
            400,
        ),
        (
            r#"{"base": "smollm2-135m", "name": "x", "drop": [1], "reverse": 0.5}"#,
            400,
        ),
        (
            r#"{"base": "smollm2-135m", "name": "bad@name", "drop": [1]}"#,
            400,
        ),
    ] {
        let (got, r) = s.post("/v1/variants", body);
        assert_eq!(got, status, "{body}: {r}");
        assert!(r["error"]["message"].is_string());
    }
    for (model, status) in [
        ("smollm2-135m@drop=30", 400),
        ("smollm2-135m@drop=1,1", 400),
        ("smollm2-135m@cut=1", 400),
        ("nope@drop=1", 404),
    ] {
        let (got, r) = s.post(
            "/v1/completions",
            &json!({"model": model, "prompt": [1, 2], "max_tokens": 1}).to_string(),
        );
        assert_eq!(got, status, "{model}: {r}");
    }

    let del = reqwest::blocking::Client::new()
        .delete(s.url("/v1/variants/no-3-7"))
        .send()
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);
    let (status, _) = s.post(
        "/v1/completions",
        &json!({"model": "no-3-7", "prompt": [1, 2], "max_tokens": 1}).to_string(),
    );
    assert_eq!(status, 404);
    let del = reqwest::blocking::Client::new()
        .delete(s.url("/v1/variants/smollm2-135m"))
        .send()
        .unwrap();
    assert_eq!(del.status().as_u16(), 400, "a base cannot be deleted");
    let ids: Vec<Value> = s.get("/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!("smollm2-135m"), json!("rev25"), json!("drop-mid")]
    );
}

#[test]
fn shipped_manifests_parse_and_their_layer_lists_fit() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m = pruneserve::manifest::Manifest::read(&path).unwrap_or_else(|e| panic!("{e}"));
        for base in &m.models {
            assert!(
                base.layers.is_some(),
                "{}: give `layers` so variants are checked",
                path.display()
            );
            seen += base.variants.len();
        }
    }
    assert!(seen >= 9);
    let llama = pruneserve::manifest::Manifest::read(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama-3.1-8b-instruct.toml"),
    )
    .unwrap();
    let bi = llama.models[0].variants[0].kind().unwrap();
    assert_eq!(
        bi,
        pruneserve::manifest::VariantKind::Plan {
            spec: PlanSpec::Drop((22..30).collect()),
            adapter: None,
            overlay: None
        }
    );
}
