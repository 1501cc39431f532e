//! The preflight: before the first step, pick each layer's op (GLA kernel mode, or the
//! baselines' op), estimate its time and memory, pad tiny head dims instead of failing, give
//! advice where softmax attention would be faster, and refuse configs that cannot fit.
//!
//! ```text
//! ResolvedConfig --layer_shapes--> LayerShape per distinct layer
//!     --choose_mode (rules) or measure (ModeTimer, cached)--> Decision
//!     --Report::rules / Report::measured--> table + preflight.json + errors (exit 2)
//! ```
//!
//! The launch geometry it plans with comes from the ops (`glatrain_ops::gla::geometry`), the
//! GPU rates from `glatrain_cuda::GpuSpec`. The measured mode times kernels through
//! [`ModeTimer`], which the trainer implements on top of the ops; its decisions are cached in
//! `glatrain_fs::cache_dir("preflight")`.

mod device;
mod error;
mod estimate;
mod fit;
mod measure;
mod op;
mod report;
mod rules;
mod shape;
pub mod tiles;

pub use device::{DeviceKind, DeviceProfile};
pub use error::{MemoryShortfall, PreflightError};
pub use estimate::{
    block_activation_bytes, block_parts, checkpointed_parts, chunk_state_bytes, estimate,
    fused_chunk_blocks, memory_parts, scan_checkpoint_bytes, Estimate, MemoryPart,
    BACKWARD_FLOP_FACTOR, BANDWIDTH_EFFICIENCY, COMPUTE_EFFICIENCY,
};
pub use measure::{measure, ModeTimer, SoftmaxTiming, MEASURE_RECURRENT_MAX_T};
pub use op::{LayerOp, Source};
pub use report::{
    loss_bytes, MemoryEstimate, Report, Row, BYTES_PER_PARAMETER, CUDA_RUNTIME_BYTES, ESTIMATE_NOTE,
};
pub use rules::{
    choose_mode, softmax_advice, Decision, BAD_FIT_FACTOR, FUSED_RECURRENT_MAX_T,
    STATE_MEMORY_FRACTION,
};
pub use shape::{layer_shapes, LayerShape, ModelType};
pub use tiles::Padding;
