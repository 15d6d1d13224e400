//! The Kubernetes manifests in deploy/ are valid against the Kubernetes schemas (strict: unknown
//! fields refused), checked with `kubernetes-validate` from PyPI (tests/reference/requirements.txt);
//! the same validator refuses a broken copy; the models ConfigMap holds a manifest pruneserve reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use pruneserve::manifest::Manifest;

const KUBERNETES_VERSION: &str = "1.33.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let python = std::env::var("PRUNESERVE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(files)
        .output()
        .expect("python3 with kubernetes-validate (scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn deploy_manifests_pass_strict_schema_validation_and_a_broken_one_fails() {
    let files = manifests();
    let kinds = [
        "deployment",
        "service",
        "horizontalpodautoscaler",
        "persistentvolumeclaim",
        "configmap",
    ];
    let (ok, text) = validate(&files);
    println!("{text}");
    assert!(ok, "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        files.len(),
        "{text}"
    );
    for kind in kinds {
        assert!(
            text.contains(&format!("resource {kind}/")),
            "no {kind}: {text}"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let deployment = std::fs::read_to_string(deploy_dir().join("deployment.yaml")).unwrap();
    let broken = tmp.path().join("deployment.yaml");
    std::fs::write(
        &broken,
        deployment.replace("  replicas: 1", "  replicaCount: 1"),
    )
    .unwrap();
    let (ok, text) = validate(&[broken]);
    assert!(!ok && text.contains("replicaCount"), "{text}");
}

#[test]
fn the_models_configmap_holds_a_pruneserve_manifest() {
    let script = "import sys, yaml; sys.stdout.write(yaml.safe_load(open(sys.argv[1]))['data']['models.toml'])";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(deploy_dir().join("configmap-models.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("models.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    let m = Manifest::read(&path).unwrap();
    assert_eq!(m.models.len(), 1);
    assert!(!m.models[0].variants.is_empty());
}
