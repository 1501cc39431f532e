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

#[test]
fn export_and_text_evaluation_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("configs/transformer-tiny.toml");
    let trained = glatrain(
        &[
            "--config",
            config.to_str().unwrap(),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.eval_batches=1",
        ],
        dir.path(),
    );
    assert_eq!(trained.status.code(), Some(0), "{}", stderr(&trained));

    let run = "runs/transformer-tiny";
    let export = glatrain(
        &[
            "export",
            "--checkpoint",
            run,
            "--out",
            "hf",
            "--dtype",
            "bf16",
        ],
        dir.path(),
    );
    assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
    let said = String::from_utf8_lossy(&export.stdout);
    assert!(said.contains("LlamaForCausalLM (bf16 weights)"), "{said}");
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        assert!(dir.path().join("hf").join(file).is_file(), "{file}");
    }
    let again = glatrain(&["export", "--checkpoint", run, "--out", "hf"], dir.path());
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    let forced = glatrain(
        &["export", "--checkpoint", run, "--out", "hf", "--force"],
        dir.path(),
    );
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));

    std::fs::write(
        dir.path().join("wiki.txt"),
        "The jury said it did. ".repeat(20),
    )
    .unwrap();
    let eval = glatrain(
        &[
            "eval",
            "--checkpoint",
            run,
            "--text",
            "wiki.txt",
            "--json",
            "eval.json",
        ],
        dir.path(),
    );
    assert_eq!(eval.status.code(), Some(0), "{}", stderr(&eval));
    let table = String::from_utf8_lossy(&eval.stdout);
    assert!(
        table.contains("4 non-overlapping windows of up to 128 predicted tokens"),
        "{table}"
    );
    let json = std::fs::read_to_string(dir.path().join("eval.json")).unwrap();
    assert!(json.contains("\"predicted\": 439"), "{json}");

    // The same checkpoint through transformers' LlamaForCausalLM, where this Python has it
    // (GLATRAIN_HF_PYTHON names another interpreter); the script says when it skips.
    let python = std::env::var("GLATRAIN_HF_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = repo().join("scripts/check-hf-export.py");
    match Command::new(&python)
        .arg(&script)
        .args(["--glatrain", env!("CARGO_BIN_EXE_glatrain"), run])
        .current_dir(dir.path())
        .output()
    {
        Ok(check) => {
            let said = String::from_utf8_lossy(&check.stdout);
            println!("{said}");
            assert_eq!(check.status.code(), Some(0), "{said}{}", stderr(&check));
        }
        Err(e) => println!("check-hf-export.py skipped: cannot run {python}: {e}"),
    }
}

#[test]
fn export_and_text_evaluation_refuse_bad_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = glatrain(
        &["export", "--checkpoint", "runs/none", "--out", "hf"],
        dir.path(),
    );
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("runs/none"),
        "{}",
        stderr(&missing)
    );
    let dtype = glatrain(
        &[
            "export",
            "--checkpoint",
            "x",
            "--out",
            "hf",
            "--dtype",
            "fp8",
        ],
        dir.path(),
    );
    assert_eq!(dtype.status.code(), Some(2));
    assert!(stderr(&dtype).contains("fp8"), "{}", stderr(&dtype));
    let both = glatrain(
        &[
            "eval",
            "--checkpoint",
            "x",
            "--text",
            "a.txt",
            "--data",
            "embedded",
        ],
        dir.path(),
    );
    assert_eq!(both.status.code(), Some(2));
    assert!(stderr(&both).contains("--data"), "{}", stderr(&both));
    assert!(!dir.path().join("hf").exists());
}
