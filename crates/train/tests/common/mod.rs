//! What the trainer's integration tests share: resolving a config whose runs go under a
//! directory, and for the SIGTERM tests (each its own test binary: the signal flag is per
//! process) a micro run and its records. Each test binary compiles this module and uses a part
//! of it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Instant;

use glatrain_config::ResolvedConfig;
use glatrain_testing::process::{send_signal, wait_until};
use glatrain_train::metrics::JSONL_FILE;

/// A micro GLA model on the CPU whose steps take milliseconds; no evaluations, no periodic
/// checkpoints.
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

/// Config `text` (named `origin` in messages) with `overrides`, writing its runs under `out`.
pub fn resolve_under(
    out: &Path,
    text: &str,
    origin: &str,
    overrides: &[impl AsRef<str>],
) -> ResolvedConfig {
    let mut all = vec![format!("run.out_dir={:?}", out.display().to_string())];
    all.extend(overrides.iter().map(|o| o.as_ref().to_owned()));
    glatrain_config::from_str(text, origin, &all).unwrap_or_else(|e| panic!("{e}"))
}

/// [`CONFIG`] with `overrides`, writing its run under `out`.
pub fn config(out: &Path, overrides: &[String]) -> ResolvedConfig {
    resolve_under(out, CONFIG, "sig.toml", overrides)
}

/// The records of the run's `metrics.jsonl` so far (none while the file does not exist).
pub fn logged(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join(JSONL_FILE)).map_or_else(
        |_| Vec::new(),
        |t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        },
    )
}

/// Waits until the records the run at `run_dir` has logged satisfy `reached`.
pub fn wait_for(run_dir: &Path, reached: impl Fn(&[serde_json::Value]) -> bool) {
    wait_until("the run's records", || reached(&logged(run_dir)));
}

/// Sends this process SIGTERM; returns when.
pub fn sigterm_self() -> Instant {
    send_signal(std::process::id(), "TERM");
    Instant::now()
}
