//! [`swiglu`]: `silu(a) * b`, and the launchers of its kernels (`swiglu_fwd`, `swiglu_bwd` in
//! `kernels/fused.cu`).

use glatrain_cuda::{launch, KernelDtype};
use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Tensor};

use super::{aligned, contiguous, vec_width, FUSED};
use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::{buffer, device_of, kernel_dtype, kernel_dtype_of, opt_ptr, ptr, tiles};
use crate::reference::swiglu as reference;
use crate::OpError;

const OP: &str = "swiglu";

/// Threads per block of the SwiGLU kernels.
const THREADS: i64 = 256;
/// The most blocks of a SwiGLU launch (a grid-stride loop covers the rest): several waves of any
/// GPU's resident blocks.
const MAX_BLOCKS: i64 = 4096;

pub(super) fn check(a: &Tensor, b: &Tensor) -> Result<(), OpError> {
    if b.size() != a.size() {
        let expected = format!("a's shape {:?}", a.size());
        return Err(OpError::shape(OP, "b", expected, b.size()));
    }
    if !is_float(a.kind()) {
        let expected = "expected a floating-point dtype".into();
        return Err(OpError::dtype(OP, "a", expected, a.kind()));
    }
    if b.kind() != a.kind() {
        let expected = format!("expected a's dtype {:?}", a.kind());
        return Err(OpError::dtype(OP, "b", expected, b.kind()));
    }
    require_device("b", b, a)
}

/// SwiGLU's activation `silu(a) * b = a * sigmoid(a) * b`, differentiable in a and b (the gate
/// and up projections of a SwiGLU feed-forward block).
///
/// CUDA tensors of f32, bf16 or f16 run the kernels of `kernels/fused.cu`: fp32 math, the output
/// rounded once, and a backward that keeps only a and b (silu is computed again). Everything else
/// runs the tensor-op reference [`crate::reference::swiglu::swiglu`]. Non-contiguous inputs are
/// copied.
///
/// # Shapes
/// `a`, `b`: one shape and dtype -> the same.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    check(a, b)?;
    match (a.device(), kernel_dtype(a.kind())) {
        (Device::Cuda(_), Some(_)) => {
            let a = contiguous(a, a.kind())?;
            let b = contiguous(b, b.kind())?;
            let [y] = bridge::apply(OP, SwiGluOp, &[Some(&a), Some(&b)])?;
            Ok(y)
        }
        _ => Ok(reference::swiglu(a, b)?),
    }
}

/// The kernels as an autograd op: inputs (a, b), one output, saved (a, b).
struct SwiGluOp;

impl CustomOp for SwiGluOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [a, b] = bridged_list(OP, "inputs", inputs)?;
        let (a, b) = (bridged(OP, *a, "a")?, bridged(OP, *b, "b")?);
        let y = forward(a, b).map_err(|e| e.to_string())?;
        Ok(Forward::saving(vec![y], &[Some(a), Some(b)], []))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [a, b] = bridged_list(OP, "saved tensors", saved)?;
        let (a, b) = (bridged(OP, *a, "a")?, bridged(OP, *b, "b")?);
        let Some(dy) = grads.first().copied().flatten() else {
            return Ok(vec![None, None]);
        };
        let (da, db) = backward(a, b, dy, None).map_err(|e| e.to_string())?;
        Ok(vec![Some(da), Some(db)])
    }
}

/// Blocks and the `vec` flag of a launch over `n` elements of `dt`: 16-byte chunks where every
/// tensor is 16-byte aligned, then the tail element by element.
fn geometry(n: i64, dt: KernelDtype, tensors: &[Option<&Tensor>]) -> (i64, i32) {
    let vec = aligned(tensors);
    let work = if vec { n / vec_width(dt) } else { n };
    (tiles(work, THREADS).clamp(1, MAX_BLOCKS), i32::from(vec))
}

/// y from contiguous CUDA a and b.
pub(super) fn forward(a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    let y = buffer(&a.size(), a.kind(), a)?;
    let n = a.numel() as i64;
    if n == 0 {
        return Ok(y);
    }
    let (dev, dt) = (device_of(a)?, kernel_dtype_of(OP, "a", a)?);
    let (blocks, vec) = geometry(n, dt, &[Some(a), Some(b), Some(&y)]);
    let (ap, bp, yp) = (ptr(a), ptr(b), ptr(&y));
    let f = dev.kernel(&FUSED, dt, "swiglu_fwd")?;
    launch!(f, (blocks, 1, 1), THREADS as u32, 0; ap, bp, yp, n, vec)?;
    Ok(y)
}

/// da and db from the forward's contiguous inputs and the output gradient; where `again` is
/// given (a contiguous buffer of a's shape and dtype), the forward's y is written into it again,
/// bit for bit.
pub(super) fn backward(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    again: Option<&Tensor>,
) -> Result<(Tensor, Tensor), OpError> {
    let dy = contiguous(dy, a.kind())?;
    let da = buffer(&a.size(), a.kind(), a)?;
    let db = buffer(&b.size(), b.kind(), b)?;
    let n = a.numel() as i64;
    if n == 0 {
        return Ok((da, db));
    }
    let (dev, dt) = (device_of(a)?, kernel_dtype_of(OP, "a", a)?);
    let tensors = [Some(a), Some(b), Some(&dy), Some(&da), Some(&db), again];
    let (blocks, vec) = geometry(n, dt, &tensors);
    let (ap, bp, dyp, dap, dbp) = (ptr(a), ptr(b), ptr(&dy), ptr(&da), ptr(&db));
    let yp = opt_ptr(again);
    let f = dev.kernel(&FUSED, dt, "swiglu_bwd")?;
    launch!(f, (blocks, 1, 1), THREADS as u32, 0; ap, bp, dyp, dap, dbp, yp, n, vec)?;
    Ok((da, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};
    use tch::Kind;

    #[test]
    fn cpu_runs_the_reference() {
        let mut rng = Rng::new(3);
        let (a, b) = (
            rng.randn(&[2, 3, 10], Kind::Float),
            rng.randn(&[2, 3, 10], Kind::Float),
        );
        let got = swiglu(&a, &b).unwrap();
        assert_eq!(rel_rms(&got, &reference::swiglu(&a, &b).unwrap()), 0.0);
    }

    #[test]
    fn bad_inputs_name_the_tensor() {
        let mut rng = Rng::new(4);
        let a = rng.randn(&[4, 6], Kind::Float);
        let err = swiglu(&a, &a.narrow(1, 0, 5)).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string()
                .contains("swiglu: b must be a's shape [4, 6], got shape [4, 5]"),
            "{err}"
        );
        let err = swiglu(&a, &a.to_kind(Kind::Half)).unwrap_err();
        assert!(
            err.to_string()
                .contains("b has dtype Half; expected a's dtype Float"),
            "{err}"
        );
        let ints = a.to_kind(Kind::Int);
        let err = swiglu(&ints, &ints).unwrap_err();
        assert!(err.to_string().contains("a has dtype Int"), "{err}");
    }

    #[test]
    fn launch_geometry_covers_every_element() {
        let t = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let unaligned = Tensor::zeros([2], (Kind::Float, Device::Cpu)).narrow(0, 1, 1);
        // 16-byte chunks where aligned, elements otherwise; at least one block, at most
        // MAX_BLOCKS (the kernels' grid-stride loops take the rest).
        assert_eq!(geometry(1, KernelDtype::F32, &[Some(&t)]), (1, 1));
        assert_eq!(
            geometry(8 * 256 + 1, KernelDtype::Bf16, &[Some(&t)]),
            (1, 1)
        );
        assert_eq!(geometry(8 * 257, KernelDtype::Bf16, &[Some(&t)]), (2, 1));
        assert_eq!(
            geometry(4 * 257, KernelDtype::F32, &[Some(&t), Some(&unaligned)]),
            (5, 0)
        );
        assert_eq!(geometry(1 << 40, KernelDtype::F16, &[Some(&t)]), (4096, 1));
    }
}
