//! Sequence-mixing ops.
pub mod autocast;
pub mod autograd;
pub mod bench;
pub mod cuda;
pub mod gla;
pub mod multi_tensor;
pub mod reference;
pub mod sdpa;
mod shim;
pub mod testing;

pub use gla::{gla, GlaMode, OpError};
