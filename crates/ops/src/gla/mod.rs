//! Gated linear attention as one differentiable op: [`gla`] checks its inputs and runs the
//! [`GlaMode`] it is given: on CUDA the kernels of that mode (through the autograd bridge, so
//! `loss.backward()` reaches the CUDA backward), on the CPU or for [`GlaMode::Reference`] the
//! tensor-op reference.
//!
//! ```text
//! S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,   S_0 = initial_state or 0
//! ```

mod documents;
pub mod kernels;
mod tensor_core;

pub use documents::{gla_documents, GlaDocuments, RESTART_LOG_GATE};
pub use glatrain_config::GlaMode;
pub use kernels::geometry;

use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Kind, Tensor};

use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::kernel_dtype;
use crate::reference::gla::{gla_chunked, gla_recurrent, DEFAULT_CHUNK};
use crate::OpError;

const OP: &str = "gla";

/// Checks shapes, dtypes, devices and the scale.
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
) -> Result<(), OpError> {
    let qs = q.size();
    if qs.len() != 4 || qs[3] < 1 {
        let expected = "[B, T, H, K] with K >= 1".into();
        return Err(OpError::shape(OP, "q", expected, qs));
    }
    for (name, t) in [("k", k), ("gk", gk)] {
        if t.size() != qs {
            return Err(OpError::shape(
                OP,
                name,
                format!("q's shape {qs:?}"),
                t.size(),
            ));
        }
    }
    let vs = v.size();
    if vs.len() != 4 || vs[..3] != qs[..3] || vs[3] < 1 {
        let expected = format!("[{}, {}, {}, V] with V >= 1", qs[0], qs[1], qs[2]);
        return Err(OpError::shape(OP, "v", expected, vs));
    }
    if let Some(h0) = initial_state {
        let want = vec![qs[0], qs[2], qs[3], vs[3]];
        if h0.size() != want {
            let expected = format!("[B, H, K, V] = {want:?}");
            return Err(OpError::shape(OP, "initial_state", expected, h0.size()));
        }
    }
    if !is_float(q.kind()) {
        let expected = "expected a floating-point dtype".into();
        return Err(OpError::dtype(OP, "q", expected, q.kind()));
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.kind() != q.kind() {
            let expected = format!("expected q's dtype {:?}", q.kind());
            return Err(OpError::dtype(OP, name, expected, t.kind()));
        }
    }
    for (name, t) in [("gk", Some(gk)), ("initial_state", initial_state)] {
        if let Some(t) = t.filter(|t| !is_float(t.kind())) {
            let expected = "expected a floating-point dtype".into();
            return Err(OpError::dtype(OP, name, expected, t.kind()));
        }
    }
    for (name, t) in [
        ("k", Some(k)),
        ("v", Some(v)),
        ("gk", Some(gk)),
        ("initial_state", initial_state),
    ] {
        if let Some(t) = t {
            require_device(name, t, q)?;
        }
    }
    if !scale.is_finite() {
        return Err(OpError::Scalar {
            op: OP,
            name: "scale",
            value: scale,
            expected: "must be finite",
        });
    }
    Ok(())
}

/// The mode that runs on `device` for `t` tokens: the reference on the CPU and for
/// [`GlaMode::Reference`]; on CUDA the given mode, and `fused_recurrent` for one token
/// (decoding), where the chunked schedules have nothing to parallelise.
fn effective_mode(mode: GlaMode, device: Device, t: i64) -> GlaMode {
    match device {
        Device::Cuda(_) if mode == GlaMode::Reference => GlaMode::Reference,
        Device::Cuda(_) if t == 1 => GlaMode::FusedRecurrent,
        Device::Cuda(_) => mode,
        _ => GlaMode::Reference,
    }
}

/// Compiles (or reads from the disk cache) and loads the CUDA kernels that `mode` runs for
/// q/k/v of `kind` on CUDA device `ordinal`, so that the first [`gla`] call does not wait for
/// them; safe to call from another thread while the caller goes on (training does, while it
/// builds the model). With `optimised`, also waits until the optimised (Full tier) kernels are
/// loaded, as every timing of the op must. Nothing to do for the reference or dtypes without
/// kernels.
pub fn prepare(ordinal: usize, kind: Kind, mode: GlaMode, optimised: bool) -> Result<(), OpError> {
    match kernel_dtype(kind) {
        Some(dtype) if mode != GlaMode::Reference => {
            Ok(kernels::prepare(ordinal, dtype, mode, optimised)?)
        }
        _ => Ok(()),
    }
}

/// Gated linear attention, differentiable in every input.
///
/// `S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`, `S_0 = initial_state`
/// (or zeros). `gk` is the log forget gate (<= 0). `scale` defaults to `K^-0.5`.
///
/// CUDA tensors run the kernels of `mode` (any K, V >= 1 and any T: tiles are padded inside;
/// one token runs `fused_recurrent`); CPU tensors, and [`GlaMode::Reference`], run the
/// tensor-op reference (token by token for `fused_recurrent` and single tokens, chunked
/// otherwise). On CUDA, q, k, v must share one dtype among f32, bf16 and f16; gk and the initial
/// state are used in f32 (their gradients come back in their own dtype through autograd).
/// Non-contiguous inputs are copied.
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state: `[B, H, K, V]`.
/// Returns o `[B, T, H, V]` (v's dtype) and, when `output_final_state`, the final state
/// `[B, H, K, V]` (f32; f64 for f64 inputs to the reference).
#[allow(clippy::too_many_arguments)]
pub fn gla(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: Option<f64>,
    mode: GlaMode,
    output_final_state: bool,
) -> Result<(Tensor, Option<Tensor>), OpError> {
    let scale =
        scale.unwrap_or_else(|| (q.size().last().copied().unwrap_or(1).max(1) as f64).powf(-0.5));
    check(q, k, v, gk, initial_state, scale)?;
    let t = q.size()[1];
    let (o, ht) = match effective_mode(mode, q.device(), t) {
        GlaMode::Reference => {
            let (o, ht) = if mode == GlaMode::FusedRecurrent || t == 1 {
                gla_recurrent(q, k, v, gk, initial_state, scale)
            } else {
                gla_chunked(q, k, v, gk, initial_state, scale, DEFAULT_CHUNK)
            };
            (o.f_to_kind(v.kind())?, ht)
        }
        kernel_mode => {
            if kernel_dtype(q.kind()).is_none() {
                let expected =
                    "the CUDA kernels take f32, bf16 or f16 (GlaMode::Reference takes any)".into();
                return Err(OpError::dtype(OP, "q", expected, q.kind()));
            }
            apply(q, k, v, gk, initial_state, scale, kernel_mode)?
        }
    };
    Ok((o, output_final_state.then_some(ht)))
}

/// The CUDA kernels of one mode as an autograd op: inputs (q, k, v, g, h0), outputs (o, final
/// state), saved (q, k, v, g, h0, final state, what the schedule keeps).
struct GlaOp {
    scale: f64,
    mode: GlaMode,
}

impl CustomOp for GlaOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [q, k, v, g, h0] = bridged_list(OP, "inputs", inputs)?;
        let (q, k, v, g) = (
            bridged(OP, *q, "q")?,
            bridged(OP, *k, "k")?,
            bridged(OP, *v, "v")?,
            bridged(OP, *g, "g")?,
        );
        let out = kernels::forward(
            &kernels::Inputs {
                q,
                k,
                v,
                g,
                h0: *h0,
            },
            self.scale,
            self.mode,
        )
        .map_err(|e| e.to_string())?;
        let computed = [Some(out.final_state.shallow_clone()), out.saved];
        Ok(Forward::saving(
            vec![out.o, out.final_state],
            &[Some(q), Some(k), Some(v), Some(g), *h0],
            computed,
        ))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [q, k, v, g, h0, ht, kept] = bridged_list(OP, "saved tensors", saved)?;
        let (q, k, v, g, ht) = (
            bridged(OP, *q, "q")?,
            bridged(OP, *k, "k")?,
            bridged(OP, *v, "v")?,
            bridged(OP, *g, "g")?,
            bridged(OP, *ht, "the final state")?,
        );
        let run = || -> Result<kernels::Backward, OpError> {
            // Only the final state was used: the outputs contribute nothing.
            let d_o = match grads.first().copied().flatten() {
                Some(d) => d.f_to_kind(v.kind())?.f_contiguous()?,
                None => v.f_zeros_like()?,
            };
            let dht = bridge::state_grad(grads.get(1).copied().flatten())?;
            let inputs = kernels::BackwardInputs {
                x: kernels::Inputs {
                    q,
                    k,
                    v,
                    g,
                    h0: *h0,
                },
                final_state: ht,
                saved: *kept,
                d_o: &d_o,
                dht: dht.as_ref(),
            };
            kernels::backward(&inputs, self.scale, self.mode)
        };
        let grads = run().map_err(|e| e.to_string())?;
        Ok(vec![
            Some(grads.dq),
            Some(grads.dk),
            Some(grads.dv),
            Some(grads.dg),
            grads.dh0,
        ])
    }
}

/// `t` as a contiguous tensor of `kind`: `t` itself where it is one, else a converted copy.
fn contiguous(t: &Tensor, kind: Kind) -> Result<Tensor, OpError> {
    Ok(if t.kind() == kind && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.f_to_kind(kind)?.f_contiguous()?
    })
}

/// Runs the CUDA kernels of `mode` through the autograd bridge.
fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
    mode: GlaMode,
) -> Result<(Tensor, Tensor), OpError> {
    let q = contiguous(q, q.kind())?;
    let k = contiguous(k, k.kind())?;
    let v = contiguous(v, v.kind())?;
    let g = contiguous(gk, Kind::Float)?;
    let h0 = initial_state
        .map(|h| contiguous(h, Kind::Float))
        .transpose()?;
    let op = GlaOp { scale, mode };
    let inputs = [Some(&q), Some(&k), Some(&v), Some(&g), h0.as_ref()];
    let [o, ht] = bridge::apply(OP, op, &inputs)?;
    Ok((o, ht))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preparing_nothing_touches_no_gpu() {
        // The reference mode and dtypes without kernels need no compilation (and no device:
        // this runs on machines without CUDA).
        prepare(0, Kind::BFloat16, GlaMode::Reference, false).unwrap();
        prepare(0, Kind::Int64, GlaMode::Chunk, false).unwrap();
    }

    #[test]
    fn the_reference_runs_on_the_cpu_and_kernels_decode_token_by_token() {
        let cuda = Device::Cuda(0);
        assert_eq!(
            effective_mode(GlaMode::Chunk, Device::Cpu, 100),
            GlaMode::Reference
        );
        assert_eq!(
            effective_mode(GlaMode::Reference, cuda, 100),
            GlaMode::Reference
        );
        assert_eq!(effective_mode(GlaMode::Chunk, cuda, 100), GlaMode::Chunk);
        assert_eq!(
            effective_mode(GlaMode::FusedChunk, cuda, 1),
            GlaMode::FusedRecurrent
        );
    }

    fn inputs(b: i64, t: i64, h: i64, k: i64, v: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        let opts = (Kind::Double, Device::Cpu);
        (
            Tensor::randn([b, t, h, k], opts),
            Tensor::randn([b, t, h, k], opts),
            Tensor::randn([b, t, h, v], opts),
            -Tensor::rand([b, t, h, k], opts),
        )
    }

    #[test]
    fn cpu_dispatches_to_the_reference() {
        let (q, k, v, g) = inputs(1, 5, 2, 3, 4);
        let scale = 3f64.powf(-0.5);
        let (o, ht) = gla(&q, &k, &v, &g, None, None, GlaMode::Chunk, true).unwrap();
        let (ro, rht) = gla_chunked(&q, &k, &v, &g, None, scale, DEFAULT_CHUNK);
        assert!(o.allclose(&ro, 1e-12, 1e-12, false));
        assert!(ht.unwrap().allclose(&rht, 1e-12, 1e-12, false));
        // Token by token for fused_recurrent: the same function.
        let (o2, _) = gla(&q, &k, &v, &g, None, None, GlaMode::FusedRecurrent, false).unwrap();
        assert!(o2.allclose(&ro, 1e-10, 1e-10, false));
    }

    #[test]
    fn final_state_only_when_asked() {
        let (q, k, v, g) = inputs(1, 3, 1, 2, 2);
        let mode = GlaMode::FusedRecurrent;
        let (_, ht) = gla(&q, &k, &v, &g, None, Some(1.0), mode, false).unwrap();
        assert!(ht.is_none());
    }

    #[test]
    fn errors_name_the_tensor_and_value() {
        let (q, k, v, g) = inputs(2, 4, 3, 5, 6);
        let bad_v = v.narrow(1, 0, 3);
        let err = gla(&q, &k, &bad_v, &g, None, None, GlaMode::Chunk, false).unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(
            msg.contains("gla: v must be") && msg.contains("[2, 3, 3, 6]"),
            "{msg}"
        );

        let h0 = Tensor::zeros([2, 3, 5, 7], (Kind::Double, Device::Cpu));
        let msg = gla(&q, &k, &v, &g, Some(&h0), None, GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("initial_state") && msg.contains("[2, 3, 5, 7]"),
            "{msg}"
        );

        let k32 = k.to_kind(Kind::Float);
        let msg = gla(&q, &k32, &v, &g, None, None, GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("k has dtype Float"), "{msg}");

        let msg = gla(&q, &k, &v, &g, None, Some(f64::NAN), GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("scale = NaN"), "{msg}");

        let q0 = Tensor::zeros([2, 4, 3, 0], (Kind::Double, Device::Cpu));
        let err = gla(&q0, &q0, &v, &q0, None, None, GlaMode::Chunk, false).unwrap_err();
        assert!(err.to_string().contains("K >= 1"), "{err}");
    }
}
