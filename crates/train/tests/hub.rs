//! Hugging Face export, `model.init_from` and evaluation on text through the trainer, on micro
//! models (CPU, seq_len 16): a run started from an export of another run has that run's weights
//! bit for bit, a directory that does not fit is refused before anything is written, a resumed
//! run does not read it, and `evaluate_text` computes the same loss as the validation path on
//! the same tokens.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use glatrain_config::ResolvedConfig;
use glatrain_hub::Dtype;
use glatrain_train::checkpoint::{self, read_tensors};
use glatrain_train::{evaluate, evaluate_text, export, train, TrainError, TrainOptions};

const MICRO: &str = r#"
[run]
name = "source"
device = "cpu"
cpu_threads = 1
seed = 3

[data]
seq_len = 16

[train]
batch_size = 2
micro_batch_size = 2
max_steps = 2
warmup_steps = 1
lr = 3e-3
min_lr = 3e-4
precision = "fp32"
eval_every = 0
eval_batches = 1
checkpoint_every = 0

[logging]
log_every = 1
progress = "lines"
"#;

const GLA: &str = "[model]\ntype = \"gla\"\nvocab_size = 256\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\ntie_embeddings = false\n";
const TRANSFORMER: &str = "[model]\ntype = \"transformer\"\nvocab_size = 256\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\n";
const MAMBA: &str =
    "[model]\ntype = \"mamba\"\nvocab_size = 256\nhidden_size = 32\nnum_layers = 1\nd_state = 4\n";

fn config(out: &Path, model: &str, overrides: &[String]) -> ResolvedConfig {
    common::resolve_under(out, &format!("{MICRO}\n{model}"), "micro.toml", overrides)
}

/// Trains `cfg` and returns its final checkpoint.
fn run(cfg: ResolvedConfig) -> Result<PathBuf, TrainError> {
    let summary = train(cfg, &TrainOptions::default())?;
    Ok(summary.checkpoint.expect("a finished run checkpoints"))
}

fn weights_bits(checkpoint: &Path) -> Vec<(String, Vec<u8>)> {
    read_tensors(&checkpoint.join(checkpoint::WEIGHTS_FILE))
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.numel();
            let mut bytes = vec![0u8; n * 4];
            t.copy_data_u8(&mut bytes, n);
            (name, bytes)
        })
        .collect()
}

#[test]
fn a_run_started_from_an_export_has_the_exported_weights_bit_for_bit() {
    for model in [GLA, TRANSFORMER, MAMBA] {
        let tmp = tempfile::tempdir().unwrap();
        let source = run(config(tmp.path(), model, &[])).unwrap();
        let hf = tmp.path().join("hf");
        let summary = export(&tmp.path().join("source"), &hf, Dtype::Fp32, false).unwrap();
        assert_eq!(summary.checkpoint, source);
        // lr 0: the one step leaves the weights as loaded, and its checkpoint shows them.
        let started = config(
            tmp.path(),
            model,
            &[
                "run.name=started".into(),
                format!("model.init_from={:?}", hf.display().to_string()),
                "train.lr=0".into(),
                "train.min_lr=0".into(),
                "train.max_steps=1".into(),
            ],
        );
        let started = run(started).unwrap();
        assert_eq!(weights_bits(&started), weights_bits(&source), "{model}");
    }
}

/// A trained micro GLA run (`source/` of the returned directory) and its export, `hf/`.
fn exported_gla_run() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    run(config(tmp.path(), GLA, &[])).unwrap();
    let hf = tmp.path().join("hf");
    export(&tmp.path().join("source"), &hf, Dtype::Fp32, false).unwrap();
    (tmp, hf)
}

#[test]
fn a_directory_that_does_not_fit_is_refused_before_the_run_writes_anything() {
    let (tmp, hf) = exported_gla_run();
    let init_from = format!("model.init_from={:?}", hf.display().to_string());
    let wider = config(
        tmp.path(),
        GLA,
        &[
            "run.name=wider".into(),
            init_from.clone(),
            "model.hidden_size=64".into(),
        ],
    );
    let err = run(wider).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "micro.toml: model.init_from = {:?}: ",
            hf.display().to_string()
        )),
        "{msg}"
    );
    assert!(
        msg.contains("hidden_size = 32, but model.hidden_size = 64"),
        "{msg}"
    );
    assert!(!tmp.path().join("wider").exists(), "nothing is written");

    let mamba = config(tmp.path(), MAMBA, &["run.name=mamba".into(), init_from]);
    let msg = run(mamba).unwrap_err().to_string();
    assert!(
        msg.contains("model_type = \"gla\", but model.type = \"mamba\""),
        "{msg}"
    );
    assert!(!tmp.path().join("mamba").exists());
}

#[test]
fn text_evaluation_equals_the_validation_path_on_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let source = run(config(tmp.path(), GLA, &[])).unwrap();
    // Byte tokenizer: the text's bytes are its tokens. 5 full windows of 16 and the token
    // before them: exactly the validation path's windows.
    let text: String = "The jury further said in term-end presentments that the City Executive. "
        .chars()
        .cycle()
        .take(5 * 16 + 1)
        .collect();
    let text_path = tmp.path().join("wiki.txt");
    fs::write(&text_path, &text).unwrap();
    let bin = tmp.path().join("same.bin");
    let tokens: Vec<u8> = text
        .bytes()
        .flat_map(|b| u16::from(b).to_le_bytes())
        .collect();
    fs::write(&bin, tokens).unwrap();

    let report = evaluate_text(&source, &text_path, "text").unwrap();
    let plot = tmp.path().join("plot.png");
    let valid = evaluate(&source, Some(bin.to_str().unwrap()), Some(0), Some(&plot)).unwrap();
    assert_eq!((report.predicted, valid.tokens), (80, 80));
    assert_eq!(report.windows, 5);
    let rel = (report.loss - valid.loss).abs() / valid.loss;
    assert!(
        rel < 1e-12,
        "text {} vs validation {}",
        report.loss,
        valid.loss
    );
    // Bits per byte over all 81 bytes of the text.
    assert_eq!(report.bytes, 81);
    let bpb = report.nats / std::f64::consts::LN_2 / 81.0;
    assert!((report.bits_per_byte - bpb).abs() < 1e-12);
    assert!(report
        .to_string()
        .contains("5 non-overlapping windows of up to 16"));

    // Seven more bytes: one more, shorter window, every token but the first still predicted.
    fs::write(&text_path, format!("{text}abcdefg")).unwrap();
    let longer = evaluate_text(&source, &text_path, "text").unwrap();
    assert_eq!(
        (longer.windows, longer.predicted, longer.bytes),
        (6, 87, 88)
    );
}

#[test]
fn a_hugging_face_tokenizer_goes_along_with_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    let corpus = glatrain_data::embedded::train_text().unwrap();
    glatrain_data::train_bpe(corpus.lines().take(3000), 300, &tokenizer).unwrap();
    let tok = format!("data.tokenizer={:?}", tokenizer.display().to_string());
    let model = GLA.replace("vocab_size = 256", "vocab_size = 320");
    let source = run(config(tmp.path(), &model, &[tok])).unwrap();
    let hf = tmp.path().join("hf");
    let summary = export(&source, &hf, Dtype::Bf16, false).unwrap();
    assert!(summary.files.contains(&"tokenizer.json"));
    assert_eq!(
        fs::read(hf.join("tokenizer.json")).unwrap(),
        fs::read(&tokenizer).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    assert_eq!(config["vocab_size"], 320);
    // The run's tokenizer reads .jsonl text fields too.
    let docs = tmp.path().join("docs.jsonl");
    fs::write(
        &docs,
        "{\"text\": \"The jury said.\"}\n{\"text\": \"It was over.\"}\n",
    )
    .unwrap();
    let report = evaluate_text(&source, &docs, "text").unwrap();
    assert_eq!(report.bytes, "The jury said.\n\nIt was over.".len() as u64);
    assert!(report.predicted >= 1 && report.loss.is_finite());

    let err = export(&source, &hf, Dtype::Fp32, false).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("--force"),
        "{err}"
    );
}

#[test]
fn a_resumed_run_never_reads_init_from() {
    let (tmp, hf) = exported_gla_run();
    let started = || {
        config(
            tmp.path(),
            GLA,
            &[
                "run.name=started".into(),
                format!("model.init_from={:?}", hf.display().to_string()),
            ],
        )
    };
    let first = train(
        started(),
        &TrainOptions {
            resume: false,
            stop_after: Some(1),
            world: None,
        },
    )
    .unwrap();
    assert_eq!(first.final_step, 1);
    // The directory is gone: a resume that read it would fail.
    fs::remove_dir_all(&hf).unwrap();
    let resumed = train(
        started(),
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
    .unwrap();
    assert_eq!((resumed.start_step, resumed.final_step), (1, 2));
}
