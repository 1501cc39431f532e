//! What every launcher over tch tensors needs: the kernel dtype of a tensor, the CUDA device it
//! lives on, output buffers (NaN-filled for tests) and device addresses.
//!
//! [`set_poison_outputs`] (or `GLATRAIN_POISON=1`) fills every kernel output buffer with NaN
//! before the launch, so tests see any element a kernel failed to write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use glatrain_cuda::{Gpu, KernelDtype};
use tch::{Kind, Tensor};

use crate::OpError;

/// The kernel dtype of a tch kind, if kernels exist for it.
pub fn kernel_dtype(kind: Kind) -> Option<KernelDtype> {
    match kind {
        Kind::Float => Some(KernelDtype::F32),
        Kind::BFloat16 => Some(KernelDtype::Bf16),
        Kind::Half => Some(KernelDtype::F16),
        _ => None,
    }
}

/// The kernel dtype of `t`, argument `tensor` of `op`, or the error that the kernels take f32,
/// bf16 or f16 only.
pub(crate) fn kernel_dtype_of(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
) -> Result<KernelDtype, OpError> {
    kernel_dtype(t.kind()).ok_or_else(|| {
        OpError::dtype(
            op,
            tensor,
            "the CUDA kernels take f32, bf16 or f16".into(),
            t.kind(),
        )
    })
}

/// The CUDA device `t` lives on, bound to the calling thread (autograd's backward runs on a
/// thread of its own).
pub fn device_of(t: &Tensor) -> Result<Arc<Gpu>, OpError> {
    match t.device() {
        tch::Device::Cuda(i) => {
            let d = Gpu::get(i)?;
            d.bind()?;
            Ok(d)
        }
        other => Err(OpError::Device {
            tensor: "q",
            expected: tch::Device::Cuda(0),
            actual: other,
        }),
    }
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Fill kernel output buffers with NaN before each launch (tests: unwritten elements show up).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

fn poison() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    POISON.load(Ordering::Relaxed)
        || *FROM_ENV.get_or_init(|| std::env::var("GLATRAIN_POISON").is_ok_and(|v| v == "1"))
}

/// An output buffer of `kind` on `like`'s device (NaN-filled when poisoning is on).
pub fn buffer(shape: &[i64], kind: Kind, like: &Tensor) -> Result<Tensor, OpError> {
    let opts = (kind, like.device());
    Ok(if poison() {
        Tensor::f_full(shape, f64::NAN, opts)?
    } else {
        Tensor::f_empty(shape, opts)?
    })
}

/// The device address of a tensor's data.
pub fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

/// The device address of an optional tensor's data (0: absent).
pub fn opt_ptr(t: Option<&Tensor>) -> u64 {
    t.map_or(0, ptr)
}

/// Tiles of `tile` covering `n` (ceiling division).
pub fn tiles(n: i64, tile: i64) -> i64 {
    (n + tile - 1) / tile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_of_kind() {
        assert_eq!(kernel_dtype(Kind::BFloat16), Some(KernelDtype::Bf16));
        assert_eq!(kernel_dtype(Kind::Half), Some(KernelDtype::F16));
        assert_eq!(kernel_dtype(Kind::Float), Some(KernelDtype::F32));
        assert_eq!(kernel_dtype(Kind::Double), None);
    }

    #[test]
    fn tiles_round_up() {
        assert_eq!(tiles(1, 64), 1);
        assert_eq!(tiles(64, 64), 1);
        assert_eq!(tiles(65, 64), 2);
        assert_eq!(tiles(1024, 32), 32);
    }

    #[test]
    fn poisoned_buffers_are_nan() {
        let like = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        set_poison_outputs(true);
        let b = buffer(&[3, 2], Kind::Float, &like).unwrap();
        set_poison_outputs(false);
        assert_eq!(b.size(), vec![3, 2]);
        assert!(b.isnan().all().int64_value(&[]) == 1);
    }

    #[test]
    fn cpu_tensors_have_no_cuda_device() {
        let t = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        let err = device_of(&t).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }
}
