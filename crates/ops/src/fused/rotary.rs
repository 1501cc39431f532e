//! [`rotary`]: the rotary position embedding, and the launcher of its kernel (`rotary` in
//! `kernels/fused.cu`, run with the negative angle for the backward).

use glatrain_cuda::launch;
use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Kind, Tensor};

use super::{aligned, contiguous, int32, vec_width, FUSED};
use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::{buffer, device_of, kernel_dtype, kernel_dtype_of, ptr, tiles};
use crate::reference::rotary as reference;
use crate::OpError;

const OP: &str = "rotary";

/// Threads per block of the kernel.
const THREADS: i64 = 256;
/// The most blocks of a launch (a grid-stride loop covers the rest).
const MAX_BLOCKS: i64 = 4096;

fn check(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(), OpError> {
    let xs = x.size();
    let [b, t, _, d] = xs[..] else {
        return Err(OpError::shape(OP, "x", "[B, T, H, D]".into(), xs));
    };
    if d < 2 || d % 2 != 0 {
        return Err(OpError::shape(
            OP,
            "x",
            "[B, T, H, D] with D even".into(),
            xs,
        ));
    }
    if !is_float(x.kind()) {
        let expected = "expected a floating-point dtype".into();
        return Err(OpError::dtype(OP, "x", expected, x.kind()));
    }
    let shared = [t, d / 2];
    for (name, table) in [("cos", cos), ("sin", sin)] {
        let ts = table.size();
        if ts != shared && ts != [b, t, d / 2] {
            let expected = format!("{shared:?} or [{b}, {t}, {}]", d / 2);
            return Err(OpError::shape(OP, name, expected, ts));
        }
        if ts != cos.size() {
            return Err(OpError::shape(
                OP,
                name,
                format!("cos's {:?}", cos.size()),
                ts,
            ));
        }
        if !matches!(table.kind(), Kind::Float | Kind::Double) {
            let expected = "expected Float (or Double)".into();
            return Err(OpError::dtype(OP, name, expected, table.kind()));
        }
        require_device(name, table, x)?;
    }
    Ok(())
}

/// Rotates each head's pairs `(x_i, x_{i+h})`, `i < h = D / 2`, by their angles (LLaMA's "rotate
/// half" form): `(x_i c - x_{i+h} s, x_{i+h} c + x_i s)` with `c, s` from the tables,
/// differentiable in x.
///
/// CUDA tensors of f32, bf16 or f16 with fp32 tables run the kernel of `kernels/fused.cu`: fp32
/// math, the output rounded once, one pass over x each way. Everything else runs the tensor-op
/// reference [`crate::reference::rotary::rotary`]. Non-contiguous inputs are copied.
///
/// # Shapes
/// `x: [B, T, H, D]` with D even; `cos, sin: [T, D / 2]` (every row alike) or `[B, T, D / 2]`
/// (positions per row) -> x's shape and dtype.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, OpError> {
    check(x, cos, sin)?;
    match (x.device(), kernel_dtype(x.kind()), cos.kind()) {
        (Device::Cuda(_), Some(_), Kind::Float) => {
            let x = contiguous(x, x.kind())?;
            let (cos, sin) = (contiguous(cos, Kind::Float)?, contiguous(sin, Kind::Float)?);
            let [y] = bridge::apply(OP, RotaryOp, &[Some(&x), Some(&cos), Some(&sin)])?;
            Ok(y)
        }
        _ => Ok(reference::rotary(x, cos, sin)?),
    }
}

/// The kernel as an autograd op: inputs (x, cos, sin), one output, saved the tables.
struct RotaryOp;

impl CustomOp for RotaryOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [x, cos, sin] = bridged_list(OP, "inputs", inputs)?;
        let x = bridged(OP, *x, "x")?;
        let (cos, sin) = (bridged(OP, *cos, "cos")?, bridged(OP, *sin, "sin")?);
        let y = rotate(x, cos, sin, 1.0).map_err(|e| e.to_string())?;
        Ok(Forward::saving(vec![y], &[Some(cos), Some(sin)], []))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [cos, sin] = bridged_list(OP, "saved tensors", saved)?;
        let (cos, sin) = (bridged(OP, *cos, "cos")?, bridged(OP, *sin, "sin")?);
        let Some(dy) = grads.first().copied().flatten() else {
            return Ok(vec![None, None, None]);
        };
        let dy = contiguous(dy, dy.kind()).map_err(|e| e.to_string())?;
        let dx = rotate(&dy, cos, sin, -1.0).map_err(|e| e.to_string())?;
        Ok(vec![Some(dx), None, None])
    }
}

/// Blocks and the `vec` flag of a launch over `pairs` pairs of `half` per head: chunks of a
/// 16-byte access where half is a multiple of one and every tensor is 16-byte aligned.
fn geometry(pairs: i64, half: i64, width: i64, tensors: &[Option<&Tensor>]) -> (i64, i32) {
    let vec = half % width == 0 && aligned(tensors);
    let work = if vec { pairs / width } else { pairs };
    (tiles(work, THREADS).clamp(1, MAX_BLOCKS), i32::from(vec))
}

/// x (contiguous CUDA) rotated by `sign` times its angles.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor, OpError> {
    let y = buffer(&x.size(), x.kind(), x)?;
    let (b, t, h, d) = (x.size()[0], x.size()[1], x.size()[2], x.size()[3]);
    let pairs = x.numel() as i64 / 2;
    if pairs == 0 {
        return Ok(y);
    }
    let (dev, dt) = (device_of(x)?, kernel_dtype_of(OP, "x", x)?);
    let half = d / 2;
    let tensors = [Some(x), Some(&y), Some(cos), Some(sin)];
    let (blocks, vec) = geometry(pairs, half, vec_width(dt), &tensors);
    let (t32, h32, half32) = (
        int32(OP, "T", t)?,
        int32(OP, "H", h)?,
        int32(OP, "D", half)?,
    );
    let per_row = i32::from(cos.dim() == 3);
    let tokens = b * t;
    let (xp, cp, sp, yp) = (ptr(x), ptr(cos), ptr(sin), ptr(&y));
    let f = dev.kernel(&FUSED, dt, "rotary")?;
    launch!(f, (blocks, 1, 1), THREADS as u32, 0;
        xp, cp, sp, yp, tokens, t32, h32, half32, per_row, sign, vec)?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};

    #[test]
    fn cpu_runs_the_reference() {
        let mut rng = Rng::new(32);
        let x = rng.randn(&[2, 5, 3, 8], Kind::Float);
        let angles = rng.randn(&[5, 4], Kind::Float);
        let (cos, sin) = (angles.cos(), angles.sin());
        let got = rotary(&x, &cos, &sin).unwrap();
        assert_eq!(
            rel_rms(&got, &reference::rotary(&x, &cos, &sin).unwrap()),
            0.0
        );
    }

    #[test]
    fn bad_inputs_name_the_tensor() {
        let mut rng = Rng::new(33);
        let x = rng.randn(&[2, 5, 3, 8], Kind::Float);
        let table = rng.randn(&[5, 4], Kind::Float);
        let cases = [
            (
                rotary(&x.select(0, 0), &table, &table),
                "x must be [B, T, H, D]",
            ),
            (rotary(&x.narrow(3, 0, 7), &table, &table), "with D even"),
            (
                rotary(&x, &table.narrow(0, 0, 4), &table),
                "cos must be [5, 4] or [2, 5, 4]",
            ),
            (
                rotary(&x, &table, &rng.randn(&[2, 5, 4], Kind::Float)),
                "sin must be cos's [5, 4]",
            ),
            (
                rotary(&x, &table.to_kind(Kind::Half), &table),
                "cos has dtype Half",
            ),
        ];
        for (result, message) in cases {
            let err = result.unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[test]
    fn launch_geometry_takes_16_byte_chunks_where_it_can() {
        let t = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let unaligned = Tensor::zeros([2], (Kind::Float, Device::Cpu)).narrow(0, 1, 1);
        // Transformer++-340M's heads (D = 64: 32 pairs, four bf16 chunks of 8).
        assert_eq!(geometry(8 * 2048 * 16 * 32, 32, 8, &[Some(&t)]), (4096, 1));
        assert_eq!(geometry(256 * 32, 32, 8, &[Some(&t)]), (4, 1));
        // Odd halves and unaligned tensors go pair by pair.
        assert_eq!(geometry(300, 3, 8, &[Some(&t)]), (2, 0));
        assert_eq!(geometry(256, 32, 8, &[Some(&t), Some(&unaligned)]), (1, 0));
    }
}
