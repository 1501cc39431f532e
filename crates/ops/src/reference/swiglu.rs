//! SwiGLU's activation `silu(a) * b`, as the unfused model computed it: two tensor ops in the
//! inputs' dtype.

use tch::{TchError, Tensor};

/// `a * sigmoid(a) * b`.
///
/// # Shapes
/// `a`, `b`: one shape -> the same.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor, TchError> {
    a.f_silu()?.f_mul(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{gradcheck, GradcheckOptions, Rng};
    use tch::Kind;

    #[test]
    fn values_and_gradients() {
        let a = Tensor::from_slice(&[-3.0f64, 0.0, 0.5, 4.0]);
        let b = Tensor::from_slice(&[2.0f64, 1.0, -1.0, 0.25]);
        let got = Vec::<f64>::try_from(swiglu(&a, &b).unwrap()).unwrap();
        for (i, (x, y)) in [(-3.0f64, 2.0), (0.0, 1.0), (0.5, -1.0), (4.0, 0.25)]
            .into_iter()
            .enumerate()
        {
            let want = x / (1.0 + (-x).exp()) * y;
            assert!((got[i] - want).abs() < 1e-12, "{got:?}");
        }
        let mut rng = Rng::new(5);
        let (a, b) = (
            rng.randn(&[7, 3], Kind::Double),
            rng.randn(&[7, 3], Kind::Double),
        );
        let dy = rng.randn(&[7, 3], Kind::Double);
        let loss = |t: &[Tensor]| (swiglu(&t[0], &t[1]).unwrap() * &dy).sum(Kind::Double);
        gradcheck(loss, &[("a", &a), ("b", &b)], &GradcheckOptions::default()).unwrap();
    }
}
