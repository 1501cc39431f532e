//! The command line as users meet it: exit codes (0 success, 2 bad usage / config / input) and
//! messages that name the file, the key and the value.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn glatrain(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glatrain"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the glatrain binary runs")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_succeeds_and_missing_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let help = glatrain(&["--help"], dir.path());
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config <FILE>"));
    let bare = glatrain(&[], dir.path());
    assert_eq!(bare.status.code(), Some(2));
    assert!(stderr(&bare).contains("--config"), "{}", stderr(&bare));
}

#[test]
fn config_errors_exit_2_and_name_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let missing = glatrain(&["--config", "nope.toml"], dir.path());
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("nope.toml"),
        "{}",
        stderr(&missing)
    );

    std::fs::write(
        dir.path().join("bad.toml"),
        "[model]\ntype = \"gla\"\nhidden_size = 1024\nnum_heads = 3\n",
    )
    .unwrap();
    let bad = glatrain(&["--config", "bad.toml"], dir.path());
    assert_eq!(bad.status.code(), Some(2));
    let msg = stderr(&bad);
    assert!(msg.contains("bad.toml: model.num_heads = 3"), "{msg}");

    let config = repo().join("configs/gla-tiny.toml");
    let config = config.to_str().unwrap();
    let unknown = glatrain(&["--config", config, "--set", "train.lrr=1"], dir.path());
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("train.lrr"),
        "{}",
        stderr(&unknown)
    );
    // Nothing was written for any of these.
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn preflight_explains_the_cpu_choice() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("configs/gla-tiny.toml");
    let out = glatrain(
        &["preflight", "--config", config.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("reference"), "{table}");
    assert!(
        table.contains("CPU: the CUDA kernels need a GPU"),
        "{table}"
    );
}

#[test]
fn bench_arguments_are_checked_before_any_gpu_work() {
    let dir = tempfile::tempdir().unwrap();
    for (args, words) in [
        (
            &["bench", "--preset", "paper"][..],
            "bench: --preset \"paper\": expected one of article",
        ),
        (
            &["bench", "--preset", "article", "--op", "chunk"][..],
            "a preset's rows are fixed",
        ),
        (
            &["bench", "--op", "chunk", "--scan-shape", "8x2048x2048x16"][..],
            "--scan-shape is for selective_scan",
        ),
        (
            &["bench", "--scan-shape", "8x2048x2048"][..],
            "expected BxTxDxN",
        ),
    ] {
        let out = glatrain(args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(words), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bad_data_and_checkpoints_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let prepare = glatrain(
        &["prepare", "--input", "empty", "--out", "tokens"],
        dir.path(),
    );
    assert_eq!(prepare.status.code(), Some(2), "{}", stderr(&prepare));
    assert!(stderr(&prepare).contains("empty"), "{}", stderr(&prepare));
    assert!(!dir.path().join("tokens").exists());

    let eval = glatrain(&["eval", "--checkpoint", "runs/none"], dir.path());
    assert_eq!(eval.status.code(), Some(2), "{}", stderr(&eval));
    assert!(stderr(&eval).contains("runs/none"), "{}", stderr(&eval));
}
