//! The HumanEval sandbox against hostile samples: each is stopped or denied and scored as failed,
//! and the run goes on to the next sample (all run in one batch, beside a correct sample).

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use pruneval::sandbox::{run_many, Isolation, Limits, Outcome};

#[test]
fn hostile_samples_fail_and_the_run_goes_on() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("keep.txt");
    std::fs::write(&victim, "precious").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let v = victim.display();
    let samples = vec![
        ("correct", "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n".to_string()),
        ("loops forever", "while True:\n    pass\n".to_string()),
        ("allocates 10 GB", "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n".to_string()),
        ("forks", "import os\npid = os.fork()\nassert pid is not None\n".to_string()),
        ("forks via subprocess", "import subprocess\nsubprocess.run(['true'])\n".to_string()),
        (
            "opens a socket",
            format!("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'pwned')\n"),
        ),
        (
            "raw socket module",
            format!("import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\ns.send(b'pwned')\n"),
        ),
        ("deletes a file", format!("import os\nos.remove('{v}')\n")),
        ("deletes via pathlib", format!("import pathlib\npathlib.Path('{v}').unlink()\n")),
    ];
    let iso = Isolation::detect();
    println!("isolation here: {iso:?}");
    let limits = Limits {
        wall: Duration::from_secs(5),
        cpu_seconds: 5,
        ..Limits::default()
    };
    let programs: Vec<String> = samples.iter().map(|(_, p)| p.clone()).collect();
    let start = Instant::now();
    let runs = run_many(&programs, &limits, &iso, 4);
    println!(
        "{} samples in {:.1} s",
        runs.len(),
        start.elapsed().as_secs_f64()
    );
    for ((name, _), r) in samples.iter().zip(&runs) {
        println!(
            "{name}: {:?} {}",
            r.outcome,
            r.stderr_tail.lines().last().unwrap_or("")
        );
    }
    assert_eq!(runs[0].outcome, Outcome::Passed, "{}", runs[0].stderr_tail);
    for ((name, _), r) in samples.iter().zip(&runs).skip(1) {
        assert_ne!(r.outcome, Outcome::Passed, "{name} must not pass");
    }
    assert_eq!(runs[1].outcome, Outcome::TimedOut);
    // Nothing reached the listener, and the file outside the sample's dir is intact.
    std::thread::sleep(Duration::from_millis(200));
    if let Ok((mut conn, _)) = listener.accept() {
        let mut got = String::new();
        let _ = conn.read_to_string(&mut got);
        panic!("a sample connected to the host and sent {got:?}");
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}
