//! Data-parallel training's process side, on libtorch's c10d (through `glatrain-shim`):
//!
//! - [`env`]: where a process stands in the run, from torchrun's variables (`RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`);
//! - [`launch`]: `--nproc-per-node N`, which starts N local ranks of the same program with
//!   those variables and stops them all when one fails;
//! - [`data_parallel`]: the process group of a training run (the backend chosen by device),
//!   gradients averaged in buckets, rank 0's weights broadcast, scalars summed.

pub mod data_parallel;
pub mod env;
mod error;
pub mod launch;

pub use data_parallel::DataParallel;
pub use env::WorldEnv;
pub use error::DistError;
