//! [`log_forget_gate`]: GLA's log forget gates from their logits, keeping the logits in their
//! own dtype for the backward.
//!
//! The unfused ops (`logits.to_kind(Float).log_sigmoid() / normalizer`) keep logsigmoid's fp32
//! input: 4 bytes per key channel and token, per layer. This op keeps the logits as the gate
//! projection made them (2 bytes under bf16 autocast) and computes the fp32 values again in the
//! backward; the forward's values are the unfused ops' bit for bit.

use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Kind, Tensor};

use crate::bridge::{self, bridged, bridged_list};
use crate::error::is_float;
use crate::reference::common::compute_kind;
use crate::OpError;

const OP: &str = "log_forget_gate";

/// `logsigmoid(logits) / normalizer` in fp32 (f64 for f64 logits), differentiable in the
/// logits; every value <= 0.
///
/// # Shapes
/// `logits`: any shape, a floating-point dtype -> the same shape, fp32 (f64 for f64).
pub fn log_forget_gate(logits: &Tensor, normalizer: f64) -> Result<Tensor, OpError> {
    if !is_float(logits.kind()) {
        let expected = "expected a floating-point dtype".into();
        return Err(OpError::dtype(OP, "logits", expected, logits.kind()));
    }
    if !(normalizer.is_finite() && normalizer > 0.0) {
        return Err(OpError::Scalar {
            op: OP,
            name: "normalizer",
            value: normalizer,
            expected: "must be finite and > 0",
        });
    }
    let [gates] = bridge::apply(OP, LogForgetGate { normalizer }, &[Some(logits)])?;
    Ok(gates)
}

/// The dtype the gates are computed and returned in: the references' (f64 for f64, else fp32).
fn gate_kind(logits: &Tensor) -> Kind {
    compute_kind(&[logits], None)
}

/// The op: input the logits, output the gates, saved the logits.
struct LogForgetGate {
    normalizer: f64,
}

impl CustomOp for LogForgetGate {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [logits] = bridged_list(OP, "inputs", inputs)?;
        let logits = bridged(OP, *logits, "logits")?;
        let gates = (|| {
            logits
                .f_to_kind(gate_kind(logits))?
                .f_log_sigmoid()?
                .f_div_scalar(self.normalizer)
        })()
        .map_err(|e| e.to_string())?;
        Ok(Forward::saving(vec![gates], &[Some(logits)], []))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [logits] = bridged_list(OP, "saved tensors", saved)?;
        let logits = bridged(OP, *logits, "logits")?;
        let Some(dgates) = grads.first().copied().flatten() else {
            return Ok(vec![None]);
        };
        // d logsigmoid(x) / dx = 1 - sigmoid(x) = sigmoid(-x).
        let dlogits = (|| {
            let slope = logits.f_to_kind(gate_kind(logits))?.f_neg()?.f_sigmoid()?;
            dgates
                .f_div_scalar(self.normalizer)?
                .f_mul(&slope)?
                .f_to_kind(logits.kind())
        })()
        .map_err(|e| e.to_string())?;
        Ok(vec![Some(dlogits)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_shim::autograd::grad;
    use glatrain_testing::{rel_rms, Rng};

    /// The unfused ops the op replaces.
    fn unfused(logits: &Tensor, normalizer: f64) -> Tensor {
        logits.to_kind(gate_kind(logits)).log_sigmoid() / normalizer
    }

    /// Values bit for bit and the logits' gradient against autograd through the unfused ops, in
    /// f64, fp32 and bf16, including saturated logits.
    #[test]
    fn equals_the_unfused_ops() {
        let mut rng = Rng::new(21);
        for (kind, tolerance) in [
            (Kind::Double, 1e-15),
            (Kind::Float, 1e-6),
            // One bf16 rounding apart at most.
            (Kind::BFloat16, 2f64.powi(-8)),
        ] {
            let logits = (rng.randn(&[3, 7, 10], Kind::Double) * 6.0)
                .to_kind(kind)
                .set_requires_grad(true);
            let dgates = rng.randn(&[3, 7, 10], gate_kind(&logits));
            let got = log_forget_gate(&logits, 16.0).unwrap();
            let want = unfused(&logits, 16.0);
            assert_eq!(got.kind(), gate_kind(&logits));
            assert!(got.equal(&want), "{kind:?}");
            let g_got = grad(&got, &dgates, &[&logits]).unwrap();
            let g_want = grad(&want, &dgates, &[&logits]).unwrap();
            assert_eq!(g_got[0].kind(), kind);
            let err = rel_rms(&g_got[0], &g_want[0]);
            assert!(err <= tolerance, "{kind:?}: {err:e}");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let ints = Tensor::zeros([2], (Kind::Int, tch::Device::Cpu));
        let err = log_forget_gate(&ints, 16.0).unwrap_err();
        assert!(err.to_string().contains("logits has dtype Int"), "{err}");
        let x = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        let err = log_forget_gate(&x, 0.0).unwrap_err();
        assert!(
            err.is_bad_input() && err.to_string().contains("normalizer"),
            "{err}"
        );
    }
}
