//! An activation and the matrix products it feeds, as one op that does not keep the products'
//! input for the backward:
//!
//! - [`swiglu_linear`]: `swiglu(a, b) W^T`, the SwiGLU block's activation and `down_proj`;
//! - [`rms_norm_linear`]: `rms_norm(x, weight, eps, gate) W_i^T` for several weights: a block's
//!   norm and the projections that read it (q, k, v, ... or the MLP's gate and up), and GLA's
//!   gated output norm and `o_proj`.
//!
//! A matrix product keeps its input for the weight gradient: `[tokens, in]` per layer, from the
//! forward to the backward. The activation's backward needs only the activation's inputs, which
//! are kept anyway; so these ops keep those alone. Their backward sums the products' input
//! gradients (each product added into the running sum by the matrix multiply itself), runs the
//! activation's backward kernel, which also writes the activation's output again (the forward's
//! bits), and takes the weight gradients from that. The price is one more write of `[tokens, in]`
//! (and its cast to the weights' dtype) in the backward.
//!
//! The products run in the weights' dtype: an fp32 norm output is cast once to bf16 weights, as
//! autocast would cast it. CUDA activations of f32, bf16 or f16 run the kernels of
//! `kernels/fused.cu`; everything else runs the references, the backward by autograd through
//! them, so the CPU runs the op's plumbing.

use std::sync::Mutex;

use glatrain_shim::autograd::{self, CustomOp, Forward, MAX_TENSORS};
use tch::{Device, Tensor};

use super::{contiguous, norm, swiglu};
use crate::error::{is_float, require_device};
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
/// `weight: [out, in]` -> `[a.numel() / in, out]` in the weight's dtype.
pub fn swiglu_linear(
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    product: Option<&Tensor>,
) -> Result<Tensor, OpError> {
    swiglu::check(a, b)?;
    let activation = Activation::SwiGlu;
    let products = product.map(|p| vec![p.shallow_clone()]);
    check_products(activation, a, &[weight], products.as_deref())?;
    let kernels = runs_kernels(a);
    let (a, b) = (prepared(a, kernels)?, prepared(b, kernels)?);
    let inputs = [Some(&a), Some(&b)];
    let [y] = project(activation, kernels, &inputs, &[weight], products)?
        .try_into()
        .map_err(|_| activation.missing("the output"))?;
    Ok(y)
}

/// `rms_norm(x, norm_weight, eps, gate) W_i^T` ([`super::rms_norm`]) for each weight: the
/// normalised elements taken as rows of `in` (one or several norm rows each, as GLA's heads feed
/// `o_proj`) and multiplied by each transposed weight, differentiable in x, the weights and the
/// gate. `products` as `product` in [`swiglu_linear`], one per weight.
///
/// # Shapes
/// `x: [..., n]`, `norm_weight: [n]`, `gate`: x's shape and dtype; `weights: [out_i, in]`, one
/// dtype, with `in` dividing x's element count -> `[x.numel() / in, out_i]` in the weights' dtype.
pub fn rms_norm_linear(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    gate: Option<&Tensor>,
    weights: &[&Tensor],
    products: Option<&[Tensor]>,
) -> Result<Vec<Tensor>, OpError> {
    norm::check(x, norm_weight, eps, gate)?;
    let activation = Activation::RmsNorm { eps };
    check_products(activation, x, weights, products)?;
    let kernels = runs_kernels(x);
    let x = prepared(x, kernels)?;
    let gate = gate.map(|g| prepared(g, kernels)).transpose()?;
    let inputs = [Some(&x), Some(norm_weight), gate.as_ref()];
    let products = products.map(|p| p.iter().map(Tensor::shallow_clone).collect());
    project(activation, kernels, &inputs, weights, products)
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

/// The weights (and known products) against the activation's first input `x`.
fn check_products(
    activation: Activation,
    x: &Tensor,
    weights: &[&Tensor],
    products: Option<&[Tensor]>,
) -> Result<(), OpError> {
    let op = activation.name();
    let numel = x.numel() as i64;
    let most = MAX_TENSORS - activation.arity();
    let Some(first) = weights.first().filter(|_| weights.len() <= most) else {
        return Err(OpError::Scalar {
            op,
            name: "weights.len()",
            value: weights.len() as f64,
            expected: "must be at least 1, with the activation's inputs at most 16 tensors",
        });
    };
    let n_in = first.size().get(1).copied().unwrap_or(0);
    for w in weights {
        let shape = w.size();
        if shape.len() != 2 || shape[1] != n_in || n_in < 1 || numel % n_in != 0 {
            let expected = format!(
                "[out, in], one in for every weight, dividing the activation's {numel} elements"
            );
            return Err(OpError::shape(op, "weight", expected, shape));
        }
        if !is_float(w.kind()) || w.kind() != first.kind() {
            let expected = format!("expected one floating-point dtype, {:?}", first.kind());
            return Err(OpError::dtype(op, "weight", expected, w.kind()));
        }
        require_device("weight", w, x)?;
    }
    let Some(products) = products else {
        return Ok(());
    };
    if products.len() != weights.len() {
        return Err(OpError::Scalar {
            op,
            name: "products.len()",
            value: products.len() as f64,
            expected: "must equal weights.len()",
        });
    }
    for (p, w) in products.iter().zip(weights) {
        let rows = [numel / n_in, w.size()[0]];
        if p.size() != rows {
            return Err(OpError::shape(op, "product", format!("{rows:?}"), p.size()));
        }
    }
    Ok(())
}

/// Runs `activation` on `inputs` and multiplies by each `weights^T` as one autograd op.
fn project(
    activation: Activation,
    kernels: bool,
    inputs: &[Option<&Tensor>],
    weights: &[&Tensor],
    products: Option<Vec<Tensor>>,
) -> Result<Vec<Tensor>, OpError> {
    let op = ProjectedOp {
        activation,
        kernels,
        products: Mutex::new(products.map(|ps| ps.iter().map(Tensor::detach).collect())),
    };
    let all: Vec<Option<&Tensor>> = inputs
        .iter()
        .copied()
        .chain(weights.iter().copied().map(Some))
        .collect();
    autograd::apply(Box::new(op), &all).map_err(OpError::Autograd)
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

/// The op: inputs (the activation's, then the weights), one output per weight, saved (the
/// inputs, then the activation's statistic where it has one).
struct ProjectedOp {
    activation: Activation,
    kernels: bool,
    /// The products' values where they are known already; the forward takes them.
    products: Mutex<Option<Vec<Tensor>>>,
}

impl ProjectedOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, OpError> {
        let arity = self.activation.arity();
        let weights = self.weights(inputs)?;
        let (y, kept) = self.activation.forward(&inputs[..arity], self.kernels)?;
        let known = self
            .products
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let outputs = match known {
            Some(products) => products,
            None => {
                let rows = product_rows(&y, &weights)?;
                weights
                    .iter()
                    .map(|w| rows.f_linear::<Tensor>(w, None))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(Forward::saving(outputs, inputs, [kept]))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, OpError> {
        let arity = self.activation.arity();
        let weights = self.weights(&saved[..saved.len() - 1])?;
        let kept = saved.last().copied().flatten();
        // The products' input gradient: each output's added into the sum by its product.
        let mut sum: Option<Tensor> = None;
        for (dout, w) in grads.iter().zip(&weights) {
            if let Some(dout) = dout {
                sum = Some(match sum {
                    None => dout.f_mm(w)?,
                    Some(mut acc) => acc.f_addmm_(dout, w)?,
                });
            }
        }
        let Some(sum) = sum else {
            return Ok((0..arity + weights.len()).map(|_| None).collect());
        };
        let first = self.activation.input(saved, 0)?;
        let dy = sum.f_to_kind(first.kind())?.f_reshape(first.size())?;
        let (mut input_grads, y) =
            self.activation
                .backward(&saved[..arity], kept, &dy, self.kernels)?;
        let rows = product_rows(&y, &weights)?;
        for dout in grads.iter().take(weights.len()) {
            input_grads.push(dout.map(|d| d.f_tr()?.f_mm(&rows)).transpose()?);
        }
        Ok(input_grads)
    }

    /// The weights among the op's inputs (or saved tensors, less the statistic).
    fn weights<'a>(&self, list: &[Option<&'a Tensor>]) -> Result<Vec<&'a Tensor>, OpError> {
        let arity = self.activation.arity();
        (arity..list.len())
            .map(|i| self.activation.input(list, i))
            .collect()
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

/// The activation's output as the products' rows: `[numel / in, in]` in the weights' dtype.
fn product_rows(y: &Tensor, weights: &[&Tensor]) -> Result<Tensor, OpError> {
    let w = weights[0];
    let rows = y.f_reshape([-1, w.size()[1]])?;
    Ok(if rows.kind() == w.kind() {
        rows
    } else {
        rows.f_to_kind(w.kind())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};
    use tch::Kind;

    /// The unfused computation: the reference activation, cast to the weights' dtype, then
    /// `linear` with each weight.
    fn unfused(activation: Activation, inputs: &[Option<&Tensor>], ws: &[&Tensor]) -> Vec<Tensor> {
        let y = activation.reference(inputs).unwrap();
        let rows = y.reshape([-1, ws[0].size()[1]]).to_kind(ws[0].kind());
        ws.iter().map(|w| rows.linear::<Tensor>(w, None)).collect()
    }

    /// Outputs and every gradient of the fused ops against the unfused computation on the CPU,
    /// for both activations, odd sizes, rows of several norm rows, one to three weights, and
    /// weights of another dtype than the activation (as bf16 weights under fp32 norms).
    #[test]
    fn equal_the_activation_then_the_products() {
        let mut rng = Rng::new(11);
        let cases = [
            (vec![3, 5, 7], 7, Kind::Double, Kind::Double, 1e-12),
            (vec![2, 3, 4, 6], 24, Kind::Double, Kind::Double, 1e-12),
            (vec![5, 9], 9, Kind::Float, Kind::Double, 1e-6),
        ];
        for (shape, n_in, act_kind, w_kind, tolerance) in cases {
            let n = *shape.last().unwrap();
            let leaf = |t: Tensor, k: Kind| t.to_kind(k).set_requires_grad(true);
            let a = leaf(rng.randn(&shape, Kind::Double), act_kind);
            let b = leaf(rng.randn(&shape, Kind::Double), act_kind);
            let nw = leaf(rng.randn(&[n], Kind::Double) * 0.3 + 1.0, Kind::Float);
            let ws: Vec<Tensor> = [4, 1, 6]
                .iter()
                .map(|&out| leaf(rng.randn(&[out, n_in], Kind::Double), w_kind))
                .collect();
            let rows = shape.iter().product::<i64>() / n_in;
            for (activation, count, gated) in [
                (Activation::SwiGlu, 1, false),
                (Activation::RmsNorm { eps: 1e-6 }, 3, true),
                (Activation::RmsNorm { eps: 1e-6 }, 2, false),
            ] {
                let w: Vec<&Tensor> = ws.iter().take(count).collect();
                let leaves: Vec<&Tensor> = match activation {
                    Activation::SwiGlu => vec![&a, &b],
                    Activation::RmsNorm { .. } if gated => vec![&a, &nw, &b],
                    Activation::RmsNorm { .. } => vec![&a, &nw],
                };
                let mut inputs: Vec<Option<&Tensor>> = leaves.iter().copied().map(Some).collect();
                inputs.resize(activation.arity(), None);
                let got = match activation {
                    Activation::SwiGlu => vec![swiglu_linear(&a, &b, w[0], None).unwrap()],
                    Activation::RmsNorm { eps } => {
                        rms_norm_linear(&a, &nw, eps, inputs[2], &w, None).unwrap()
                    }
                };
                let want = unfused(activation, &inputs, &w);
                let label = format!("{activation:?} {shape:?} {count} weights {w_kind:?}");
                let all: Vec<&Tensor> = leaves.iter().copied().chain(w.iter().copied()).collect();
                let (mut loss_got, mut loss_want) = (Tensor::from(0.0), Tensor::from(0.0));
                for (g, v) in got.iter().zip(&want) {
                    assert_eq!(g.size(), [rows, v.size()[1]], "{label}");
                    assert!(rel_rms(g, v) <= tolerance, "{label}");
                    let dout = rng.randn(&v.size(), w_kind);
                    loss_got += (g * &dout).sum(Kind::Double);
                    loss_want += (v * &dout).sum(Kind::Double);
                }
                let g_got = autograd::grad(&loss_got, &Tensor::from(1.0), &all).unwrap();
                let g_want = autograd::grad(&loss_want, &Tensor::from(1.0), &all).unwrap();
                for (i, (x, y)) in g_got.iter().zip(&g_want).enumerate() {
                    assert!(rel_rms(x, y) <= tolerance, "{label}: gradient {i}");
                }
            }
        }
    }

    /// Known products are the outputs (no second product), and the gradients are the plain op's.
    #[test]
    fn known_products_are_returned_with_the_ops_backward() {
        let mut rng = Rng::new(12);
        let x = rng.randn(&[4, 6], Kind::Double).set_requires_grad(true);
        let nw = rng.randn(&[6], Kind::Double).set_requires_grad(true);
        let w1 = rng.randn(&[5, 6], Kind::Double).set_requires_grad(true);
        let w2 = rng.randn(&[2, 6], Kind::Double).set_requires_grad(true);
        let plain = rms_norm_linear(&x, &nw, 1e-6, None, &[&w1, &w2], None).unwrap();
        let known: Vec<Tensor> = plain.iter().map(|p| p.detach() + 0.0).collect();
        let got = rms_norm_linear(&x, &nw, 1e-6, None, &[&w1, &w2], Some(&known)).unwrap();
        let dout = [
            rng.randn(&[4, 5], Kind::Double),
            rng.randn(&[4, 2], Kind::Double),
        ];
        let loss = |outs: &[Tensor]| {
            (&outs[0] * &dout[0]).sum(Kind::Double) + (&outs[1] * &dout[1]).sum(Kind::Double)
        };
        for (g, p) in got.iter().zip(&plain) {
            assert_eq!(rel_rms(g, p), 0.0);
        }
        let all = [&x, &nw, &w1, &w2];
        let g_got = autograd::grad(&loss(&got), &Tensor::from(1.0), &all).unwrap();
        let g_plain = autograd::grad(&loss(&plain), &Tensor::from(1.0), &all).unwrap();
        for (g, p) in g_got.iter().zip(&g_plain) {
            assert_eq!(rel_rms(g, p), 0.0);
        }
    }

    #[test]
    fn bad_weights_and_products_name_the_tensor() {
        let mut rng = Rng::new(13);
        let a = rng.randn(&[4, 6], Kind::Float);
        let w = rng.randn(&[5, 6], Kind::Float);
        let nw = rng.randn(&[6], Kind::Float);
        let norm = |ws: &[&Tensor]| rms_norm_linear(&a, &nw, 1e-6, None, ws, None).map(|_| ());
        let cases = [
            (
                swiglu_linear(&a, &a, &w.view([30]), None).map(|_| ()),
                "swiglu_linear: weight must be [out, in]",
            ),
            (
                swiglu_linear(&a, &a, &rng.randn(&[5, 7], Kind::Float), None).map(|_| ()),
                "dividing the activation's 24 elements",
            ),
            (
                norm(&[&w, &rng.randn(&[3, 4], Kind::Float)]),
                "one in for every weight",
            ),
            (
                norm(&[&w, &w.to_kind(Kind::Double)]),
                "weight has dtype Double; expected one floating-point dtype, Float",
            ),
            (norm(&[]), "weights.len() = 0 must be at least 1"),
            (
                swiglu_linear(&a, &a, &w, Some(&rng.randn(&[4, 4], Kind::Float))).map(|_| ()),
                "product must be [4, 5]",
            ),
            (
                rms_norm_linear(&a, &nw, 1e-6, None, &[&w], Some(&[])).map(|_| ()),
                "products.len() = 0 must equal weights.len()",
            ),
            (
                rms_norm_linear(&a, &rng.randn(&[5], Kind::Float), 1e-6, None, &[&w], None)
                    .map(|_| ()),
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
