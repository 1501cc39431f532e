//! RMSNorm over the last dimension with an optional swish gate, by libtorch's `rms_norm`:
//!
//! ```text
//! y = x / sqrt(mean(x^2) + eps) * weight [* gate * sigmoid(gate)]
//! ```

use tch::{TchError, Tensor};

use super::common::compute_kind;

/// The normalised, scaled and gated `x` in x's dtype, computed in fp32 (f64 if any input is
/// f64).
///
/// # Shapes
/// `x: [..., n]`, `weight: [n]`, `gate`: x's shape -> x's shape.
pub fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    gate: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    let inputs: Vec<&Tensor> = [x, weight].into_iter().chain(gate).collect();
    let kind = compute_kind(&inputs, None);
    let n = x.size().last().copied().unwrap_or(0);
    let y = x
        .f_to_kind(kind)?
        .f_rms_norm([n], Some(weight.f_to_kind(kind)?), eps)?;
    let y = match gate {
        Some(g) => y.f_mul(&g.f_to_kind(kind)?.f_silu()?)?,
        None => y,
    };
    y.f_to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{gradcheck, rel_rms, GradcheckOptions, Rng};
    use tch::Kind;

    /// The formula in elementwise ops.
    fn formula(x: &Tensor, w: &Tensor, eps: f64, g: Option<&Tensor>) -> Tensor {
        let y = x * (x.square().mean_dim(-1, true, x.kind()) + eps).rsqrt() * w;
        match g {
            Some(g) => y * g * g.sigmoid(),
            None => y,
        }
    }

    #[test]
    fn equals_the_formula_value_by_value() {
        let x = Tensor::from_slice(&[0.3f64, -1.2, 2.0, 0.01]);
        let w = Tensor::from_slice(&[1.0f64, 2.0, 0.5, -1.0]);
        let got = Vec::<f64>::try_from(rms_norm(&x, &w, 1e-6, None).unwrap()).unwrap();
        let ms = [0.3f64, -1.2, 2.0, 0.01].iter().map(|v| v * v).sum::<f64>() / 4.0;
        let want: Vec<f64> = [0.3f64, -1.2, 2.0, 0.01]
            .iter()
            .zip([1.0, 2.0, 0.5, -1.0])
            .map(|(v, w)| v / (ms + 1e-6).sqrt() * w)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    /// libtorch's RMSNorm against the formula in elementwise ops, and both against central
    /// differences, in f64: values and every gradient, with and without the gate.
    #[test]
    fn gradients_match_the_formula() {
        let mut rng = Rng::new(11);
        let x = rng.randn(&[5, 24], Kind::Double);
        let w = rng.randn(&[24], Kind::Double);
        let g = rng.randn(&[5, 24], Kind::Double) * 3.0;
        let dy = rng.randn(&[5, 24], Kind::Double);
        for gated in [false, true] {
            let leaves: Vec<Tensor> = [&x, &w, &g]
                .iter()
                .map(|t| t.detach().copy().set_requires_grad(true))
                .collect();
            let gate = gated.then_some(&leaves[2]);
            let ours = rms_norm(&leaves[0], &leaves[1], 1e-6, gate).unwrap();
            let want = formula(&leaves[0], &leaves[1], 1e-6, gate);
            assert!(rel_rms(&ours, &want) < 1e-12);
            let inputs: Vec<&Tensor> = leaves.iter().take(2 + usize::from(gated)).collect();
            let a = glatrain_shim::autograd::grad(&ours, &dy, &inputs).unwrap();
            let b = glatrain_shim::autograd::grad(&want, &dy, &inputs).unwrap();
            for (a, b) in a.iter().zip(&b) {
                assert!(rel_rms(a, b) < 1e-12, "{}", rel_rms(a, b));
            }
            let loss = |t: &[Tensor]| {
                let gate = t.get(2);
                (rms_norm(&t[0], &t[1], 1e-6, gate).unwrap() * &dy).sum(Kind::Double)
            };
            let named = [("x", &x), ("w", &w), ("g", &g)];
            gradcheck(
                loss,
                &named[..2 + usize::from(gated)],
                &GradcheckOptions::default(),
            )
            .unwrap();
        }
    }

    #[test]
    fn half_inputs_compute_in_fp32_and_keep_their_dtype() {
        let mut rng = Rng::new(12);
        let x = rng.randn(&[3, 16], Kind::BFloat16);
        let w = rng.randn(&[16], Kind::Float);
        let g = rng.randn(&[3, 16], Kind::BFloat16);
        let y = rms_norm(&x, &w, 1e-6, Some(&g)).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        let exact = rms_norm(
            &x.to_kind(Kind::Double),
            &w.to_kind(Kind::Double),
            1e-6,
            Some(&g.to_kind(Kind::Double)),
        )
        .unwrap();
        // One rounding to bf16 (relative 2^-9 at most).
        let err = (y.to_kind(Kind::Double) - &exact).abs() / exact.abs();
        assert!(err.max().double_value(&[]) <= 2f64.powi(-8), "{err}");
    }
}
