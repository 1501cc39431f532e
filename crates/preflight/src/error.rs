//! The crate's one error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::report::human_bytes;

/// Why a config cannot run, or why the preflight itself failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PreflightError {
    /// The estimated memory of a training step exceeds the device's. `breakdown` lists the
    /// parts of the estimate.
    #[error(
        "{config}: train.micro_batch_size = {micro_batch_size}, data.seq_len = {seq_len}: \
         estimated memory {} ({breakdown}) exceeds the {} of {device}; {}",
        human_bytes(*estimate_bytes),
        human_bytes(*limit_bytes),
        remedy(*micro_batch_size)
    )]
    OutOfMemory {
        /// The config file (or origin name) of the run.
        config: String,
        micro_batch_size: usize,
        seq_len: usize,
        estimate_bytes: u64,
        limit_bytes: u64,
        device: String,
        breakdown: String,
    },

    /// No candidate mode could be timed (every [`crate::ModeTimer::time_ms`] call failed).
    #[error("preflight measurement of {shape}: no mode could be timed: {failures}")]
    Measure { shape: String, failures: String },

    /// Writing `preflight.json` failed.
    #[error("{}: cannot write the preflight report: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

/// What the user can change when a step does not fit: the micro-batch while it can shrink.
fn remedy(micro_batch_size: usize) -> &'static str {
    if micro_batch_size > 1 {
        "lower train.micro_batch_size (gradient accumulation keeps train.batch_size) or data.seq_len"
    } else {
        "train.micro_batch_size is already 1: lower data.seq_len, or use a device with more memory"
    }
}

impl PreflightError {
    /// True when the user's config is at fault (the CLI exits 2 before training starts);
    /// false for failures of the device, the disk or this program (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, PreflightError::OutOfMemory { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_config_that_does_not_fit_is_bad_input() {
        let oom = PreflightError::OutOfMemory {
            config: "configs/x.toml".into(),
            micro_batch_size: 64,
            seq_len: 16384,
            estimate_bytes: 412 << 30,
            limit_bytes: 80 << 30,
            device: "NVIDIA H100 80GB HBM3".into(),
            breakdown: "activations 400.0 GiB".into(),
        };
        assert!(oom.is_bad_input());
        let msg = oom.to_string();
        assert!(
            msg.starts_with("configs/x.toml: train.micro_batch_size = 64, data.seq_len = 16384: "),
            "{msg}"
        );
        assert!(
            msg.contains("412.0 GiB (activations 400.0 GiB) exceeds the 80.0 GiB of NVIDIA H100"),
            "{msg}"
        );
        assert!(msg.ends_with("lower train.micro_batch_size (gradient accumulation keeps train.batch_size) or data.seq_len"), "{msg}");
        let at_one = PreflightError::OutOfMemory {
            config: "configs/x.toml".into(),
            micro_batch_size: 1,
            seq_len: 16384,
            estimate_bytes: 412 << 30,
            limit_bytes: 80 << 30,
            device: "NVIDIA H100 80GB HBM3".into(),
            breakdown: "activations 400.0 GiB".into(),
        };
        let msg = at_one.to_string();
        assert!(
            msg.ends_with("train.micro_batch_size is already 1: lower data.seq_len, or use a device with more memory"),
            "{msg}"
        );
        let measure = PreflightError::Measure {
            shape: "B 8".into(),
            failures: "chunk: boom".into(),
        };
        assert!(!measure.is_bad_input());
        let write = PreflightError::Write {
            path: "runs/x/preflight.json".into(),
            source: Arc::new(io::Error::other("disk full")),
        };
        assert!(!write.is_bad_input());
        assert!(write
            .to_string()
            .contains("runs/x/preflight.json: cannot write the preflight report: disk full"));
    }
}
