//! Benchmarks of the sequence-mixing ops on the GPU: each row is an op ([`Op`]) at a shape in a
//! dtype, timed forward and forward+backward as CUDA-event medians ([`glatrain_cuda::CudaTimer`])
//! next to its memory floor and, where the project measured one, its anchor
//! (`bench/anchors.json`: flash-linear-attention, FlashAttention, mamba_ssm).
//!
//! ```text
//! Plan (rows: op x shape x dtype) --run--> Report (table printed as it goes, JSON)
//! ```

mod anchors;
mod error;
mod first_call;
mod floor;
mod op;
mod plan;
mod report;
mod run;

pub use anchors::Anchors;
pub use error::BenchError;
pub use op::{Op, Shape};
pub use plan::{Plan, RowSpec};
pub use report::{Report, RowResult};
pub use run::run;
