//! Helpers for tests that run training processes: a background start, a polling wait with a
//! deadline, signals, a process's output as text and its exit status, a run directory to start
//! from and the metrics a run logged.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The CLI a test runs: `$GLATRAIN_BIN` where the test binary runs away from its build (the GPU
/// machine of `scripts/gpu-check.sh`), else `built`, the one cargo built
/// (`env!("CARGO_BIN_EXE_glatrain")`).
pub fn cli_path(built: &str) -> PathBuf {
    std::env::var_os("GLATRAIN_BIN").map_or_else(|| PathBuf::from(built), PathBuf::from)
}

/// Waits (polling every 5 ms, two minutes at most) until `done`.
///
/// # Panics
/// Naming `what` when it does not come in time.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "waited two minutes for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends signal `name` (`TERM`, `INT`, `KILL`, ...) to process `pid` with the shell's builtin
/// `kill` (no procps needed).
///
/// # Panics
/// When `kill` fails.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// Starts `cmd` in the background with its stdout discarded and its stderr kept (for
/// `wait_with_output`).
///
/// # Panics
/// When it cannot start.
pub fn start(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// A process's output (stdout or stderr bytes) as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a finished process exited with `code` and said `says` on stderr.
///
/// # Panics
/// Otherwise, showing its stderr.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32, says: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    assert!(err.contains(says), "{says:?} is not in its stderr:\n{err}");
}

/// Asserts that a finished process exited with 0.
///
/// # Panics
/// Otherwise, showing its stderr.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert_exit(out, 0, "");
}

/// A temporary directory holding one file, `name` with `contents` (a config to run from it).
///
/// # Panics
/// When the directory or the file cannot be made.
pub fn dir_with(name: &str, contents: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), contents).unwrap();
    dir
}

/// The `step` and `key` of every record of `run_dir`'s metrics.jsonl that has `key` (none while
/// the file does not exist).
pub fn logged_series(run_dir: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
        .collect()
}
