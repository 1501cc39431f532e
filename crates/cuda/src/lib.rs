//! The CUDA runtime of glatrain's kernels, shared by every op that has them.
//!
//! - [`KernelSource`]: a kernel file under `kernels/` (embedded in the binary, or read from
//!   `GLATRAIN_KERNEL_DIR`), its entry points and dtypes; every source includes the prelude
//!   `kernels/common.cuh`.
//! - [`compile`]: NVRTC compilation to CUBIN, one program per entry point, at two [`Tier`]s, with
//!   an on-disk cache.
//! - [`Gpu`]: one GPU's context (the primary one, shared with libtorch), its legacy default
//!   stream, and the modules, functions and occupancies loaded on it; the tiered swap.
//! - [`Kernel`] and [`launch!`]: a launch whose geometry is checked against CUDA's limits first.
//! - [`CudaTimer`]: CUDA-event medians of GPU work, as Triton's `do_bench` takes them.
//! - [`GpuSpec`]: what we know about GPU models (peak rates, copy bandwidth, clock).
//!
//! No libtorch here: ops hand device addresses to [`launch!`]. libtorch and this crate launch on
//! the same legacy default stream, so kernels are ordered with libtorch's ops without any
//! synchronisation.

pub mod compile;
mod device;
mod error;
pub mod launch;
mod source;
mod spec;
mod timer;

pub use compile::{Tier, TierPolicy};
pub use device::{DeviceProperties, Gpu};
pub use error::CudaError;
pub use launch::Kernel;
pub use source::{KernelDtype, KernelSource, PRELUDE};
pub use spec::{GpuSpec, EX2_PER_SM_PER_CLOCK};
pub use timer::{CudaTimer, FLUSH_BYTES, TIMING_ROUNDS, WARMUP_MIN};

#[doc(hidden)]
pub use cudarc;
