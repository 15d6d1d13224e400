//! pruneval against the real server: arc_easy on the base and a pruned variant, loglikelihoods
//! equal to the engine's own scoring, resume from the response cache, comparison, bad input.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::server::ServerProc;
use common::*;
use pruneserve::plan::LayerPlan;
use pruneval::client::{Client, ClientError};
use pruneval::loglikelihood::encode_pair;
use pruneval::{compare, eval, tasks};

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

#[test]
fn arc_easy_on_base_and_variant_with_resume_and_comparison() {
    let s = ServerProc::start_default(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let docs: Vec<_> = tasks::load("arc_easy", &data_dir())
        .unwrap()
        .into_iter()
        .take(20)
        .collect();

    let client = Client::new(&s.url("/v1"), None, Some(cache.clone()));
    let base = eval::run_task(&client, "smollm2-135m", "arc_easy", &docs, 4).unwrap();
    let first_requests = client.requests_sent();
    assert!(first_requests > 0);
    assert_eq!(base.items.len(), 20);
    println!(
        "arc_easy n=20: base acc {:.3} acc_norm {:.3}",
        base.acc, base.acc_norm
    );
    assert!(
        base.acc > 0.3,
        "a real model beats chance (0.25) on arc_easy: {}",
        base.acc
    );

    // Item 0's loglikelihoods equal the engine scoring the same token ids.
    let loaded = pruneserve::loaded::LoadedModel::load(
        smollm2_dir().to_str().unwrap(),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let plan = Arc::new(LayerPlan::full(30));
    for (c, (ctx, cont)) in docs[0]
        .contexts
        .iter()
        .zip(&docs[0].continuations)
        .enumerate()
    {
        let (ce, xe) = encode_pair(ctx, cont, |t| {
            Ok::<_, ClientError>(loaded.encode(t, false).unwrap())
        })
        .unwrap();
        let prompt: Vec<u32> = ce.iter().chain(&xe).copied().collect();
        let lps = score_all(&loaded.model, &plan, &[prompt])[0].clone();
        let want: f64 = lps[ce.len() - 1..].iter().map(|&x| x as f64).sum();
        assert!(
            (base.items[0].loglikelihoods[c] - want).abs() < 1e-4,
            "choice {c}: {} vs {want}",
            base.items[0].loglikelihoods[c]
        );
    }

    // A re-run is served from the cache; a run that lost part of its cache sends only the missing.
    let again = Client::new(&s.url("/v1"), None, Some(cache.clone()));
    eval::run_task(&again, "smollm2-135m", "arc_easy", &docs, 4).unwrap();
    assert_eq!(again.requests_sent(), 0);
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), first_requests);
    for f in files.iter().take(5) {
        std::fs::remove_file(f).unwrap();
    }
    let resumed = Client::new(&s.url("/v1"), None, Some(cache.clone()));
    let r = eval::run_task(&resumed, "smollm2-135m", "arc_easy", &docs, 4).unwrap();
    assert_eq!(resumed.requests_sent(), 5);
    assert_eq!(
        r.items.iter().map(|i| i.pred).collect::<Vec<_>>(),
        base.items.iter().map(|i| i.pred).collect::<Vec<_>>()
    );

    let rev = eval::run_task(&client, "rev25", "arc_easy", &docs, 4).unwrap();
    let out = tmp.path().join("results");
    eval::write_result(&out, &base).unwrap();
    eval::write_result(&out, &rev).unwrap();
    let b = eval::read_result(&out, "smollm2-135m", "arc_easy").unwrap();
    let v = eval::read_result(&out, "rev25", "arc_easy").unwrap();
    let row = compare::compare(&b, &v, false).unwrap();
    let table = compare::markdown("smollm2-135m", std::slice::from_ref(&row));
    println!("{table}");
    assert!((row.retention - rev.acc / base.acc).abs() < 1e-12);
    assert!(row.retention_ci.0 <= row.retention && row.retention <= row.retention_ci.1);
    assert!(table.contains("| arc_easy | rev25 | 20 |"));
}

#[test]
fn bad_input_gives_one_clear_error() {
    let err = tasks::load("hellaswag_typo", &data_dir()).unwrap_err();
    assert!(err.to_string().contains("unknown task `hellaswag_typo`"));
    let nowhere = Client::new("http://127.0.0.1:9", None, None);
    let docs: Vec<_> = tasks::load("piqa", &data_dir())
        .unwrap()
        .into_iter()
        .take(1)
        .collect();
    let e = eval::run_task(&nowhere, "m", "piqa", &docs, 1).unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    let s = ServerProc::start_default(&[]);
    let client = Client::new(&s.base, None, None);
    let e = eval::run_task(&client, "no-such-model", "piqa", &docs, 1).unwrap_err();
    assert!(matches!(e, ClientError::Status { status: 404, .. }), "{e}");
    assert!(e.to_string().contains("does not exist"));
}
