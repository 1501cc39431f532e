//! Benchmarks of the sequence-mixing ops on the GPU: each row is an op ([`Op`]) at a shape in a
//! dtype, timed forward and forward+backward as CUDA-event medians ([`glatrain_cuda::CudaTimer`])
//! next to its floor (memory; for the selective scan also its exponentials) and, where the
//! project measured one, its anchor (`bench/anchors.json`: flash-linear-attention,
//! FlashAttention, mamba_ssm). [`Preset::Article`] reproduces the GLA / FlashAttention / Mamba
//! comparison with a table and a chart ([`article`]).
//!
//! ```text
//! Plan (rows: op x shape x dtype, or a preset) --run--> Report (table as it goes, JSON, chart)
//! ```

mod anchors;
pub mod article;
mod error;
mod first_call;
mod floor;
mod op;
mod plan;
mod report;
mod run;

pub use anchors::Anchors;
pub use error::BenchError;
pub use op::{Op, RowShape, ScanShape, Shape};
pub use plan::{Plan, Preset, RowSpec, Selection};
pub use report::{Report, RowResult};
pub use run::run;
