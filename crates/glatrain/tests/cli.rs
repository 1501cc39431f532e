//! The command line as users meet it: exit codes (0 success, 2 bad usage / config / input) and
//! messages that name the file, the key and the value.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use glatrain_testing::process::{assert_exit, assert_success, cli_path, logged_series, text};

fn glatrain(args: &[&str], dir: &Path) -> Output {
    Command::new(cli_path(env!("CARGO_BIN_EXE_glatrain")))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the glatrain binary runs")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn help_succeeds_and_missing_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let help = glatrain(&["--help"], dir.path());
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config <FILE|NAME>"));
    let bare = glatrain(&[], dir.path());
    assert_exit(&bare, 2, "--config");
}

#[test]
fn config_errors_exit_2_and_name_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let missing = glatrain(&["--config", "nope.toml"], dir.path());
    assert_exit(&missing, 2, "nope.toml");

    std::fs::write(
        dir.path().join("bad.toml"),
        "[model]\ntype = \"gla\"\nhidden_size = 1024\nnum_heads = 3\n",
    )
    .unwrap();
    let bad = glatrain(&["--config", "bad.toml"], dir.path());
    assert_eq!(bad.status.code(), Some(2));
    let msg = text(&bad.stderr);
    assert!(msg.contains("bad.toml: model.num_heads = 3"), "{msg}");

    let config = repo().join("configs/gla-tiny.toml");
    let config = config.to_str().unwrap();
    let unknown = glatrain(&["--config", config, "--set", "train.lrr=1"], dir.path());
    assert_exit(&unknown, 2, "train.lrr");
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
    assert_success(&out);
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
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(words),
            "{args:?}: {}",
            text(&out.stderr)
        );
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
    assert_exit(&prepare, 2, "empty");
    assert!(!dir.path().join("tokens").exists());

    let eval = glatrain(&["eval", "--checkpoint", "runs/none"], dir.path());
    assert_exit(&eval, 2, "runs/none");
}

#[test]
fn shipped_configs_run_by_name_from_any_directory() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["gla-tiny", "gla-tiny.toml"] {
        let out = glatrain(&["preflight", "--config", name], dir.path());
        assert_success(&out);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("gla-tiny.toml (built in)"), "{table}");
    }
    // A file of that path wins over the shipped config.
    std::fs::write(
        dir.path().join("gla-tiny.toml"),
        "[model]\ntype = \"gla\"\nvocab_size = 256\nhidden_size = 64\nnum_layers = 1\n",
    )
    .unwrap();
    let own = glatrain(&["preflight", "--config", "gla-tiny.toml"], dir.path());
    assert_success(&own);
    let table = String::from_utf8_lossy(&own.stdout);
    assert!(!table.contains("(built in)"), "{table}");

    // Training by name: one step, in a run directory under this directory.
    let other = tempfile::tempdir().unwrap();
    let run = glatrain(
        &[
            "--config",
            "gla-tiny",
            "--set",
            "train.max_steps=1",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.eval_batches=1",
        ],
        other.path(),
    );
    assert_success(&run);
    assert!(other.path().join("runs/gla-tiny/config.toml").exists());

    let unknown = glatrain(&["--config", "gla-341m"], dir.path());
    assert_exit(&unknown, 2, "no such config file; the shipped configs");
}

#[test]
fn configs_lists_the_shipped_configs_and_prints_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = glatrain(&["configs"], dir.path());
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(rows.len(), 9, "{table}");
    assert!(rows.contains(&vec!["gla-340m", "gla", "342M"]), "{table}");
    assert!(rows.contains(&vec!["gla-1.3b", "gla", "1.3B"]), "{table}");
    assert!(rows.contains(&vec!["gla-tiny", "gla", "0.6M"]), "{table}");
    assert!(
        table.contains("Try glatrain without a GPU or a data set"),
        "{table}"
    );

    let text = glatrain(&["configs", "gla-340m"], dir.path());
    assert_eq!(text.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        std::fs::read_to_string(repo().join("configs/gla-340m.toml")).unwrap()
    );
    let unknown = glatrain(&["configs", "nope"], dir.path());
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn missing_data_fails_at_once_saying_how_to_make_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = glatrain(&["--config", "gla-340m"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let msg = text(&out.stderr);
    assert!(
        msg.starts_with(
            "error: gla-340m.toml (built in): data.train = \"data/slimpajama-tokens\": no such \
             file or directory (nor data.valid, the same path); relative paths resolve against \
             the current directory, "
        ),
        "{msg}"
    );
    assert!(
        msg.contains(
            "glatrain prepare --input YOUR_CORPUS --tokenizer bpe:32000 --out \
             data/slimpajama-tokens"
        ),
        "{msg}"
    );
    assert!(
        msg.contains(
            "--set data.train=embedded --set data.valid=embedded --set data.tokenizer=byte"
        ),
        "{msg}"
    );
    // Nothing was built or written.
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn prepare_reads_json_lines_and_stops_at_a_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docs.jsonl"),
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"content\": \"three\"}\n",
    )
    .unwrap();
    let stop = glatrain(
        &["prepare", "--input", "docs.jsonl", "--out", "tokens"],
        dir.path(),
    );
    assert_eq!(stop.status.code(), Some(2), "{}", text(&stop.stderr));
    assert!(
        text(&stop.stderr).starts_with("error: docs.jsonl: line 3: no field \"text\""),
        "{}",
        text(&stop.stderr)
    );
    assert!(!dir.path().join("tokens").exists());

    let skip = glatrain(
        &[
            "prepare",
            "--input",
            "docs.jsonl",
            "--out",
            "tokens",
            "--on-bad-record",
            "skip",
            "--valid-fraction",
            "0",
        ],
        dir.path(),
    );
    assert_success(&skip);
    let stdout = String::from_utf8_lossy(&skip.stdout);
    assert!(stdout.contains("train: 2 documents"), "{stdout}");
    assert!(
        stdout.contains("skipped 1 bad record: 1 missing text field"),
        "{stdout}"
    );
    assert!(
        text(&skip.stderr).contains("skipped bad record: docs.jsonl: line 3"),
        "{}",
        text(&skip.stderr)
    );
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
    assert_success(&trained);

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
    assert_success(&export);
    let said = String::from_utf8_lossy(&export.stdout);
    assert!(said.contains("LlamaForCausalLM (bf16 weights)"), "{said}");
    for file in ["config.json", "generation_config.json", "model.safetensors"] {
        assert!(dir.path().join("hf").join(file).is_file(), "{file}");
    }
    let again = glatrain(&["export", "--checkpoint", run, "--out", "hf"], dir.path());
    assert_exit(&again, 2, "--force");
    let forced = glatrain(
        &["export", "--checkpoint", run, "--out", "hf", "--force"],
        dir.path(),
    );
    assert_success(&forced);

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
    assert_success(&eval);
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
        .arg("--glatrain")
        .arg(cli_path(env!("CARGO_BIN_EXE_glatrain")))
        .arg(run)
        .current_dir(dir.path())
        .output()
    {
        Ok(check) => {
            let said = String::from_utf8_lossy(&check.stdout);
            println!("{said}");
            assert_eq!(
                check.status.code(),
                Some(0),
                "{said}{}",
                text(&check.stderr)
            );
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
    assert_exit(&missing, 2, "runs/none");
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
    assert_exit(&dtype, 2, "fp8");
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
    assert_exit(&both, 2, "--data");
    assert!(!dir.path().join("hf").exists());
}

#[test]
fn document_boundaries_train_on_prepared_data_and_refuse_a_version_1_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let corpus: Vec<String> = (0..60)
        .map(|d| format!("Document {d} says{}.", " more".repeat(d % 9 + 2)))
        .collect();
    std::fs::write(dir.path().join("corpus.txt"), corpus.join("\n\n")).unwrap();
    let prepare = glatrain(
        &[
            "prepare",
            "--input",
            "corpus.txt",
            "--out",
            "tokens",
            "--valid-fraction",
            "0.2",
            "--shard-tokens",
            "500",
        ],
        dir.path(),
    );
    assert_success(&prepare);
    let train = |name: &str, boundaries: bool| {
        let name = format!("run.name={name}");
        let boundaries = format!("data.document_boundaries={boundaries}");
        glatrain(
            &[
                "--config",
                "gla-tiny",
                "--set",
                &name,
                "--set",
                "data.train=tokens",
                "--set",
                "data.valid=tokens",
                "--set",
                "data.seq_len=32",
                "--set",
                &boundaries,
                "--set",
                "train.batch_size=4",
                "--set",
                "train.micro_batch_size=4",
                "--set",
                "train.max_steps=2",
                "--set",
                "train.warmup_steps=0",
                "--set",
                "train.eval_batches=1",
            ],
            dir.path(),
        )
    };
    let run = train("boundaries", true);
    assert_success(&run);
    // The same batches without boundaries: the states cross documents, so the losses differ.
    let plain = train("plain", false);
    assert_success(&plain);
    let losses = |name: &str| logged_series(&dir.path().join("runs").join(name), "train/loss");
    let (with, without) = (losses("boundaries"), losses("plain"));
    assert_eq!(with.len(), without.len());
    assert!(!with.is_empty());
    for ((step, a), (_, b)) in with.iter().zip(&without) {
        assert!(
            (a - b).abs() > 1e-6,
            "step {step}: loss {a} with boundaries, {b} without"
        );
    }
    assert!(
        text(&run.stderr).contains(
            "documents per window of 32 tokens on average, each computed alone \
             (data.document_boundaries)"
        ),
        "{}",
        text(&run.stderr)
    );
    let eval = glatrain(
        &["eval", "--checkpoint", "runs/boundaries", "--batches", "1"],
        dir.path(),
    );
    assert_success(&eval);

    // The same dataset as format version 1 wrote it: no document starts.
    let tokens = dir.path().join("tokens");
    let mut manifest = glatrain_data::Manifest::load(&tokens).unwrap();
    manifest.format_version = 1;
    for split in [&mut manifest.train, manifest.valid.as_mut().unwrap()] {
        for shard in &mut split.shards {
            let starts = shard.document_starts.take().unwrap();
            std::fs::remove_file(tokens.join(starts.file)).unwrap();
        }
    }
    manifest.save(&tokens).unwrap();
    let says = "data.document_boundaries = true: data.train = \"tokens\" has no document \
                boundaries: tokens/manifest.json is format version 1, from before `glatrain \
                prepare` recorded where documents begin; re-run `glatrain prepare` on its corpus \
                (source: corpus.txt) to write the dataset with them (format version 2), or set \
                data.document_boundaries = false";
    assert_exit(&train("version-1", true), 2, says);
    assert!(!dir.path().join("runs/version-1").exists());
    let eval = glatrain(
        &[
            "eval",
            "--checkpoint",
            "runs/boundaries",
            "--data",
            "tokens",
        ],
        dir.path(),
    );
    assert_exit(
        &eval,
        2,
        "data.valid = \"tokens\" has no document boundaries",
    );
}
