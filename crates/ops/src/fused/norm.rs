//! [`rms_norm`]: RMSNorm over the last dimension with an optional swish gate, and the launchers
//! of its kernels (`rms_norm_fwd`, `rms_norm_bwd`, `column_sums` in `kernels/fused.cu`).

use glatrain_cuda::{launch, CudaError};
use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Kind, Tensor};

use super::{aligned, contiguous, int32, vec_width, FUSED};
use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::{buffer, device_of, kernel_dtype, kernel_dtype_of, opt_ptr, ptr, tiles};
use crate::reference::norm as reference;
use crate::OpError;

const OP: &str = "rms_norm";

/// Rows per block of `rms_norm_fwd` (a warp each).
const FWD_ROWS_PER_BLOCK: i64 = 8;
/// The most warps per block of `rms_norm_bwd`, and the shared memory (n floats per warp) it
/// aims at: 8 warps for rows of up to 1024 elements, fewer for longer rows.
const BWD_MAX_WARPS: i64 = 8;
const BWD_SMEM_TARGET: i64 = 32 * 1024;
/// `rms_norm_bwd` blocks aimed at: enough to fill a GPU, and that many partial sums of dw.
const BWD_TARGET_BLOCKS: i64 = 1024;
/// Columns per 256-thread block of `column_sums` (`DW_COLS` in fused.cu).
const DW_COLUMNS: i64 = 8;

/// The geometry of `rms_norm_bwd` for `rows` (>= 1) rows of `n` elements: `blocks` blocks of
/// `warps` warps, each warp taking `warp_rows` rows. A function of the rows and n alone, because
/// it fixes how dw is grouped into partial sums, which must not depend on the GPU or the tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BackwardPlan {
    warps: i64,
    warp_rows: i64,
    blocks: i64,
}

impl BackwardPlan {
    fn new(rows: i64, n: i64) -> Self {
        let warps = (BWD_SMEM_TARGET / (4 * n)).clamp(1, BWD_MAX_WARPS);
        let warp_rows = tiles(rows, warps * BWD_TARGET_BLOCKS).max(1);
        Self {
            warps,
            warp_rows,
            blocks: tiles(rows, warps * warp_rows),
        }
    }

    /// Bytes of dynamic shared memory per block for rows of `n` elements taken in chunks of
    /// `width`: each warp's n floats, padded to 32 chunks (`padded_columns` in fused.cu).
    fn smem(&self, n: i64, width: i64) -> i64 {
        self.warps * tiles(n, 32 * width) * 32 * width * 4
    }
}

pub(super) fn check(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    gate: Option<&Tensor>,
) -> Result<(), OpError> {
    let xs = x.size();
    let Some(&n) = xs.last().filter(|&&n| n >= 1) else {
        return Err(OpError::shape(OP, "x", "[..., n] with n >= 1".into(), xs));
    };
    if weight.size() != [n] {
        return Err(OpError::shape(
            OP,
            "weight",
            format!("[{n}]"),
            weight.size(),
        ));
    }
    if let Some(g) = gate.filter(|g| g.size() != xs) {
        return Err(OpError::shape(
            OP,
            "gate",
            format!("x's shape {xs:?}"),
            g.size(),
        ));
    }
    for (name, t) in [("x", x), ("weight", weight)] {
        if !is_float(t.kind()) {
            return Err(OpError::Dtype {
                op: OP,
                tensor: name,
                expected: "expected a floating-point dtype".into(),
                actual: t.kind(),
            });
        }
    }
    if let Some(g) = gate.filter(|g| g.kind() != x.kind()) {
        return Err(OpError::Dtype {
            op: OP,
            tensor: "gate",
            expected: format!("expected x's dtype {:?}", x.kind()),
            actual: g.kind(),
        });
    }
    for (name, t) in [("weight", Some(weight)), ("gate", gate)] {
        if let Some(t) = t {
            require_device(name, t, x)?;
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(OpError::Scalar {
            op: OP,
            name: "eps",
            value: eps,
            expected: "must be finite and >= 0",
        });
    }
    Ok(())
}

/// RMSNorm over the last dimension with an optional swish gate, differentiable in x, weight and
/// gate:
///
/// ```text
/// y = x / sqrt(mean(x^2) + eps) * weight [* gate * sigmoid(gate)]
/// ```
///
/// Statistics and math in fp32 (f64 for f64 inputs); the output in x's dtype. CUDA tensors of
/// f32, bf16 or f16 run the kernels of `kernels/fused.cu`, whose backward keeps x, weight and gate
/// as they are and one fp32 statistic per row; everything else runs the tensor-op reference
/// [`crate::reference::norm::rms_norm`]. Non-contiguous inputs are copied.
///
/// # Shapes
/// `x: [..., n]` with n >= 1; `weight: [n]` (any float dtype); `gate`: x's shape and dtype ->
/// x's shape and dtype.
pub fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    gate: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    check(x, weight, eps, gate)?;
    match (x.device(), kernel_dtype(x.kind())) {
        (Device::Cuda(_), Some(_)) => {
            let x = contiguous(x, x.kind())?;
            let gate = gate.map(|g| contiguous(g, g.kind())).transpose()?;
            let op = RmsNormOp { eps };
            let inputs = [Some(&x), Some(weight), gate.as_ref()];
            let [y] = bridge::apply(OP, op, &inputs)?;
            Ok(y)
        }
        _ => Ok(reference::rms_norm(x, weight, eps, gate)?),
    }
}

/// The kernels as an autograd op: inputs (x, weight, gate), one output, saved (x, weight, gate,
/// rstd).
struct RmsNormOp {
    eps: f64,
}

impl CustomOp for RmsNormOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [x, w, g] = bridged_list(OP, "inputs", inputs)?;
        let (x, w) = (bridged(OP, *x, "x")?, bridged(OP, *w, "weight")?);
        let (y, rstd) = forward(x, w, *g, self.eps).map_err(|e| e.to_string())?;
        Ok(Forward::saving(
            vec![y],
            &[Some(x), Some(w), *g],
            [Some(rstd)],
        ))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [x, w, g, rstd] = bridged_list(OP, "saved tensors", saved)?;
        let (x, w) = (bridged(OP, *x, "x")?, bridged(OP, *w, "weight")?);
        let rstd = bridged(OP, *rstd, "rstd")?;
        let Some(dy) = grads.first().copied().flatten() else {
            return Ok(vec![None, None, None]);
        };
        let (dx, dw, dg) = backward(x, w, *g, rstd, dy, None).map_err(|e| e.to_string())?;
        Ok(vec![Some(dx), Some(dw), dg])
    }
}

/// (rows, n) of x `[..., n]`.
fn rows_of(x: &Tensor) -> (i64, i64) {
    let n = x.size().last().copied().unwrap_or(1).max(1);
    (x.numel() as i64 / n, n)
}

/// y and rstd (`[rows]` fp32) from contiguous CUDA x and gate.
pub(super) fn forward(
    x: &Tensor,
    w: &Tensor,
    g: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor), OpError> {
    let (rows, n) = rows_of(x);
    let y = buffer(&x.size(), x.kind(), x)?;
    let rstd = buffer(&[rows], Kind::Float, x)?;
    if rows == 0 {
        return Ok((y, rstd));
    }
    let (dev, dt) = (device_of(x)?, kernel_dtype_of(OP, "x", x)?);
    let w32 = contiguous(w, Kind::Float)?;
    let vec = i32::from(n % vec_width(dt) == 0 && aligned(&[Some(x), g, Some(&y), Some(&w32)]));
    let (rows32, n32) = (int32(OP, "rows", rows)?, int32(OP, "n", n)?);
    let (xp, wp, gp, yp, rp) = (ptr(x), ptr(&w32), opt_ptr(g), ptr(&y), ptr(&rstd));
    let eps32 = eps as f32;
    let f = dev.kernel(&FUSED, dt, "rms_norm_fwd")?;
    let threads = (32 * FWD_ROWS_PER_BLOCK) as u32;
    launch!(f, (tiles(rows, FWD_ROWS_PER_BLOCK), 1, 1), threads, 0;
        xp, wp, gp, yp, rp, rows32, n32, vec, eps32)?;
    Ok((y, rstd))
}

/// dx, dweight (in weight's dtype) and dgate from the forward's contiguous inputs, its rstd and
/// the output gradient; where `again` is given (a contiguous buffer of x's shape and dtype), the
/// forward's y is written into it again, bit for bit.
pub(super) fn backward(
    x: &Tensor,
    w: &Tensor,
    g: Option<&Tensor>,
    rstd: &Tensor,
    dy: &Tensor,
    again: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Option<Tensor>), OpError> {
    let (rows, n) = rows_of(x);
    let dy = contiguous(dy, x.kind())?;
    let dx = buffer(&x.size(), x.kind(), x)?;
    let dg = g.map(|g| buffer(&g.size(), g.kind(), g)).transpose()?;
    if rows == 0 {
        return Ok((dx, w.f_zeros_like()?, dg));
    }
    let (dev, dt) = (device_of(x)?, kernel_dtype_of(OP, "x", x)?);
    let w32 = contiguous(w, Kind::Float)?;
    let vec = n % vec_width(dt) == 0
        && aligned(&[
            Some(x),
            g,
            Some(&dy),
            Some(&dx),
            dg.as_ref(),
            again,
            Some(&w32),
        ]);
    let plan = BackwardPlan::new(rows, n);
    let smem = plan.smem(n, if vec { vec_width(dt) } else { 1 });
    let bwd = dev.kernel(&FUSED, dt, "rms_norm_bwd")?;
    let max_smem = i64::from(bwd.max_dynamic_smem);
    if smem > max_smem {
        return Err(OpError::Cuda(CudaError::Limit {
            kernel: "rms_norm_bwd".into(),
            what: format!(
                "rows of n = {n} elements need {smem} bytes of shared memory for dweight's \
                 partial sums; this GPU gives a block at most {max_smem} bytes, enough for n <= {}",
                max_smem / 4 / 256 * 256
            ),
        }));
    }
    let parts = buffer(&[plan.blocks, n], Kind::Float, x)?;
    let dw = buffer(&[n], Kind::Float, x)?;
    let vec = i32::from(vec);
    let (rows32, n32) = (int32(OP, "rows", rows)?, int32(OP, "n", n)?);
    let (warp_rows, blocks) = (
        int32(OP, "rows per warp", plan.warp_rows)?,
        plan.blocks as i32,
    );
    let (xp, wp, gp, rp, dyp) = (ptr(x), ptr(&w32), opt_ptr(g), ptr(rstd), ptr(&dy));
    let (dxp, dgp, yp) = (ptr(&dx), opt_ptr(dg.as_ref()), opt_ptr(again));
    let (partp, dwp) = (ptr(&parts), ptr(&dw));
    launch!(bwd, (plan.blocks, 1, 1), (32 * plan.warps) as u32, smem as u32;
        xp, wp, gp, rp, dyp, dxp, dgp, yp, partp, rows32, n32, warp_rows, vec)?;
    let sum = dev.kernel(&FUSED, dt, "column_sums")?;
    launch!(sum, (tiles(n, DW_COLUMNS), 1, 1), 256, 0; partp, dwp, blocks, n32)?;
    Ok((dx, dw.f_to_kind(w.kind())?, dg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};

    #[test]
    fn backward_plans_group_rows_by_their_count_alone() {
        // The shapes of GLA-340M: the block norms and the per-head gated norm.
        assert_eq!(
            BackwardPlan::new(16384, 1024),
            BackwardPlan {
                warps: 8,
                warp_rows: 2,
                blocks: 1024
            }
        );
        assert_eq!(
            BackwardPlan::new(65536, 256),
            BackwardPlan {
                warps: 8,
                warp_rows: 8,
                blocks: 1024
            }
        );
        // Long rows: fewer warps per block, as much shared memory.
        let long = BackwardPlan::new(5, 4096);
        assert_eq!((long.warps, long.warp_rows, long.blocks), (2, 1, 3));
        assert_eq!(long.smem(4096, 8), 32 * 1024);
        // Each warp's sums padded to 32 chunks.
        assert_eq!(BackwardPlan::new(9, 7).smem(7, 1), 8 * 32 * 4);
        assert_eq!(BackwardPlan::new(9, 1000).smem(1000, 8), 8 * 1024 * 4);
        let huge = BackwardPlan::new(3, 100_000);
        assert_eq!((huge.warps, huge.blocks), (1, 3));
        // Every row in exactly one warp's share.
        for (rows, n) in [(1, 1), (37, 7), (8193, 1), (1_000_003, 300)] {
            let p = BackwardPlan::new(rows, n);
            assert!(p.blocks * p.warps * p.warp_rows >= rows, "{rows} {n}");
            assert!((p.blocks - 1) * p.warps * p.warp_rows < rows, "{rows} {n}");
            assert!(p.blocks <= BWD_TARGET_BLOCKS, "{rows} {n}");
        }
    }

    #[test]
    fn cpu_runs_the_reference() {
        let mut rng = Rng::new(1);
        let x = rng.randn(&[3, 5, 8], Kind::Float);
        let w = rng.randn(&[8], Kind::Float);
        let g = rng.randn(&[3, 5, 8], Kind::Float);
        for gate in [None, Some(&g)] {
            let got = rms_norm(&x, &w, 1e-6, gate).unwrap();
            let want = reference::rms_norm(&x, &w, 1e-6, gate).unwrap();
            assert_eq!(rel_rms(&got, &want), 0.0);
            assert_eq!(got.kind(), Kind::Float);
        }
    }

    #[test]
    fn bad_inputs_name_the_tensor_and_value() {
        let mut rng = Rng::new(2);
        let x = rng.randn(&[4, 6], Kind::Float);
        let w = rng.randn(&[6], Kind::Float);
        let msg = |r: Result<Tensor, OpError>| {
            let e = r.unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            e.to_string()
        };
        let m = msg(rms_norm(&x, &w.narrow(0, 0, 5), 1e-6, None));
        assert!(
            m.contains("rms_norm: weight must be [6], got shape [5]"),
            "{m}"
        );
        let m = msg(rms_norm(&x, &w, 1e-6, Some(&x.narrow(0, 0, 3))));
        assert!(m.contains("gate must be x's shape [4, 6]"), "{m}");
        let m = msg(rms_norm(&x, &w, 1e-6, Some(&x.to_kind(Kind::BFloat16))));
        assert!(
            m.contains("gate has dtype BFloat16; expected x's dtype Float"),
            "{m}"
        );
        let m = msg(rms_norm(&x.to_kind(Kind::Int64), &w, 1e-6, None));
        assert!(m.contains("x has dtype Int64"), "{m}");
        let m = msg(rms_norm(&x, &w, f64::NAN, None));
        assert!(m.contains("eps = NaN must be finite"), "{m}");
        let m = msg(rms_norm(&x, &w, -1.0, None));
        assert!(m.contains("eps = -1"), "{m}");
        let empty = Tensor::zeros([4, 0], (Kind::Float, Device::Cpu));
        let m = msg(rms_norm(&empty, &w, 1e-6, None));
        assert!(m.contains("x must be [..., n] with n >= 1"), "{m}");
    }

    #[test]
    fn launchers_refuse_cpu_tensors() {
        let x = Tensor::ones([2, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([8], (Kind::Float, Device::Cpu));
        let err = forward(&x, &w, None, 1e-6).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }
}
