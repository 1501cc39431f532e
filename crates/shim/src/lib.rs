//! What tch does not bind, through one small C++ file (`csrc/shim.cpp`) compiled against the
//! same libtorch:
//!
//! - [`autograd`]: custom ops with a Rust forward and backward inside libtorch's autograd, and
//!   gradients from a given output gradient;
//! - [`autocast`]: CUDA autocast regions in a chosen dtype (bf16 or fp16);
//! - [`sdp`]: which backends libtorch's scaled-dot-product attention may choose from, and its
//!   FlashAttention over sequences packed end to end;
//! - [`multi_tensor`]: the optimizer step in libtorch's multi-tensor kernels;
//! - [`memory`]: the CUDA caching allocator's counters (allocated, reserved, their peaks);
//! - [`profiler`]: libtorch's Kineto profiler, its Chrome trace and events;
//! - [`process_group`]: c10d process groups (TCPStore rendezvous, Gloo and NCCL collectives, a
//!   gradient reducer that all-reduces during the backward).

pub mod autocast;
pub mod autograd;
mod checked;
pub mod memory;
pub mod multi_tensor;
pub mod process_group;
pub mod profiler;
pub mod sdp;
