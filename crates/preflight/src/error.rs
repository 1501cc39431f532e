//! The crate's one error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::report::human_bytes;

/// Why a config cannot run, or why the preflight itself failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PreflightError {
    /// The estimated memory of a training step exceeds the device's.
    #[error("{0}")]
    OutOfMemory(Box<MemoryShortfall>),

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

/// A step whose memory estimate exceeds the device's: the settings that size it, the estimate
/// part by part (`breakdown`) and the changes that make it fit (`advice`).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{config}: train.micro_batch_size = {micro_batch_size}, data.seq_len = {seq_len}, \
     train.activation_checkpointing = \"{checkpointing}\": estimated memory {} ({breakdown}) \
     exceeds the {} of {device}; {advice}",
    human_bytes(*estimate_bytes),
    human_bytes(*limit_bytes)
)]
pub struct MemoryShortfall {
    /// The config file (or origin name) of the run.
    pub config: String,
    pub micro_batch_size: usize,
    pub seq_len: usize,
    pub checkpointing: &'static str,
    pub estimate_bytes: u64,
    pub limit_bytes: u64,
    pub device: String,
    pub breakdown: String,
    pub advice: String,
}

impl PreflightError {
    /// True when the user's config is at fault (the CLI exits 2 before training starts);
    /// false for failures of the device, the disk or this program (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, PreflightError::OutOfMemory(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_config_that_does_not_fit_is_bad_input() {
        let oom = PreflightError::OutOfMemory(Box::new(MemoryShortfall {
            config: "configs/x.toml".into(),
            micro_batch_size: 64,
            seq_len: 16384,
            checkpointing: "none",
            estimate_bytes: 412 << 30,
            limit_bytes: 80 << 30,
            device: "NVIDIA H100 80GB HBM3".into(),
            breakdown: "activations 400.0 GiB".into(),
            advice: "to fit, --set train.micro_batch_size=8 (about 70.0 GiB)".into(),
        }));
        assert!(oom.is_bad_input());
        let msg = oom.to_string();
        assert!(
            msg.starts_with(
                "configs/x.toml: train.micro_batch_size = 64, data.seq_len = 16384, \
                 train.activation_checkpointing = \"none\": "
            ),
            "{msg}"
        );
        assert!(
            msg.contains("412.0 GiB (activations 400.0 GiB) exceeds the 80.0 GiB of NVIDIA H100"),
            "{msg}"
        );
        assert!(
            msg.ends_with("; to fit, --set train.micro_batch_size=8 (about 70.0 GiB)"),
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
