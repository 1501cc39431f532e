//! SIGTERM during training: the step finishes, a checkpoint is written, `train` returns normally,
//! and `--resume` finishes the run. Its own test binary, because the signal flag is per process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use glatrain_train::checkpoint;
use glatrain_train::metrics::JSONL_FILE;
use glatrain_train::{train, TrainOptions};

const CONFIG: &str = r#"
[run]
name = "sig"
device = "cpu"
cpu_threads = 1

[model]
type = "gla"
vocab_size = 256
hidden_size = 16
num_layers = 1
num_heads = 2

[data]
seq_len = 16

[train]
batch_size = 2
micro_batch_size = 2
max_steps = 100000
warmup_steps = 2
precision = "fp32"
eval_every = 0
eval_batches = 1
checkpoint_every = 0

[logging]
log_every = 1
tensorboard = false
progress = "lines"
"#;

/// Steps logged so far in `metrics.jsonl` (0 while the file does not exist).
fn logged_steps(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join(JSONL_FILE)).map_or(0, |t| t.lines().count())
}

#[test]
fn sigterm_checkpoints_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let cfg = |overrides: &[String]| {
        let mut all = vec![format!("run.out_dir={out:?}")];
        all.extend_from_slice(overrides);
        glatrain_config::from_str(CONFIG, "sig.toml", &all).unwrap()
    };
    let run_dir = tmp.path().join("sig");

    let signaller = {
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            // Training has started (and the handler is installed) once steps are logged.
            let start = Instant::now();
            while logged_steps(&run_dir) < 3 {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "training never started"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // The shell's builtin `kill`: no procps needed.
            let status = Command::new("sh")
                .args(["-c", &format!("kill -TERM {}", std::process::id())])
                .status()
                .unwrap();
            assert!(status.success());
        })
    };
    let first = train(cfg(&[]), &TrainOptions::default()).unwrap();
    signaller.join().unwrap();
    assert!(first.stopped_early);
    assert_eq!(first.interrupted.map(|s| s.exit_status()), Some(143));
    assert!(first.final_step >= 3 && first.final_step < 100_000);
    let ck = first.checkpoint.unwrap();
    assert_eq!(
        ck,
        run_dir
            .join("checkpoints")
            .join(checkpoint::step_dir_name(first.final_step))
    );
    checkpoint::verify(&ck).unwrap();

    // Resume and finish a little later (a shorter run: max_steps is not part of the model).
    let end = first.final_step + 5;
    let second = train(
        cfg(&[format!("train.max_steps={end}")]),
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
    .unwrap();
    assert_eq!(second.start_step, first.final_step);
    assert_eq!(second.final_step, end);
    assert!(!second.stopped_early && second.interrupted.is_none());
    assert!(second.eval.is_some());
}
