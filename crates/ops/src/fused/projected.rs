//! An activation and the matrix product it feeds, as one op that does not keep the product's
//! input for the backward:
//!
//! - [`swiglu_linear`]: `swiglu(a, b) W^T`, the SwiGLU block's activation and `down_proj`;
//! - [`rms_norm_linear`]: `rms_norm(x, weight, eps, gate) W^T`, GLA's gated output norm and
//!   `o_proj`.
//!
//! A matrix product keeps its input for the weight gradient: `[tokens, in]` in the activation
//! dtype, per layer, from the forward to the backward. The activation's backward needs only the
//! activation's inputs, which are kept anyway; so these ops keep those alone. Their backward
//! takes the product's input gradient, runs the activation's backward kernel, which also writes
//! the activation's output again (the forward's bits), and takes the weight gradient from that.
//! The price is one more write of `[tokens, in]` in the backward.
//!
//! CUDA tensors of f32, bf16 or f16 run the kernels of `kernels/fused.cu`; everything else runs
//! the references, the backward by autograd through them, so the CPU runs the op's plumbing.

use std::sync::Mutex;

use glatrain_shim::autograd::{self, CustomOp, Forward};
use tch::{Device, Tensor};

use super::{contiguous, norm, require_like, swiglu};
use crate::bridge;
use crate::launch::{buffer, kernel_dtype};
use crate::reference;
use crate::OpError;

/// `swiglu(a, b) W^T`: the activation's elements taken as rows of `in` and multiplied by the
/// transposed weight, differentiable in a, b and the weight.
///
/// `product`, where given, is the product's value known already (selective activation
/// checkpointing replays a recorded one): the op returns it as its output, with the op's
/// backward, and does not multiply again.
///
/// # Shapes
/// `a`, `b`: one shape and floating-point dtype with `in` dividing their element count;
/// `weight: [out, in]` in their dtype -> `[a.numel() / in, out]`.
pub fn swiglu_linear(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    product: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    swiglu::check(a, b)?;
    let activation = Activation::SwiGlu;
    check_product(activation, a, weight, product)?;
    let kernels = runs_kernels(a);
    let (a, b) = (prepared(a, kernels)?, prepared(b, kernels)?);
    project(activation, kernels, &[Some(&a), Some(&b)], weight, product)
}

/// `rms_norm(x, norm_weight, eps, gate) W^T` ([`super::rms_norm`]): the normalised elements
/// taken as rows of `in` (several norm rows of n each, as GLA's heads feed `o_proj`) and
/// multiplied by the transposed weight, differentiable in x, the two weights and the gate.
/// `product` as in [`swiglu_linear`].
///
/// # Shapes
/// `x: [..., n]`, `norm_weight: [n]`, `gate`: x's shape and dtype; `weight: [out, in]` in x's
/// dtype with `in` dividing x's element count -> `[x.numel() / in, out]`.
pub fn rms_norm_linear(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    gate: Option<&Tensor>,
    weight: &Tensor,
    product: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    norm::check(x, norm_weight, eps, gate)?;
    let activation = Activation::RmsNorm { eps };
    check_product(activation, x, weight, product)?;
    let kernels = runs_kernels(x);
    let x = prepared(x, kernels)?;
    let gate = gate.map(|g| prepared(g, kernels)).transpose()?;
    let inputs = [Some(&x), Some(norm_weight), gate.as_ref()];
    project(activation, kernels, &inputs, weight, product)
}

/// Whether activations like `t` run the kernels: CUDA tensors of a kernel dtype.
fn runs_kernels(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_)) && kernel_dtype(t.kind()).is_some()
}

/// `t` as the kernels take it (contiguous) where they run, else itself.
fn prepared(t: &Tensor, kernels: bool) -> Result<Tensor, OpError> {
    if kernels {
        contiguous(t, t.kind())
    } else {
        Ok(t.shallow_clone())
    }
}

/// The weight (and a known product) against the activation's first input `x`.
fn check_product(
    activation: Activation,
    x: &Tensor,
    weight: &Tensor,
    product: Option<&Tensor>,
) -> Result<(), OpError> {
    let op = activation.name();
    let numel = x.numel() as i64;
    let shape = weight.size();
    let [_, n_in] = shape[..] else {
        return Err(OpError::shape(op, "weight", "[out, in]".into(), shape));
    };
    if n_in < 1 || numel % n_in != 0 {
        let expected = format!("[out, in] with in dividing the activation's {numel} elements");
        return Err(OpError::shape(op, "weight", expected, shape));
    }
    require_like(op, "weight", weight, "the activation", x)?;
    let rows = [numel / n_in, shape[0]];
    match product {
        Some(p) if p.size() != rows => {
            Err(OpError::shape(op, "product", format!("{rows:?}"), p.size()))
        }
        _ => Ok(()),
    }
}

/// Runs `activation` on `inputs` and multiplies by `weight^T` as one autograd op.
fn project(
    activation: Activation,
    kernels: bool,
    inputs: &[Option<&Tensor>],
    weight: &Tensor,
    product: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    let op = ProjectedOp {
        activation,
        kernels,
        product: Mutex::new(product.map(Tensor::detach)),
    };
    let all: Vec<Option<&Tensor>> = inputs.iter().copied().chain([Some(weight)]).collect();
    let [y] = bridge::apply(activation.name(), op, &all)?;
    Ok(y)
}

/// The activation in front of the product.
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// Inputs (a, b).
    SwiGlu,
    /// Inputs (x, norm weight, gate or none).
    RmsNorm { eps: f64 },
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::SwiGlu => "swiglu_linear",
            Activation::RmsNorm { .. } => "rms_norm_linear",
        }
    }

    /// How many inputs the activation takes (the weight comes after them).
    fn arity(self) -> usize {
        match self {
            Activation::SwiGlu => 2,
            Activation::RmsNorm { .. } => 3,
        }
    }

    /// The activation's output, and what its backward needs beside the inputs (rms_norm's
    /// statistic per row, on the kernels).
    fn forward(
        self,
        inputs: &[Option<&Tensor>],
        kernels: bool,
    ) -> Result<(Tensor, Option<Tensor>), OpError> {
        let first = self.input(inputs, 0)?;
        match (self, kernels) {
            (Activation::SwiGlu, true) => {
                Ok((swiglu::forward(first, self.input(inputs, 1)?)?, None))
            }
            (Activation::RmsNorm { eps }, true) => {
                let (y, rstd) = norm::forward(first, self.input(inputs, 1)?, inputs[2], eps)?;
                Ok((y, Some(rstd)))
            }
            (_, false) => Ok((self.reference(inputs)?, None)),
        }
    }

    /// The reference's output, differentiable when the inputs require gradients.
    fn reference(self, inputs: &[Option<&Tensor>]) -> Result<Tensor, OpError> {
        let first = self.input(inputs, 0)?;
        Ok(match self {
            Activation::SwiGlu => reference::swiglu::swiglu(first, self.input(inputs, 1)?)?,
            Activation::RmsNorm { eps } => {
                reference::norm::rms_norm(first, self.input(inputs, 1)?, eps, inputs[2])?
            }
        })
    }

    /// The gradients of the inputs (none for an absent one) from the output gradient `dy`, and
    /// the forward's output again.
    fn backward(
        self,
        inputs: &[Option<&Tensor>],
        kept: Option<&Tensor>,
        dy: &Tensor,
        kernels: bool,
    ) -> Result<(Vec<Option<Tensor>>, Tensor), OpError> {
        let first = self.input(inputs, 0)?;
        if !kernels {
            return self.backward_by_autograd(inputs, dy);
        }
        let y = buffer(&first.size(), first.kind(), first)?;
        let grads = match self {
            Activation::SwiGlu => {
                let (da, db) = swiglu::backward(first, self.input(inputs, 1)?, dy, Some(&y))?;
                vec![Some(da), Some(db)]
            }
            Activation::RmsNorm { .. } => {
                let rstd = kept.ok_or_else(|| self.missing("rstd"))?;
                let w = self.input(inputs, 1)?;
                let (dx, dw, dg) = norm::backward(first, w, inputs[2], rstd, dy, Some(&y))?;
                vec![Some(dx), Some(dw), dg]
            }
        };
        Ok((grads, y))
    }

    /// [`Activation::backward`] through autograd of the reference.
    fn backward_by_autograd(
        self,
        inputs: &[Option<&Tensor>],
        dy: &Tensor,
    ) -> Result<(Vec<Option<Tensor>>, Tensor), OpError> {
        let leaves: Vec<Option<Tensor>> = inputs
            .iter()
            .map(|t| t.map(|t| t.detach().set_requires_grad(true)))
            .collect();
        let leaf_refs: Vec<Option<&Tensor>> = leaves.iter().map(Option::as_ref).collect();
        let y = tch::with_grad(|| self.reference(&leaf_refs))?;
        let present: Vec<&Tensor> = leaves.iter().flatten().collect();
        let mut grads = autograd::grad(&y, dy, &present)
            .map_err(OpError::Autograd)?
            .into_iter();
        let grads = leaves
            .iter()
            .map(|leaf| leaf.as_ref().and_then(|_| grads.next()))
            .collect();
        Ok((grads, y.detach()))
    }

    /// Input `i`, which this activation always has.
    fn input<'a>(self, inputs: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, OpError> {
        inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| self.missing(&format!("input {i}")))
    }

    fn missing(self, what: &str) -> OpError {
        OpError::Autograd(format!(
            "{}: {what} missing in the autograd bridge",
            self.name()
        ))
    }
}

/// The op: inputs (the activation's, then the weight), one output, saved (the inputs, then the
/// activation's statistic where it has one).
struct ProjectedOp {
    activation: Activation,
    kernels: bool,
    /// The product's value where it is known already; the forward takes it.
    product: Mutex<Option<Tensor>>,
}

impl ProjectedOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, OpError> {
        let arity = self.activation.arity();
        let weight = self.activation.input(inputs, arity)?;
        let (y, kept) = self.activation.forward(&inputs[..arity], self.kernels)?;
        let known = self
            .product
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let out = match known {
            Some(p) => p,
            None => rows(&y, weight)?.f_linear::<Tensor>(weight, None)?,
        };
        Ok(Forward::saving(vec![out], inputs, [kept]))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, OpError> {
        let arity = self.activation.arity();
        let Some(dout) = grads.first().copied().flatten() else {
            return Ok((0..=arity).map(|_| None).collect());
        };
        let first = self.activation.input(saved, 0)?;
        let weight = self.activation.input(saved, arity)?;
        let kept = saved.get(arity + 1).copied().flatten();
        let dy = dout.f_mm(weight)?.f_reshape(first.size())?;
        let (mut grads, y) = self
            .activation
            .backward(&saved[..arity], kept, &dy, self.kernels)?;
        grads.push(Some(dout.f_tr()?.f_mm(&rows(&y, weight)?)?));
        Ok(grads)
    }
}

impl CustomOp for ProjectedOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        ProjectedOp::forward(self, inputs).map_err(|e| e.to_string())
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        ProjectedOp::backward(self, saved, grads).map_err(|e| e.to_string())
    }
}

/// The activation's output as the product's rows: `[numel / in, in]`.
fn rows(y: &Tensor, weight: &Tensor) -> Result<Tensor, OpError> {
    Ok(y.f_reshape([-1, weight.size()[1]])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};
    use tch::Kind;

    /// The unfused computation: the reference activation, then `linear`.
    fn unfused(activation: Activation, inputs: &[Option<&Tensor>], w: &Tensor) -> Tensor {
        let y = activation.reference(inputs).unwrap();
        y.reshape([-1, w.size()[1]]).linear::<Tensor>(w, None)
    }

    /// Outputs and every gradient of the fused op against the unfused computation, in f64 on the
    /// CPU, for both activations, odd sizes and rows of several norm rows.
    #[test]
    fn equals_the_activation_then_the_product() {
        let mut rng = Rng::new(11);
        for (shape, n_in, n_out) in [(vec![3, 5, 7], 7, 4), (vec![2, 3, 4, 6], 24, 9)] {
            let n = *shape.last().unwrap();
            let a = rng.randn(&shape, Kind::Double).set_requires_grad(true);
            let b = rng.randn(&shape, Kind::Double).set_requires_grad(true);
            let nw = (rng.randn(&[n], Kind::Double) * 0.3 + 1.0).set_requires_grad(true);
            let w = rng
                .randn(&[n_out, n_in], Kind::Double)
                .set_requires_grad(true);
            let rows = shape.iter().product::<i64>() / n_in;
            let dout = rng.randn(&[rows, n_out], Kind::Double);
            let cases: [(Activation, Vec<&Tensor>); 3] = [
                (Activation::SwiGlu, vec![&a, &b]),
                (Activation::RmsNorm { eps: 1e-6 }, vec![&a, &nw, &b]),
                (Activation::RmsNorm { eps: 1e-6 }, vec![&a, &nw]),
            ];
            for (activation, leaves) in cases {
                let mut inputs: Vec<Option<&Tensor>> = leaves.iter().copied().map(Some).collect();
                inputs.resize(activation.arity(), None);
                let got = match activation {
                    Activation::SwiGlu => swiglu_linear(&a, &b, &w, None),
                    Activation::RmsNorm { eps } => {
                        rms_norm_linear(&a, &nw, eps, inputs[2], &w, None)
                    }
                }
                .unwrap();
                let want = unfused(activation, &inputs, &w);
                assert!(rel_rms(&got, &want) < 1e-14, "{activation:?}");
                let all: Vec<&Tensor> = leaves.iter().copied().chain([&w]).collect();
                let g_got = autograd::grad(&got, &dout, &all).unwrap();
                let g_want = autograd::grad(&want, &dout, &all).unwrap();
                for (i, (x, y)) in g_got.iter().zip(&g_want).enumerate() {
                    assert!(rel_rms(x, y) < 1e-12, "{activation:?} gradient {i}");
                }
            }
        }
    }

    /// A known product is the output (no second product), and the gradients are the plain op's.
    #[test]
    fn a_known_product_is_returned_with_the_ops_backward() {
        let mut rng = Rng::new(12);
        let a = rng.randn(&[4, 6], Kind::Double).set_requires_grad(true);
        let b = rng.randn(&[4, 6], Kind::Double).set_requires_grad(true);
        let w = rng.randn(&[5, 6], Kind::Double).set_requires_grad(true);
        let plain = swiglu_linear(&a, &b, &w, None).unwrap();
        let known = plain.detach() + 0.0;
        let got = swiglu_linear(&a, &b, &w, Some(&known)).unwrap();
        assert_eq!(rel_rms(&got, &plain), 0.0);
        let dout = rng.randn(&[4, 5], Kind::Double);
        let g_got = autograd::grad(&got, &dout, &[&a, &b, &w]).unwrap();
        let g_plain = autograd::grad(&plain, &dout, &[&a, &b, &w]).unwrap();
        for (x, y) in g_got.iter().zip(&g_plain) {
            assert_eq!(rel_rms(x, y), 0.0);
        }
    }

    #[test]
    fn bad_weights_and_products_name_the_tensor() {
        let mut rng = Rng::new(13);
        let a = rng.randn(&[4, 6], Kind::Float);
        let w = rng.randn(&[5, 6], Kind::Float);
        let cases = [
            (
                swiglu_linear(&a, &a, &w.view([30]), None),
                "swiglu_linear: weight must be [out, in]",
            ),
            (
                swiglu_linear(&a, &a, &rng.randn(&[5, 7], Kind::Float), None),
                "in dividing the activation's 24 elements",
            ),
            (
                swiglu_linear(&a, &a, &w.to_kind(Kind::Double), None),
                "weight has dtype Double; expected the activation's dtype Float",
            ),
            (
                swiglu_linear(&a, &a, &w, Some(&rng.randn(&[4, 4], Kind::Float))),
                "product must be [4, 5]",
            ),
            (
                rms_norm_linear(&a, &rng.randn(&[5], Kind::Float), 1e-6, None, &w, None),
                "rms_norm: weight must be [6]",
            ),
        ];
        for (result, message) in cases {
            let err = result.unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert!(err.to_string().contains(message), "{err}");
        }
    }
}
