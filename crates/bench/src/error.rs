//! Why the benchmark could not run or write its report.

use std::path::PathBuf;

use glatrain_cuda::CudaError;
use glatrain_ops::OpError;
use tch::TchError;

/// Why the benchmark could not run or write its report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// libtorch sees no CUDA device.
    #[error("bench: no CUDA device (libtorch reports none); the benchmark needs a GPU")]
    NoCuda,
    /// A CUDA driver call, NVRTC compilation or kernel launch failed.
    #[error("bench: {0}")]
    Cuda(#[from] CudaError),
    /// An op failed.
    #[error("bench: {0}")]
    Op(#[from] OpError),
    /// A libtorch operation (allocation, SDPA, backward) failed.
    #[error("bench: libtorch: {0}")]
    Torch(#[from] TchError),
    /// libtorch's backward from the output gradient failed.
    #[error("bench: libtorch backward: {0}")]
    Backward(String),
    /// The temporary kernel cache for the first-call measurement could not be made.
    #[error("bench: cannot create the temporary kernel cache {dir}: {message}")]
    Cache {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// A command-line value names something the benchmark does not run.
    #[error("bench: {flag} {value:?}: {expected}")]
    Arg {
        /// The command-line flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What the flag accepts.
        expected: String,
    },
    /// The JSON report could not be written.
    #[error("bench: cannot write {path}: {message}")]
    Write {
        /// The report's path.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

impl BenchError {
    /// True when a flag, the report path or a kernel setting in the environment is wrong; a
    /// missing GPU or a failing kernel is not the user's input.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BenchError::Write { .. } | BenchError::Arg { .. } => true,
            BenchError::Cuda(e) => e.is_bad_input(),
            BenchError::Op(e) => e.is_bad_input(),
            _ => false,
        }
    }
}
