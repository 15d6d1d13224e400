//! The checkpoint commands on the CLI: bad input gives one line, a non-zero exit and no output
//! directory; the happy paths, including a hub id resolved from the offline cache.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn pruneserve(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pruneserve"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn assert_one_line_failure(args: &[&str], out_dir: &Path, needle: &str) {
    let (ok, _, err) = pruneserve(args);
    assert!(!ok, "{args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{err:?} lacks {needle:?}"
    );
    assert!(
        !out_dir.exists(),
        "partial output left at {}",
        out_dir.display()
    );
    let parent = out_dir.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging directory left behind");
}

#[test]
fn import_gguf_rejects_corrupt_and_truncated_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    assert_one_line_failure(
        &[
            "import-gguf",
            garbage.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &out,
        "gguf",
    );

    let real = std::fs::read(smollm2_gguf()).unwrap();
    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    assert_one_line_failure(
        &[
            "import-gguf",
            truncated.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &out,
        "truncated",
    );
    let header_only = tmp.path().join("header.gguf");
    std::fs::write(&header_only, &real[..5000]).unwrap();
    assert_one_line_failure(
        &[
            "import-gguf",
            header_only.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &out,
        "gguf",
    );
}

#[test]
fn prune_rejects_invalid_layer_lists_and_prunes_valid_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_tiny(tmp.path(), "base", tiny_config("LlamaForCausalLM"), 1);
    let out = tmp.path().join("pruned");
    let b = base.to_str().unwrap();
    let o = out.to_str().unwrap();
    assert_one_line_failure(
        &["prune", "--model", b, "--drop", "4-9", o],
        &out,
        "out of range",
    );
    assert_one_line_failure(
        &["prune", "--model", b, "--keep", "0,1,1", o],
        &out,
        "twice",
    );
    assert_one_line_failure(
        &["prune", "--model", b, "--drop", "3-x", o],
        &out,
        "not a layer index",
    );
    assert_one_line_failure(
        &["prune", "--model", b, "--drop", "0-5", o],
        &out,
        "no layers",
    );
    let (ok, stdout, err) = pruneserve(&["prune", "--model", b, "--reverse", "0.34", o]);
    assert!(ok, "{err}");
    assert!(stdout.contains("4 of 6 layers"), "{stdout}");
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_tiny(tmp.path(), "base", tiny_config("LlamaForCausalLM"), 1);
    // Rewrite the weights without one tensor.
    let weights = base.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.layers.2.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let (ok, _, err) = pruneserve(&["serve", "--model", base.to_str().unwrap(), "--port", "0"]);
    assert!(!ok);
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(
        err.contains("missing tensor `model.layers.2.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config("LlamaForCausalLM");
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    let like = tmp.path().join("config.json");
    std::fs::write(&like, cfg.to_string()).unwrap();
    let out = tmp.path().join("out");
    assert_one_line_failure(
        &[
            "init-random",
            "--like",
            like.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &out,
        "unknown architecture `FalconForCausalLM`",
    );
}

#[test]
fn init_random_and_import_round_trip_on_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let like = tmp.path().join("like.json");
    std::fs::write(&like, tiny_config("Qwen2ForCausalLM").to_string()).unwrap();
    let out = tmp.path().join("qwen");
    let (ok, _, err) = pruneserve(&[
        "init-random",
        "--like",
        like.to_str().unwrap(),
        out.to_str().unwrap(),
        "--layers",
        "3",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
    ]);
    assert!(ok, "{err}");
    let dir = pruneserve::checkpoint::ModelDir::open(&out).unwrap();
    assert_eq!(
        (
            dir.config.num_hidden_layers,
            dir.config.hidden_size,
            dir.config.head_dim
        ),
        (3, 32, 16)
    );
    load_cpu(&out);
    // The output directory now exists: a second run must refuse rather than overwrite.
    let (ok, _, err) = pruneserve(&[
        "init-random",
        "--like",
        like.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("exists"), "{err}");
}

#[test]
fn a_hub_id_resolves_from_the_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // The hub cache layout: hub/models--ORG--NAME/{refs/main, snapshots/REV/...}.
    let repo = tmp.path().join("hub/models--tiny-org--tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    write_tiny(
        &repo.join("snapshots"),
        "0123abcd",
        tiny_config("LlamaForCausalLM"),
        1,
    );
    let out = tmp.path().join("pruned");
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_pruneserve"))
            .args(["prune", "--model", id, "--drop", "0", out.to_str().unwrap()])
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let missing = run("tiny-org/not-there");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the local cache"));
    let found = run("tiny-org/tiny-llama");
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let lineage = pruneserve::checkpoint::ModelDir::open(&out)
        .unwrap()
        .lineage
        .unwrap();
    assert_eq!(lineage.base_model, "tiny-org/tiny-llama");
    assert_eq!(lineage.kept_layers, vec![1, 2, 3, 4, 5]);
}

#[test]
fn options_the_device_cannot_run_are_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let base = write_tiny(tmp.path(), "base", tiny_config("LlamaForCausalLM"), 1);
    for (options, needle) in [
        (
            &["--device", "cpu", "--dtype", "bf16"][..],
            "--dtype bf16 is not available on cpu",
        ),
        (
            &["--device", "cpu", "--dtype", "f16"],
            "--dtype f16 is not available on cpu",
        ),
        (
            &["--device", "cuda", "--dtype", "f16"],
            "--dtype f16 is not available on cuda",
        ),
        (
            &["--device", "cpu", "--sampler", "device"],
            "--sampler device draws on a CUDA device",
        ),
    ] {
        let mut args = vec!["serve", "--model", base.to_str().unwrap(), "--port", "0"];
        args.extend_from_slice(options);
        let (ok, _, err) = pruneserve(&args);
        assert!(!ok);
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    }
}

#[test]
fn a_kv_cache_size_that_is_not_positive_is_refused_in_one_line() {
    for command in ["serve", "bench"] {
        for gb in ["0", "-1", "nan", "inf", "many"] {
            let arg = format!("--kv-cache-gb={gb}");
            let (ok, _, err) = pruneserve(&[command, &arg]);
            assert!(!ok, "{command} --kv-cache-gb {gb} was accepted");
            assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
            assert!(
                err.starts_with("error: ") && err.contains("expected a positive number of GiB"),
                "{err}"
            );
        }
    }
}

#[test]
fn zero_step_budgets_batches_and_prompt_lengths_are_refused_in_one_line() {
    for args in [
        &["serve", "--max-step-tokens", "0"][..],
        &["bench", "--step-tokens", "0"],
        &["bench", "--batches", "1,0"],
        &["bench", "--prompt-len", "0"],
    ] {
        let (ok, _, err) = pruneserve(args);
        assert!(!ok, "{args:?} was accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        assert!(
            err.starts_with("error: ") && err.contains("0 is not in 1.."),
            "{args:?}: {err}"
        );
    }
}
