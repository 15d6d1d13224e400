//! Runs untrusted generated Python (HumanEval/MBPP programs) one sample per process: a temp dir
//! as working directory, resource limits (CPU time, address space, file size, processes), a
//! wall-clock deadline that kills the whole process group, no network (a fresh network namespace
//! via `unshare -n` where the system allows it), and human-eval's `reliability_guard` prelude that
//! disables process, file-deletion and kill functions inside Python. Run as root, samples also
//! drop to user `nobody` (`setpriv`), so files outside their temp dir cannot be deleted.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::workers::run_indexed;

/// Limits for one program.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub wall: Duration,
    pub cpu_seconds: u64,
    pub memory_bytes: u64,
    pub file_bytes: u64,
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(10),
            cpu_seconds: 10,
            memory_bytes: 2 << 30,
            file_bytes: 16 << 20,
            processes: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    pub outcome: Outcome,
    /// The end of stderr, for the records.
    pub stderr_tail: String,
}

/// Python run before the program: human-eval's reliability guard (execution.py), which makes
/// destructive functions unusable, plus a socket guard for systems without network namespaces.
const GUARD: &str = r#"
import builtins, os, shutil, subprocess, sys, socket, faulthandler
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
              "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "getcwd", "chdir",
              "spawnl", "spawnv", "execv", "execve", "popen", "posix_spawn", "setsid", "setpgid"]:
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
builtins.help = None
for _mod in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
    sys.modules[_mod] = None
del _name, _mod
"#;

/// How samples are isolated on this machine, decided once per run.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// The interpreter itself (`sys.executable`), not a shim in front of it.
    pub python: String,
    /// `unshare -n`: an empty network namespace.
    pub network_namespace: bool,
    /// Running as root with `setpriv`: samples run as `nobody`.
    pub drop_to_nobody: bool,
}

impl Isolation {
    pub fn detect() -> Self {
        let python = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "python3".into());
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // `nobody` must be able to run the interpreter (not so when it lives under /root).
        let nobody_runs_python = root
            && Command::new("setpriv")
                .args(NOBODY)
                .args([python.as_str(), "-c", "pass"])
                .current_dir("/")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        Self {
            python,
            network_namespace: network_namespace_available(),
            drop_to_nobody: nobody_runs_python,
        }
    }
}

const NOBODY: [&str; 4] = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];

/// Whether `unshare -n` can give programs an empty network namespace here.
pub fn network_namespace_available() -> bool {
    Command::new("unshare")
        .args(["-n", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn set_limits(l: &Limits) -> std::io::Result<()> {
    let set = |resource, value: u64| {
        let lim = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        // SAFETY: setrlimit only reads `lim`.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::RLIMIT_CPU, l.cpu_seconds)?;
    set(libc::RLIMIT_AS, l.memory_bytes)?;
    set(libc::RLIMIT_FSIZE, l.file_bytes)?;
    set(libc::RLIMIT_NPROC, l.processes)?;
    set(libc::RLIMIT_CORE, 0)?;
    Ok(())
}

/// Runs `program` with `python3` in a fresh temp dir under `limits`; passed iff it exits 0 in time.
pub fn run_python(program: &str, limits: &Limits, iso: &Isolation) -> Execution {
    let failed = |msg: String| Execution {
        outcome: Outcome::Failed,
        stderr_tail: msg,
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return failed(format!("sandbox temp dir: {e}")),
    };
    let path = dir.path().join("program.py");
    if let Err(e) = std::fs::write(&path, format!("{GUARD}\n{program}\n")) {
        return failed(format!("sandbox write: {e}"));
    }
    let mut argv: Vec<&str> = Vec::new();
    if iso.network_namespace {
        argv.extend(["unshare", "-n", "--"]);
    }
    if iso.drop_to_nobody {
        use std::os::unix::fs::PermissionsExt;
        let open =
            |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
        if let Err(e) = open(dir.path(), 0o777).and_then(|_| open(&path, 0o644)) {
            return failed(format!("sandbox permissions: {e}"));
        }
        argv.push("setpriv");
        argv.extend(NOBODY);
    }
    argv.push(&iso.python);
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .arg(&path)
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .env("TMPDIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let limits_copy = *limits;
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (setpgid, setrlimit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_limits(&limits_copy)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("sandbox spawn: {e}")),
    };
    let pgid = child.id() as i32;
    let deadline = Instant::now() + limits.wall;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    // Whatever happened, nothing of the group may outlive the sample.
    // SAFETY: signals the sample's own process group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.wait();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let tail: String = {
        let chars: Vec<char> = stderr.chars().collect();
        chars[chars.len().saturating_sub(600)..].iter().collect()
    };
    let outcome = match status {
        None => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Passed,
        Some(_) => Outcome::Failed,
    };
    Execution {
        outcome,
        stderr_tail: tail,
    }
}

/// Runs many programs, `parallel` at a time; results in input order.
pub fn run_many(
    programs: &[String],
    limits: &Limits,
    iso: &Isolation,
    parallel: usize,
) -> Vec<Execution> {
    run_indexed(
        programs.len(),
        parallel,
        |i| Ok(run_python(&programs[i], limits, iso)),
        || "a sample was not run".to_string(),
    )
    .unwrap_or_else(|message| {
        programs
            .iter()
            .map(|_| Execution {
                outcome: Outcome::Failed,
                stderr_tail: message.clone(),
            })
            .collect()
    })
}
