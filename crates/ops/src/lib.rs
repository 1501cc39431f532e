//! Sequence-mixing and training ops: each with a tensor-op reference ([`reference`]) and, where it
//! has them, CUDA kernels that run as autograd ops.
//!
//! - [`gla`]: gated linear attention, every [`GlaMode`];
//! - [`sdpa`]: libtorch's causal softmax attention on the same `[B, T, H, D]` layout;
//! - [`loss`]: the output projection and cross-entropy chunk by chunk, never the full logits;
//! - [`fused`]: RMSNorm (with an optional swish gate) and SwiGLU, one kernel per direction.

mod error;
pub mod fused;
pub mod gla;
pub mod launch;
pub mod loss;
pub mod reference;
pub mod sdpa;

pub use error::OpError;
pub use fused::{rms_norm, swiglu};
pub use gla::{gla, GlaMode};

/// Every kernel source of every op, for the check that they all compile.
pub fn kernel_sources() -> Vec<&'static glatrain_cuda::KernelSource> {
    let mut sources = gla::kernels::SOURCES.to_vec();
    sources.push(&fused::FUSED);
    sources
}
