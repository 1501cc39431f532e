//! [`causal_conv`]: the causal depthwise convolution with silu over whole rows or packed
//! documents, and the launchers of its kernels (`causal_conv_fwd`, `causal_conv_bwd` and
//! `column_sums` in `kernels/fused.cu`).

use glatrain_cuda::{launch, KernelDtype};
use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Kind, Tensor};

use super::{aligned, contiguous, int32, vec_width, FUSED};
use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::{buffer, device_of, kernel_dtype, kernel_dtype_of, opt_ptr, ptr, tiles};
use crate::reference::conv as reference;
use crate::OpError;

const OP: &str = "causal_conv";

/// The widest kernel the CUDA kernels take (`CONV_MAX_K` in fused.cu); wider ones run the
/// reference.
pub const MAX_KERNEL_WIDTH: i64 = 4;
/// Steps per warp and warps per block (`CONV_STEPS`, `CONV_RUNS`).
const STEPS: i64 = 16;
const RUNS: i64 = 4;
/// Columns per block of `column_sums` (`DW_COLS`).
const SUM_COLUMNS: i64 = 8;

fn check(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    resets: Option<&Tensor>,
) -> Result<(), OpError> {
    let xs = x.size();
    if xs.len() != 3 {
        return Err(OpError::shape(OP, "x", "[B, T, D]".into(), xs));
    }
    let ws = w.size();
    if ws.len() != 2 || ws[0] != xs[2] || ws[1] < 1 {
        let expected = format!("[D, K] with D = {} and K >= 1", xs[2]);
        return Err(OpError::shape(OP, "weight", expected, ws));
    }
    if let Some(b) = bias.filter(|b| b.size() != [xs[2]]) {
        return Err(OpError::shape(OP, "bias", format!("[{}]", xs[2]), b.size()));
    }
    if let Some(r) = resets {
        if r.size() != xs[..2] {
            let expected = format!("[B, T] = {:?}", &xs[..2]);
            return Err(OpError::shape(OP, "resets", expected, r.size()));
        }
        if r.kind() != Kind::Bool {
            return Err(OpError::dtype(
                OP,
                "resets",
                "expected Bool".into(),
                r.kind(),
            ));
        }
    }
    for (name, t) in [("x", Some(x)), ("weight", Some(w)), ("bias", bias)] {
        if let Some(t) = t.filter(|t| !is_float(t.kind())) {
            let expected = "expected a floating-point dtype".into();
            return Err(OpError::dtype(OP, name, expected, t.kind()));
        }
    }
    for (name, t) in [("weight", Some(w)), ("bias", bias), ("resets", resets)] {
        if let Some(t) = t {
            require_device(name, t, x)?;
        }
    }
    Ok(())
}

/// `y_t = silu(bias + sum_{j<K} w_j x_{t-K+1+j})` per channel, zero before the row's first step
/// and, with `resets` (`[B, T]` bool, [`crate::Documents::resets`]), before each document's first
/// step: each document is convolved as if it were alone. Differentiable in x, the weight and the
/// bias.
///
/// CUDA tensors of f32, bf16 or f16 with K <= [`MAX_KERNEL_WIDTH`] run the kernels of
/// `kernels/fused.cu`: x read in place (any batch and step strides, channels contiguous: e.g. a
/// column slice of a projection's output), fp32 math with the weight and bias in fp32, y rounded
/// once; the backward keeps x and computes the convolution again. Everything else runs
/// [`crate::reference::conv::causal_conv`].
///
/// # Shapes
/// `x: [B, T, D]`, `weight: [D, K]`, `bias: [D]`, `resets: [B, T]` -> `[B, T, D]` in x's dtype.
pub fn causal_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    resets: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    check(x, weight, bias, resets)?;
    let width = weight.size()[1];
    match (x.device(), kernel_dtype(x.kind())) {
        (Device::Cuda(_), Some(_)) if width <= MAX_KERNEL_WIDTH => {
            let x = if x.stride()[2] == 1 {
                x.shallow_clone()
            } else {
                x.f_contiguous()?
            };
            let w = contiguous(weight, Kind::Float)?;
            let bias = bias.map(|b| contiguous(b, Kind::Float)).transpose()?;
            let resets = resets.map(Tensor::f_contiguous).transpose()?;
            let inputs = [Some(&x), Some(&w), bias.as_ref(), resets.as_ref()];
            let [y] = bridge::apply(OP, ConvOp, &inputs)?;
            Ok(y)
        }
        _ => Ok(reference::causal_conv(x, weight, bias, resets)?),
    }
}

/// The kernels as an autograd op: inputs (x, w, bias, resets), one output, saved (the inputs).
struct ConvOp;

/// x, w, bias, resets from the bridge's list.
fn conv_inputs<'a>(list: &[Option<&'a Tensor>]) -> Result<Inputs<'a>, String> {
    let [x, w, bias, resets] = bridged_list(OP, "inputs", list)?;
    Ok(Inputs {
        x: bridged(OP, *x, "x")?,
        w: bridged(OP, *w, "weight")?,
        bias: *bias,
        resets: *resets,
    })
}

impl CustomOp for ConvOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let x = conv_inputs(inputs)?;
        let y = forward(&x).map_err(|e| e.to_string())?;
        Ok(Forward::saving(vec![y], inputs, []))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let x = conv_inputs(saved)?;
        let Some(dy) = grads.first().copied().flatten() else {
            return Ok(vec![None, None, None, None]);
        };
        let (dx, dw, dbias) = backward(&x, dy).map_err(|e| e.to_string())?;
        Ok(vec![Some(dx), Some(dw), dbias, None])
    }
}

/// One call's tensors: x `[B, T, D]` (channels contiguous), w `[D, K]` f32, bias `[D]` f32,
/// resets `[B, T]` bool.
struct Inputs<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    bias: Option<&'a Tensor>,
    resets: Option<&'a Tensor>,
}

/// What every launch of one call takes.
struct Geometry {
    grid: (i64, i64, i64),
    vec: i32,
    dims: [i32; 3],
    strides: [i64; 2],
}

impl Inputs<'_> {
    /// The grid (channel tiles, run groups, rows), the `vec` flag (16-byte chunks where every row
    /// of every tensor allows them) and T, D, K as the kernels' ints.
    fn geometry(&self, dt: KernelDtype, others: &[&Tensor]) -> Result<Geometry, OpError> {
        let s = self.x.size();
        let (b, t, d) = (s[0], s[1], s[2]);
        let (sb, st) = (self.x.stride()[0], self.x.stride()[1]);
        let width = vec_width(dt);
        let tensors: Vec<Option<&Tensor>> = std::iter::once(self.x)
            .chain(others.iter().copied())
            .map(Some)
            .collect();
        let vec = d % width == 0 && sb % width == 0 && st % width == 0 && aligned(&tensors);
        let lane_channels = if vec { width } else { 1 };
        Ok(Geometry {
            grid: (tiles(d, 32 * lane_channels), tiles(t, RUNS * STEPS), b),
            vec: i32::from(vec),
            dims: [
                int32(OP, "T", t)?,
                int32(OP, "D", d)?,
                int32(OP, "K", self.w.size()[1])?,
            ],
            strides: [sb, st],
        })
    }
}

fn forward(x: &Inputs) -> Result<Tensor, OpError> {
    let y = buffer(&x.x.size(), x.x.kind(), x.x)?;
    if x.x.numel() == 0 {
        return Ok(y);
    }
    let (dev, dt) = (device_of(x.x)?, kernel_dtype_of(OP, "x", x.x)?);
    let g = x.geometry(dt, &[&y])?;
    let (xp, wp, bp, rp, yp) = (
        ptr(x.x),
        ptr(x.w),
        opt_ptr(x.bias),
        opt_ptr(x.resets),
        ptr(&y),
    );
    let [t, d, k] = g.dims;
    let ([sb, st], vec) = (g.strides, g.vec);
    let f = dev.kernel(&FUSED, dt, "causal_conv_fwd")?;
    launch!(f, g.grid, (32 * RUNS) as u32, 0; xp, sb, st, wp, bp, rp, yp, t, d, k, vec)?;
    Ok(y)
}

fn backward(x: &Inputs, dy: &Tensor) -> Result<(Tensor, Tensor, Option<Tensor>), OpError> {
    let dy = contiguous(dy, x.x.kind())?;
    let s = x.x.size();
    let (d, k) = (s[2], x.w.size()[1]);
    let dx = buffer(&s, x.x.kind(), x.x)?;
    if x.x.numel() == 0 {
        let dw = Tensor::f_zeros([d, k], (Kind::Float, x.x.device()))?;
        let dbias = x.bias.map(|b| b.f_zeros_like()).transpose()?;
        return Ok((dx, dw, dbias));
    }
    let (dev, dt) = (device_of(x.x)?, kernel_dtype_of(OP, "x", x.x)?);
    let g = x.geometry(dt, &[&dy, &dx])?;
    let slots = g.grid.1 * g.grid.2;
    let columns = d * (k + 1);
    let parts = buffer(&[slots, columns], Kind::Float, x.x)?;
    let sums = buffer(&[columns], Kind::Float, x.x)?;
    let (xp, wp, bp, rp) = (ptr(x.x), ptr(x.w), opt_ptr(x.bias), opt_ptr(x.resets));
    let (dyp, dxp, partp, sump) = (ptr(&dy), ptr(&dx), ptr(&parts), ptr(&sums));
    let [t, d32, k32] = g.dims;
    let ([sb, st], vec) = (g.strides, g.vec);
    let bwd = dev.kernel(&FUSED, dt, "causal_conv_bwd")?;
    launch!(bwd, g.grid, (32 * RUNS) as u32, 0;
        xp, sb, st, wp, bp, rp, dyp, dxp, partp, t, d32, k32, vec)?;
    let (slots32, columns32) = (int32(OP, "slots", slots)?, int32(OP, "D (K + 1)", columns)?);
    let sum = dev.kernel(&FUSED, dt, "column_sums")?;
    launch!(sum, (tiles(columns, SUM_COLUMNS), 1, 1), 256u32, 0; partp, sump, slots32, columns32)?;
    let dw = sums.f_narrow(0, 0, d * k)?.f_view([d, k])?;
    let dbias = x.bias.map(|_| sums.f_narrow(0, d * k, d)).transpose()?;
    Ok((dx, dw, dbias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};

    #[test]
    fn cpu_runs_the_reference() {
        let mut rng = Rng::new(3);
        let (x, w) = (
            rng.randn(&[2, 5, 3], Kind::Float),
            rng.randn(&[3, 4], Kind::Float),
        );
        let got = causal_conv(&x, &w, None, None).unwrap();
        let want = reference::causal_conv(&x, &w, None, None).unwrap();
        assert_eq!(rel_rms(&got, &want), 0.0);
    }

    #[test]
    fn errors_name_the_argument() {
        let x = Tensor::zeros([2, 5, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        let err = causal_conv(&x, &w, None, None).unwrap_err().to_string();
        assert!(
            err.contains("causal_conv: weight must be [D, K] with D = 3"),
            "{err}"
        );
        let w = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let resets = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let err = causal_conv(&x, &w, None, Some(&resets))
            .unwrap_err()
            .to_string();
        assert!(err.contains("resets has dtype Float"), "{err}");
    }
}
