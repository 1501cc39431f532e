//! SIGTERM during a periodic evaluation: the evaluation stops at its next batch (a whole one
//! over the validation set takes seconds here, minutes on real data) and the run checkpoints
//! its last step and returns. Its own test binary, because the signal flag is per process.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use glatrain_train::checkpoint;
use glatrain_train::metrics::JSONL_FILE;
use glatrain_train::{train, TrainOptions};

const CONFIG: &str = r#"
[run]
name = "sig-eval"
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
max_steps = 100
warmup_steps = 2
precision = "fp32"
# An evaluation after step 2, over the whole embedded validation set.
eval_every = 2
eval_batches = 0
checkpoint_every = 0

[logging]
log_every = 1
tensorboard = false
progress = "lines"
"#;

fn logged(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join(JSONL_FILE)).map_or_else(
        |_| Vec::new(),
        |t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        },
    )
}

#[test]
fn sigterm_during_an_evaluation_stops_it_at_the_next_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("run.out_dir={:?}", tmp.path().display().to_string());
    let cfg = glatrain_config::from_str(CONFIG, "sig-eval.toml", &[out]).unwrap();
    let run_dir = tmp.path().join("sig-eval");
    let signaller = {
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            // Step 2 is logged just before its evaluation starts.
            let start = Instant::now();
            while !logged(&run_dir).iter().any(|v| v["step"] == 2) {
                assert!(start.elapsed() < Duration::from_secs(120), "no step 2");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
            let status = Command::new("sh")
                .args(["-c", &format!("kill -TERM {}", std::process::id())])
                .status()
                .unwrap();
            assert!(status.success());
            Instant::now()
        })
    };
    let summary = train(cfg, &TrainOptions::default()).unwrap();
    let returned = Instant::now();
    let signalled = signaller.join().unwrap();
    assert_eq!(summary.final_step, 2);
    assert!(summary.stopped_early);
    assert_eq!(summary.interrupted.map(|s| s.exit_status()), Some(143));
    checkpoint::verify(&run_dir.join("checkpoints/step-2")).unwrap();
    // The evaluation was cut short: it logged nothing.
    assert!(
        !logged(&run_dir)
            .iter()
            .any(|v| v.get("eval/loss").is_some()),
        "the evaluation ran to its end"
    );
    let waited = returned.duration_since(signalled);
    assert!(
        waited < Duration::from_secs(5),
        "returned {waited:?} after the signal"
    );
}
