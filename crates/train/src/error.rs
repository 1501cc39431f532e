//! The trainer's error type.

use std::path::PathBuf;

use crate::boundary::is_out_of_memory;
use crate::checkpoint::CheckpointError;
use crate::interrupt::StopSignal;
use crate::metrics::MetricsError;
use crate::precision::PrecisionError;

/// Everything `train`, `evaluate` and `sample` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] glatrain_config::ConfigError),
    #[error(transparent)]
    Data(#[from] glatrain_data::DataError),
    #[error("{source_name}: {source}")]
    Model {
        source_name: String,
        source: Box<glatrain_models::ModelError>,
    },
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Writing or reading a Hugging Face model directory (`glatrain export`).
    #[error(transparent)]
    Hub(Box<glatrain_hub::HubError>),
    /// `model.init_from` names a directory that cannot start this run.
    #[error("{source_name}: model.init_from = {dir:?}: {source}")]
    InitFrom {
        source_name: String,
        dir: String,
        source: Box<glatrain_hub::HubError>,
    },
    /// A config key whose value cannot be used here (device, thread count, ...).
    #[error("{source_name}: {key} = {value}: {reason}")]
    BadValue {
        source_name: String,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// A command-line argument that cannot be used (prompt, sampling settings, ...).
    #[error("{0}")]
    BadArgument(String),
    /// A checkpoint that does not fit the model being built.
    #[error("{dir}: {reason}")]
    CheckpointMismatch { dir: PathBuf, reason: String },
    /// A fresh run would overwrite checkpoints of an earlier one.
    #[error(
        "{run_dir} already has checkpoints (newest: {newest}): pass --resume to continue that run, \
         or choose another run.name / run.out_dir"
    )]
    RunExists { run_dir: PathBuf, newest: String },
    /// Too many steps in a row had non-finite gradients.
    #[error(
        "stopping at step {step}: {count} consecutive steps had non-finite gradients \
         (train.max_consecutive_skips = {limit}; last loss {loss}, loss scale {scale}). \
         Lower train.lr, use train.precision = \"bf16\" or \"fp32\", or check the data"
    )]
    TooManySkips {
        step: u64,
        count: u64,
        limit: u64,
        loss: f64,
        scale: f64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A signal stopped the work (an evaluation between two batches).
    #[error("stopped by {}", .0.name())]
    Stopped(StopSignal),
    /// Another process works in the run directory.
    #[error(transparent)]
    Locked(#[from] glatrain_fs::LockError),
    /// A libtorch call failed (an allocation, an operation it refused).
    #[error("{what} failed: {message}{}", out_of_memory_hint(.message))]
    Torch { what: String, message: String },
    /// A training step ran out of memory.
    #[error(
        "{what} ran out of memory: {message}{}\nto fit: {advice}{}",
        peak.as_ref().map_or_else(String::new, |p| format!("\n(held at the peak so far: {p})")),
        checkpoint.as_ref().map_or_else(
            || "\nno checkpoint of this run was written yet".to_string(),
            |c| format!("\nthe last complete checkpoint, {}, is kept (--resume continues from it)", c.display())
        )
    )]
    OutOfMemory {
        what: String,
        message: String,
        peak: Option<String>,
        advice: String,
        checkpoint: Option<PathBuf>,
    },
    /// Training finished and its final checkpoint is on disk; what came after it failed.
    #[error(
        "{source}\n(training itself finished: its final checkpoint {} is saved; \
         `glatrain eval --checkpoint {}` evaluates it)",
        checkpoint.display(),
        checkpoint.display()
    )]
    AfterTraining {
        checkpoint: PathBuf,
        source: Box<TrainError>,
    },
    /// The loss-by-position chart could not be drawn; the evaluation itself finished.
    #[error(
        "{path}: cannot draw the chart: {message} (the evaluation itself finished: {summary})"
    )]
    Chart {
        path: PathBuf,
        message: String,
        summary: String,
    },
    /// The preflight refused the config (e.g. it cannot fit in the device's memory).
    #[error(transparent)]
    Preflight(#[from] glatrain_preflight::PreflightError),
    /// Data-parallel training: the launch environment, the process group, a collective.
    #[error(transparent)]
    Dist(#[from] glatrain_dist::DistError),
    /// glatrain's CUDA kernels cannot run on the device.
    #[error("GLA kernels: {0}")]
    Kernels(glatrain_cuda::CudaError),
}

fn out_of_memory_hint(message: &str) -> &'static str {
    if is_out_of_memory(message) {
        " (out of memory: a smaller micro-batch, sequence, prompt or model needs less)"
    } else {
        ""
    }
}

impl From<glatrain_hub::HubError> for TrainError {
    fn from(e: glatrain_hub::HubError) -> Self {
        TrainError::Hub(Box::new(e))
    }
}

impl TrainError {
    /// True for errors caused by the user's config, data, checkpoint or arguments (the CLI exits
    /// 2), false for internal failures (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            TrainError::Config(e) => e.is_bad_input(),
            TrainError::Data(e) => e.is_bad_input(),
            TrainError::Model { source, .. } => source.is_bad_input(),
            TrainError::Precision(e) => e.is_bad_input(),
            TrainError::Checkpoint(e) => e.is_bad_input(),
            TrainError::Preflight(e) => e.is_bad_input(),
            TrainError::Kernels(e) => e.is_bad_input(),
            TrainError::Dist(e) => e.is_bad_input(),
            TrainError::AfterTraining { source, .. } => source.is_bad_input(),
            TrainError::Hub(e) | TrainError::InitFrom { source: e, .. } => e.is_bad_input(),
            TrainError::BadValue { .. }
            | TrainError::BadArgument(_)
            | TrainError::CheckpointMismatch { .. }
            | TrainError::RunExists { .. }
            | TrainError::Locked(_) => true,
            TrainError::TooManySkips { .. }
            | TrainError::Metrics(_)
            | TrainError::Io { .. }
            | TrainError::Torch { .. }
            | TrainError::OutOfMemory { .. }
            | TrainError::Chart { .. }
            | TrainError::Stopped(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_messages() {
        let e = TrainError::TooManySkips {
            step: 12,
            count: 20,
            limit: 20,
            loss: f64::NAN,
            scale: 1.0,
        };
        assert!(!e.is_bad_input());
        let msg = e.to_string();
        assert!(
            msg.contains("max_consecutive_skips = 20") && msg.contains("step 12"),
            "{msg}"
        );
        let e = TrainError::BadValue {
            source_name: "configs/x.toml".into(),
            key: "run.device",
            value: "\"cuda\"".into(),
            reason: "no CUDA device is available".into(),
        };
        assert!(e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "configs/x.toml: run.device = \"cuda\": no CUDA device is available"
        );
    }
}
