//! The glatrain trainer: AdamW with tensor state, learning-rate schedules, mixed precision with
//! dynamic loss scaling, atomic checkpoints with exact resume, evaluation (perplexity, bits per
//! byte, loss by position; on text files), sampling, Hugging Face export and `model.init_from`,
//! and metrics (TensorBoard, JSON lines, progress).
//!
//! Entry points: [`train`], [`evaluate`], [`evaluate_text`], [`sample`], [`export`]. They print
//! progress to stderr themselves and return [`TrainError`]s (with `is_bad_input()`) rather than
//! exiting; no panic of theirs reaches a caller ([`boundary`]), and the lints below keep the
//! crate's own code from adding one.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

pub mod boundary;
pub mod checkpoint;
pub mod datasets;
pub mod error;
pub mod eval;
pub mod export;
pub mod flops;
pub mod init_from;
pub mod interrupt;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod precision;
pub mod preflight;
pub mod profile;
pub mod progress;
pub mod sample;
pub mod scaler;
pub mod schedule;
pub mod setup;
pub mod shard;
pub mod state;
pub mod sysinfo;
pub mod text_eval;
pub mod trainer;

pub use error::TrainError;
pub use eval::{evaluate, EvalReport, PositionBucket};
pub use export::{export, ExportSummary};
pub use sample::sample;
pub use text_eval::{evaluate_text, TextEvalReport};
pub use trainer::{describe_summary, train, TrainOptions, TrainSummary};
