//! Why an op refused its inputs or failed.

use glatrain_cuda::CudaError;
use tch::{Device, Kind, TchError, Tensor};

/// Why an op refused its inputs or failed. Messages start with the op's name.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A tensor has the wrong shape.
    #[error("{op}: {tensor} must be {expected}, got shape {actual:?}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The argument name.
        tensor: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The actual shape.
        actual: Vec<i64>,
    },
    /// A tensor has an unsupported dtype.
    #[error("{op}: {tensor} has dtype {actual:?}; {expected}")]
    Dtype {
        /// The op.
        op: &'static str,
        /// The argument name.
        tensor: &'static str,
        /// What is accepted.
        expected: String,
        /// The actual dtype.
        actual: Kind,
    },
    /// A tensor is on another device than the op needs.
    #[error("{tensor} is on {actual:?}, expected {expected:?}")]
    Device {
        /// The argument name.
        tensor: &'static str,
        /// The device it should be on.
        expected: Device,
        /// The tensor's device.
        actual: Device,
    },
    /// A scalar argument is out of range.
    #[error("{op}: {name} = {value} {expected}")]
    Scalar {
        /// The op.
        op: &'static str,
        /// The argument name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What is accepted.
        expected: &'static str,
    },
    /// A CUDA kernel could not be compiled, loaded or launched, or a shape exceeds its limits.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// libtorch failed (an allocation, a tensor op, the autograd engine).
    #[error("{0}")]
    Torch(#[from] TchError),
    /// Document boundaries that do not fit their batch.
    #[error("{0}")]
    Documents(String),
    /// The autograd bridge reported a failure inside the op (its forward or backward).
    #[error("{0}")]
    Autograd(String),
}

impl OpError {
    /// `op`'s argument `tensor` has shape `actual` where it needs `expected` (in words).
    pub fn shape(
        op: &'static str,
        tensor: &'static str,
        expected: String,
        actual: Vec<i64>,
    ) -> Self {
        OpError::Shape {
            op,
            tensor,
            expected,
            actual,
        }
    }

    /// `op`'s argument `tensor` has dtype `actual`; `expected` says what is accepted.
    pub fn dtype(op: &'static str, tensor: &'static str, expected: String, actual: Kind) -> Self {
        OpError::Dtype {
            op,
            tensor,
            expected,
            actual,
        }
    }

    /// True for inputs that are wrong (shapes, dtypes, devices, scalars, kernel settings in the
    /// environment): the user's to fix.
    pub fn is_bad_input(&self) -> bool {
        match self {
            OpError::Shape { .. }
            | OpError::Dtype { .. }
            | OpError::Device { .. }
            | OpError::Scalar { .. }
            | OpError::Documents(_) => true,
            OpError::Cuda(e) => e.is_bad_input(),
            OpError::Torch(_) | OpError::Autograd(_) => false,
        }
    }
}

/// That `t` (the argument `name`) is on the device of `like`.
pub(crate) fn require_device(name: &'static str, t: &Tensor, like: &Tensor) -> Result<(), OpError> {
    if t.device() != like.device() {
        return Err(OpError::Device {
            tensor: name,
            expected: like.device(),
            actual: t.device(),
        });
    }
    Ok(())
}

/// Whether an op takes tensors of `kind` as floating-point inputs.
pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}
