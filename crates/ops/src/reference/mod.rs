//! Reference implementations in plain tch tensor ops: the CPU training path and the oracle that
//! the CUDA kernels are tested against.
//!
//! Every function here is differentiable through tch autograd, runs on any device, and accepts
//! any floating dtype: half-precision inputs are computed in fp32 (this is the reference, and the
//! CPU has no fast half matmuls), f32 stays f32 and f64 stays f64; [`swiglu`]'s two elementwise
//! ops alone run in the inputs' dtype, as the unfused model ran them. Recurrent states are
//! returned in that compute dtype (fp32, or f64 for f64 inputs); outputs come back in the
//! input's dtype.
//!
//! All layouts are sequence-first (`[B, T, ...]`), as in flash-linear-attention.

pub mod conv;
pub mod gla;
pub mod norm;
pub mod rotary;
pub mod selective_scan;
pub mod swiglu;

pub(crate) mod common;
