//! End-to-end trainer tests on micro models (CPU, seq_len 16, one or two layers): exact resume,
//! refused checkpoints, skipped steps, logs, evaluation and sampling.

mod common;

use glatrain_fs::sorted_names;
use std::fs;
use std::path::{Path, PathBuf};

use glatrain_config::ResolvedConfig;
use glatrain_train::checkpoint;
use glatrain_train::metrics::{event_reader, JSONL_FILE, TENSORBOARD_DIR};
use glatrain_train::{evaluate, sample, train, TrainError, TrainOptions, TrainSummary};

const GLA: &str = r#"
[run]
name = "micro"
device = "cpu"
cpu_threads = 1
seed = 7

[model]
type = "gla"
vocab_size = 256
hidden_size = 32
num_layers = 1
num_heads = 2
use_short_conv = true

[data]
seq_len = 16

[train]
batch_size = 4
micro_batch_size = 2
max_steps = 8
warmup_steps = 2
lr = 3e-3
min_lr = 3e-4
precision = "fp32"
eval_every = 4
eval_batches = 2
checkpoint_every = 0
keep_checkpoints = 3

[logging]
log_every = 1
progress = "lines"
"#;

const MAMBA_MODEL: &str = r#"
[model]
type = "mamba"
vocab_size = 256
hidden_size = 32
num_layers = 1
"#;

const TRANSFORMER_MODEL: &str = r#"
[model]
type = "transformer"
vocab_size = 256
hidden_size = 32
num_layers = 1
num_heads = 2
"#;

/// The micro GLA config with its `[model]` table replaced by `model` (if given), writing under
/// `out_dir`, with `overrides`.
fn config(out_dir: &Path, model: Option<&str>, overrides: &[&str]) -> ResolvedConfig {
    let text = match model {
        None => GLA.to_string(),
        Some(m) => {
            let start = GLA.find("[model]").unwrap();
            let end = GLA.find("[data]").unwrap();
            format!("{}{}\n{}", &GLA[..start], m.trim(), &GLA[end..])
        }
    };
    common::resolve_under(out_dir, &text, "micro.toml", overrides)
}

fn run(cfg: ResolvedConfig, resume: bool, stop_after: Option<u64>) -> TrainSummary {
    train(
        cfg,
        &TrainOptions {
            resume,
            stop_after,
            world: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn bits(losses: &[(u64, f64)]) -> Vec<(u64, u64)> {
    losses.iter().map(|&(s, l)| (s, l.to_bits())).collect()
}

/// Train N steps straight vs N/2 + resume + N/2: the same per-step losses, bit for bit.
fn assert_resume_is_exact(model: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let full = run(config(&tmp.path().join("a"), model, &[]), false, None);
    assert_eq!(full.losses.len(), 8);
    assert!(!full.stopped_early);

    let first = run(config(&tmp.path().join("b"), model, &[]), false, Some(4));
    assert!(first.stopped_early);
    assert_eq!(first.final_step, 4);
    let ck = first.checkpoint.clone().unwrap();
    assert!(ck.ends_with("checkpoints/step-4"), "{}", ck.display());
    let second = run(config(&tmp.path().join("b"), model, &[]), true, None);
    assert_eq!(second.resumed_from.as_deref(), Some(ck.as_path()));
    assert_eq!(second.start_step, 4);

    let mut split = first.losses.clone();
    split.extend(second.losses.iter().copied());
    assert_eq!(
        bits(&split),
        bits(&full.losses),
        "{split:?}\nvs\n{:?}",
        full.losses
    );
    assert_eq!(second.tokens_seen, full.tokens_seen);
    let (a, b) = (full.eval.unwrap(), second.eval.unwrap());
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());

    // The final weights are identical too.
    let wa =
        checkpoint::read_tensors(&full.checkpoint.unwrap().join(checkpoint::WEIGHTS_FILE)).unwrap();
    let wb = checkpoint::read_tensors(&second.checkpoint.unwrap().join(checkpoint::WEIGHTS_FILE))
        .unwrap();
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert!(t.equal(&wb[name]), "{name} differs");
    }
}

#[test]
fn resume_is_bit_identical_gla() {
    assert_resume_is_exact(None);
}

#[test]
fn resume_is_bit_identical_mamba() {
    assert_resume_is_exact(Some(MAMBA_MODEL));
}

#[test]
fn resume_is_bit_identical_transformer() {
    assert_resume_is_exact(Some(TRANSFORMER_MODEL));
}

#[test]
fn activation_checkpointing_trains_exactly_as_the_plain_run() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, model) in [
        ("gla", None),
        ("mamba", Some(MAMBA_MODEL)),
        ("transformer", Some(TRANSFORMER_MODEL)),
    ] {
        let plain = run(config(&tmp.path().join(name), model, &[]), false, None);
        for mode in ["selective", "full"] {
            let setting = format!("train.activation_checkpointing=\"{mode}\"");
            let dir = tmp.path().join(format!("{name}-{mode}"));
            let got = run(config(&dir, model, &[&setting]), false, None);
            assert_eq!(bits(&got.losses), bits(&plain.losses), "{name} {mode}");
        }
    }
}

#[test]
fn loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        None,
        &[
            "train.max_steps=40",
            "train.lr=1e-2",
            "train.eval_every=0",
            "logging.log_every=10",
        ],
    );
    let s = run(cfg, false, None);
    let first = s.losses[0].1;
    let last: f64 = s.losses[35..].iter().map(|l| l.1).sum::<f64>() / 5.0;
    // Byte-level start: about ln 256 = 5.55 nats; 40 steps learn at least the letter statistics.
    assert!((first - 256f64.ln()).abs() < 0.5, "first loss {first}");
    assert!(last < first - 1.5, "loss {first} -> {last}");
    let eval = s.eval.unwrap();
    assert!(eval.perplexity < 40.0, "{eval}");
}

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("micro/checkpoints")
}

#[test]
fn bad_checkpoints_are_refused_by_name_and_the_previous_one_is_used() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let cfg = || {
        config(
            out,
            None,
            &["train.checkpoint_every=2", "train.keep_checkpoints=10"],
        )
    };
    run(cfg(), false, Some(6));
    let root = checkpoints_dir(out);
    let steps: Vec<u64> = checkpoint::list(&root)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![6, 4, 2]);
    // step-6: a corrupted file; step-4: no manifest (the write never finished); plus temporaries
    // of writes killed before their rename (a checkpoint, the resolved config).
    let w6 = root.join("step-6").join(checkpoint::WEIGHTS_FILE);
    let mut bytes = fs::read(&w6).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    fs::write(&w6, bytes).unwrap();
    fs::remove_file(root.join("step-4").join(checkpoint::MANIFEST_FILE)).unwrap();
    fs::create_dir(root.join(".step-8.tmp-12345-0")).unwrap();
    fs::write(out.join("micro/.config.toml.tmp-12345-1"), "partial").unwrap();

    let s = run(cfg(), true, None);
    assert_eq!(
        s.resumed_from.as_deref(),
        Some(root.join("step-2").as_path())
    );
    assert_eq!(s.start_step, 2);
    assert_eq!(
        s.rejected_checkpoints.len(),
        2,
        "{:?}",
        s.rejected_checkpoints
    );
    assert!(
        s.rejected_checkpoints[0].contains("step-6")
            && s.rejected_checkpoints[0].contains("sha256")
    );
    assert!(
        s.rejected_checkpoints[1].contains("step-4")
            && s.rejected_checkpoints[1].contains("incomplete")
    );
    // The resumed run rewrote steps 4, 6 and 8 properly and removed the leftovers.
    for step in [4, 6, 8] {
        checkpoint::verify(&root.join(format!("step-{step}"))).unwrap();
    }
    assert!(!root.join(".step-8.tmp-12345-0").exists());
    assert!(!out.join("micro/.config.toml.tmp-12345-1").exists());
}

#[test]
fn resume_refuses_another_model_and_fresh_runs_refuse_existing_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    run(config(out, None, &[]), false, Some(2));

    let err = train(
        config(out, None, &["model.hidden_size=64"]),
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
    .unwrap_err();
    assert!(err.is_bad_input());
    let msg = err.to_string();
    assert!(
        msg.contains("step-2")
            && msg.contains("model.hidden_size = 32 in the checkpoint, 64 in the config"),
        "{msg}"
    );
    // The refused resume left the run's config alone.
    let kept = glatrain_config::load(out.join("micro/config.toml"), &[]).unwrap();
    assert_eq!(kept.config.model, config(out, None, &[]).config.model);

    let err = train(config(out, None, &[]), &TrainOptions::default()).unwrap_err();
    assert!(matches!(err, TrainError::RunExists { .. }), "{err}");
    assert!(
        err.is_bad_input() && err.to_string().contains("--resume"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = train(
        config(empty.path(), None, &[]),
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
    .unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("no checkpoint to resume from"),
        "{err}"
    );
}

#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    // An update of 1e39 overflows fp32: the weights become infinite, every later loss and
    // gradient is NaN, and those steps are skipped.
    let cfg = config(
        tmp.path(),
        None,
        &[
            "train.lr=1e39",
            "train.min_lr=0.0",
            "train.warmup_steps=0",
            "train.grad_clip=0.0",
            "train.max_consecutive_skips=3",
            "train.eval_every=0",
        ],
    );
    let err = train(cfg, &TrainOptions::default()).unwrap_err();
    let TrainError::TooManySkips { step, count, .. } = &err else {
        panic!("expected TooManySkips, got {err}")
    };
    assert_eq!((*step, *count), (4, 3), "one real update, then three skips");
    assert!(!err.is_bad_input());
    assert!(
        err.to_string().contains("train.max_consecutive_skips = 3"),
        "{err}"
    );
    let log = fs::read_to_string(tmp.path().join("micro").join(JSONL_FILE)).unwrap();
    let skipped: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["train/skipped_steps"].as_f64())
        .collect();
    assert_eq!(skipped, vec![0.0, 1.0, 2.0, 3.0]);
}

#[test]
fn logs_parse_back_and_match_the_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(config(tmp.path(), None, &[]), false, None);
    let run_dir = tmp.path().join("micro");
    let files: Vec<PathBuf> = fs::read_dir(run_dir.join(TENSORBOARD_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let scalars = event_reader::read_scalars(&files[0]).unwrap();
    for &(step, loss) in &s.losses {
        assert!(
            scalars
                .iter()
                .any(|x| x.step == step as i64 && x.tag == "train/loss" && x.value == loss as f32),
            "train/loss at step {step}"
        );
    }
    for tag in [
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "train/skipped_steps",
        "perf/tokens_per_sec",
        "memory/rss_bytes",
        "eval/loss",
        "eval/ppl",
        "eval/bpb",
    ] {
        assert!(
            scalars.iter().any(|x| x.tag == tag),
            "no {tag} in the event file"
        );
    }
    assert!(
        !scalars.iter().any(|x| x.tag == "perf/mfu"),
        "no MFU on CPU"
    );
    let lines: Vec<serde_json::Value> = fs::read_to_string(run_dir.join(JSONL_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["train/loss"].as_f64()?)))
        .collect();
    assert_eq!(bits(&logged), bits(&s.losses));
    // Evaluations at step 4 (eval_every) and at the end.
    let evals: Vec<u64> = lines
        .iter()
        .filter(|v| v.get("eval/ppl").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![4, 8]);
    assert!(run_dir.join("config.toml").exists());
    assert!(run_dir.join("ppl_by_position.png").exists());
}

#[test]
fn evaluate_and_sample_from_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(
        config(tmp.path(), None, &["train.eval_every=0"]),
        false,
        None,
    );
    let ck = s.checkpoint.unwrap();
    let plot = tmp.path().join("chart.png");
    let report = evaluate(&ck, None, Some(3), Some(&plot)).unwrap();
    assert_eq!(report.step, Some(8));
    assert_eq!(report.tokens, 3 * 2 * 16);
    assert_eq!(report.buckets.len(), 8);
    assert!((report.perplexity - report.loss.exp()).abs() < 1e-9);
    // Byte tokenizer on the embedded corpus: one byte per token, so bpb = loss / ln 2.
    let bpb = report.bits_per_byte.unwrap();
    assert!(
        (bpb - report.loss / std::f64::consts::LN_2).abs() < 1e-9,
        "{bpb}"
    );
    let bucket_mean: f64 = report.buckets.iter().map(|b| b.loss).sum::<f64>() / 8.0;
    assert!((bucket_mean - report.loss).abs() < 1e-9);
    assert!(fs::read(&plot).unwrap().starts_with(b"\x89PNG"));
    // A run directory resolves to its newest checkpoint; with the config's eval_batches the
    // evaluation reproduces the trainer's final one exactly.
    let again = evaluate(&tmp.path().join("micro"), None, None, Some(&plot)).unwrap();
    assert_eq!(again.loss.to_bits(), s.eval.unwrap().loss.to_bits());

    let mut streamed = String::new();
    let a = sample(&ck, "The ", 24, 0.8, 20, 3, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, a, "the stream is the text");
    let b = sample(&ck, "The ", 24, 0.8, 20, 3, &mut |_| {}).unwrap();
    assert_eq!(a, b, "same seed, same text");
    assert!(a.starts_with("The "), "{a:?}");
    let greedy = sample(&ck, "The ", 24, 0.0, 0, 1, &mut |_| {}).unwrap();
    assert_eq!(
        greedy,
        sample(&ck, "The ", 24, 0.0, 0, 2, &mut |_| {}).unwrap(),
        "greedy ignores the seed"
    );
    let err = sample(&ck, "", 4, 1.0, 0, 0, &mut |_| {}).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("--prompt"),
        "{err}"
    );
}

fn resume(cfg: ResolvedConfig) -> Result<TrainSummary, TrainError> {
    train(
        cfg,
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
}

/// A run directory has one writer: while another holds its lock, a run (here a `--resume`,
/// which would rewrite `metrics.jsonl`) is refused, naming the holder, and changes nothing.
#[test]
fn a_locked_run_directory_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    run(config(tmp.path(), None, &[]), false, Some(2));
    let run_dir = tmp.path().join("micro");
    let metrics = fs::read(run_dir.join(JSONL_FILE)).unwrap();
    let holder = glatrain_fs::DirLock::acquire(&run_dir).unwrap();
    let err = resume(config(tmp.path(), None, &[])).unwrap_err();
    assert!(matches!(err, TrainError::Locked(_)), "{err}");
    assert!(err.is_bad_input());
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("process {}", std::process::id())) && msg.contains("micro"),
        "{msg}"
    );
    assert_eq!(fs::read(run_dir.join(JSONL_FILE)).unwrap(), metrics);
    drop(holder);
    assert_eq!(resume(config(tmp.path(), None, &[])).unwrap().final_step, 8);
}

/// A validation set shorter than one sequence is refused before the first step (not at the end
/// of the run), and a refused fresh run leaves no run directory.
#[test]
fn a_short_validation_set_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    // A nanoGPT-style headerless u16 file of 10 tokens; seq_len 16 needs 17.
    let valid = tmp.path().join("valid.bin");
    fs::write(&valid, [7u8, 0].repeat(10)).unwrap();
    let set = format!("data.valid={:?}", valid.display().to_string());
    let err = train(config(tmp.path(), None, &[&set]), &TrainOptions::default()).unwrap_err();
    assert!(err.is_bad_input());
    let msg = err.to_string();
    assert!(
        msg.contains("valid.bin") && msg.contains("10 tokens cannot fill one sequence"),
        "{msg}"
    );
    assert!(!tmp.path().join("micro").exists());
}

/// The final checkpoint is written before the final evaluation; a failure after training (here
/// the chart, whose path leads nowhere) keeps it and says so.
#[test]
fn a_failure_after_training_keeps_the_final_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("micro");
    fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::symlink(
        tmp.path().join("missing/chart.png"),
        run_dir.join("ppl_by_position.png"),
    )
    .unwrap();
    let cfg = config(tmp.path(), None, &["train.eval_every=0"]);
    let err = train(cfg, &TrainOptions::default()).unwrap_err();
    let TrainError::AfterTraining { checkpoint: ck, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(ck, &run_dir.join("checkpoints/step-8"));
    checkpoint::verify(ck).unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("cannot draw the chart")
            && msg.contains("the evaluation itself finished: loss ")
            && msg.contains("its final checkpoint")
            && msg.contains("step-8 is saved"),
        "{msg}"
    );
}

/// Resuming with changed settings keeps the run's config.toml, writes this session's beside it,
/// and resuming at or past max_steps trains nothing, rewrites no checkpoint and evaluates.
#[test]
fn resumed_settings_are_recorded_beside_the_runs_config() {
    let tmp = tempfile::tempdir().unwrap();
    run(config(tmp.path(), None, &[]), false, Some(4));
    let run_dir = tmp.path().join("micro");
    let original = fs::read_to_string(run_dir.join("config.toml")).unwrap();
    let s = resume(config(
        tmp.path(),
        None,
        &["train.lr=2e-3", "train.max_steps=6"],
    ))
    .unwrap();
    assert_eq!(s.final_step, 6);
    assert_eq!(
        fs::read_to_string(run_dir.join("config.toml")).unwrap(),
        original
    );
    let session = glatrain_config::load(run_dir.join("config.resume-4.toml"), &[]).unwrap();
    assert_eq!(session.config.train.lr, 2e-3);
    assert_eq!(session.config.train.max_steps, 6);
    // An unchanged resume writes no new file.
    let before = sorted_names(&run_dir).unwrap();
    let manifest = fs::read(run_dir.join("checkpoints/step-6/manifest.json")).unwrap();
    let s = resume(config(
        tmp.path(),
        None,
        &["train.lr=2e-3", "train.max_steps=6"],
    ))
    .unwrap();
    assert_eq!((s.start_step, s.final_step), (6, 6));
    assert!(s.losses.is_empty() && s.eval.is_some() && !s.stopped_early);
    assert_eq!(sorted_names(&run_dir).unwrap(), before);
    assert_eq!(
        fs::read(run_dir.join("checkpoints/step-6/manifest.json")).unwrap(),
        manifest,
        "the checkpoint is not rewritten"
    );
}

/// Data tokenized by one tokenizer and a config naming another are refused before training,
/// naming both; the dataset's own tokenizer file is accepted.
#[test]
fn data_of_another_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = glatrain_data::embedded::valid_text()
        .unwrap()
        .chars()
        .take(40_000)
        .collect();
    fs::write(tmp.path().join("corpus.txt"), text).unwrap();
    let data = tmp.path().join("tokens");
    let options = glatrain_data::PrepareOptions {
        tokenizer: "bpe:300".into(),
        valid_fraction: 0.3,
        ..Default::default()
    };
    glatrain_data::prepare(&[tmp.path().join("corpus.txt")], &data, &options).unwrap();
    let train_set = format!("data.train={:?}", data.display().to_string());
    let valid_set = format!("data.valid={:?}", data.display().to_string());
    let sets = [train_set.as_str(), &valid_set, "model.vocab_size=512"];
    let err = train(config(tmp.path(), None, &sets), &TrainOptions::default()).unwrap_err();
    assert!(err.is_bad_input());
    let msg = err.to_string();
    let tokenizer_json = data.join("tokenizer.json").display().to_string();
    assert!(
        msg.contains("data.tokenizer = \"byte\"")
            && msg.contains("was tokenized with bpe:300")
            && msg.contains(&tokenizer_json),
        "{msg}"
    );
    let own = format!("data.tokenizer={tokenizer_json:?}");
    let mut sets = sets.to_vec();
    sets.extend([own.as_str(), "train.max_steps=1", "train.warmup_steps=0"]);
    assert_eq!(
        run(config(tmp.path(), None, &sets), false, None).final_step,
        1
    );
}

#[test]
fn profiled_steps_leave_a_trace_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), None, &["logging.profile_steps=[2, 3]"]);
    let summary = run(cfg, false, None);
    let profile = summary.run_dir.join("profile");
    let trace: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(profile.join("trace.json")).unwrap()).unwrap();
    assert!(trace["traceEvents"]
        .as_array()
        .is_some_and(|events| events.iter().any(|e| e["name"] == "aten::mm")));
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(profile.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["steps"], 2);
    assert!(json["step_ms"].as_f64().unwrap() > 0.0);
    let text = fs::read_to_string(profile.join("summary.txt")).unwrap();
    assert!(
        text.contains("matrix products") && text.contains("host gaps"),
        "{text}"
    );
}
