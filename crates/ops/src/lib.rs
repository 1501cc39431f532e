//! Sequence-mixing and training ops: each with a tensor-op reference ([`reference`]) and, where it
//! has them, CUDA kernels that run as autograd ops.
//!
//! - [`gla`]: gated linear attention, every [`GlaMode`];
//! - [`selective_scan`]: Mamba's selective scan ([`ScanMode`]);
//! - [`sdpa`]: libtorch's causal softmax attention on the same `[B, T, H, D]` layout, and
//!   block-causal attention over the documents packed into a batch's rows;
//! - [`loss`]: the output projection and cross-entropy chunk by chunk, never the full logits;
//! - [`fused`]: RMSNorm (with an optional swish gate), SwiGLU, the causal convolution and the
//!   rotary embedding, one kernel per direction, and the first two fused with the matrix
//!   products after them;
//! - [`forget_gate`]: GLA's log forget gates, keeping their logits in the activation dtype.

mod bridge;
pub mod documents;
mod error;
pub mod forget_gate;
pub mod fused;
pub mod gla;
pub mod launch;
pub mod loss;
pub mod reference;
pub mod sdpa;
pub mod selective_scan;

pub use documents::Documents;
pub use error::OpError;
pub use forget_gate::log_forget_gate;
pub use fused::{causal_conv, rms_norm, rms_norm_linear, rotary, swiglu, swiglu_linear};
pub use gla::{gla, GlaMode};
pub use selective_scan::{selective_scan, ScanInputs, ScanMode, ScanOptions};

/// Every kernel source of every op, for the check that they all compile.
pub fn kernel_sources() -> Vec<&'static glatrain_cuda::KernelSource> {
    let mut sources = gla::kernels::SOURCES.to_vec();
    sources.push(&fused::FUSED);
    sources.push(&selective_scan::kernels::SELECTIVE_SCAN);
    sources
}
