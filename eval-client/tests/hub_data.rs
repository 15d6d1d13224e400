//! Task data from the hub: a stand-in hub (tests/reference/hub_fixture.py: parquet written by
//! pyarrow in the hub schemas, an HF cache layout, and an HTTP server speaking the hub API) is
//! read offline from the cache and online through HF_ENDPOINT; the documents must equal those
//! the same items give from ../shared/data.
//!
//! One test function: the hub settings are process environment variables.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use pruneval::{gen_tasks, hub_data, tasks};

const ROWS: usize = 6;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared_data() -> PathBuf {
    root().join("../shared/data")
}

fn fixture() -> Command {
    let mut c = Command::new("python3");
    c.arg(root().join("tests/reference/hub_fixture.py"));
    c
}

/// The hub server, killed on drop.
struct MockHub(Child);

impl Drop for MockHub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn choice_docs(task: &str, dir: &Path) -> Vec<tasks::Doc> {
    tasks::load(task, dir).unwrap_or_else(|e| panic!("{task}: {e}"))
}

fn gen_docs(task: &str, dir: &Path) -> Vec<gen_tasks::GenDoc> {
    gen_tasks::load(task, dir).unwrap().unwrap()
}

/// Every task the fixture wrote, materialised from the hub into `dir`, equals the first rows of
/// the same task from ../shared/data.
fn check_tasks_match_shared(dir: &Path) {
    let shared = shared_data();
    for task in ["arc_easy", "piqa", "arithmetic"] {
        hub_data::materialize(task, dir).unwrap_or_else(|e| panic!("{task}: {e}"));
        let from_hub = choice_docs(task, dir);
        let local = choice_docs(task, &shared);
        // arithmetic keeps only one-digit answers, so compare what survives of the rows.
        let n = from_hub.len();
        assert!(n > 0, "{task}: no docs from the hub");
        assert_eq!(from_hub, local[..n], "{task}");
    }
    hub_data::materialize("winogrande", dir).unwrap();
    assert_eq!(
        choice_docs("winogrande", dir),
        choice_docs("winogrande", &shared)[..2]
    );
    for task in ["gsm8k", "gsm8k_chat", "humaneval"] {
        hub_data::materialize(task, dir).unwrap_or_else(|e| panic!("{task}: {e}"));
        let from_hub = gen_docs(task, dir);
        assert_eq!(from_hub.len(), ROWS, "{task}");
        assert_eq!(from_hub, gen_docs(task, &shared)[..ROWS], "{task}");
    }
    // mmlu: two subjects, shots from dev; the shared files hold all 57, sorted by subject.
    hub_data::materialize("mmlu", dir).unwrap();
    let from_hub = choice_docs("mmlu", dir);
    let local = choice_docs("mmlu", &shared);
    assert_eq!(from_hub.len(), 2 * ROWS);
    assert_eq!(from_hub[..ROWS], local[..ROWS], "mmlu abstract_algebra");
    let anatomy = local
        .iter()
        .position(|d| d.contexts[0].contains("about anatomy."))
        .unwrap();
    assert_eq!(
        from_hub[ROWS..],
        local[anatomy..anatomy + ROWS],
        "mmlu anatomy"
    );
}

#[test]
fn hub_data_offline_cache_and_online_endpoint_match_local_files() {
    let tmp = tempfile::tempdir().unwrap();
    let published = tmp.path().join("published-hf-home");
    let status = fixture()
        .args(["write-cache"])
        .arg(&published)
        .arg(shared_data())
        .arg(ROWS.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "hub_fixture.py write-cache failed");

    // Offline: only the cache is read.
    std::env::set_var("HF_HOME", &published);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::remove_var("HF_ENDPOINT");
    check_tasks_match_shared(&tmp.path().join("offline-data"));
    let missing = hub_data::materialize("xsum", &tmp.path().join("offline-data")).unwrap_err();
    let message = missing.to_string();
    assert!(
        message.contains("EdinburghNLP/xsum") && message.contains("HF_HUB_OFFLINE"),
        "{message}"
    );

    // Online: an empty cache, files fetched from the stand-in hub through HF_ENDPOINT.
    let mut server = fixture()
        .arg("serve")
        .arg(&published)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let log = server.stderr.take().unwrap();
    let hub = MockHub(server);
    let fresh = tmp.path().join("fresh-hf-home");
    std::env::set_var("HF_HOME", &fresh);
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", format!("http://127.0.0.1:{}", port.trim()));
    let online = tmp.path().join("online-data");
    check_tasks_match_shared(&online);
    let cached = fresh.join("hub/datasets--allenai--ai2_arc/snapshots");
    assert!(cached.exists(), "downloads land in the hf-hub cache");

    // A task already materialised costs no request; then stop the server and read its log.
    let before = std::fs::read_dir(&online).unwrap().count();
    hub_data::materialize("arc_easy", &online).unwrap();
    assert_eq!(std::fs::read_dir(&online).unwrap().count(), before);
    drop(hub);
    let requests: Vec<String> = BufReader::new(log).lines().map_while(Result::ok).collect();
    let info_calls = requests
        .iter()
        .filter(|l| l.contains("/api/datasets/"))
        .count();
    // One info call per split: arc, piqa, arithmetic, winogrande, gsm8k, humaneval, mmlu x2.
    assert_eq!(info_calls, 8, "{requests:#?}");
    assert!(requests.iter().any(|l| l.contains(
        "/datasets/allenai/ai2_arc/resolve/refs/convert/parquet/ARC-Easy/test/0001.parquet"
    )));
}
