//! The rotary position embedding (LLaMA's non-interleaved "rotate half" form) in tensor ops.

use tch::{TchError, Tensor};

use super::common::compute_kind;

/// Rotates each head's pairs `(x_i, x_{i+h})`, `i < h = D / 2`, by their angles:
/// `(x_i c - x_{i+h} s, x_{i+h} c + x_i s)` with `c, s` the tables' cos and sin. Computed in fp32
/// (f64 for f64 inputs), returned in x's dtype.
///
/// # Shapes
/// `x: [B, T, H, D]`; `cos, sin: [T, D / 2]` (every row alike) or `[B, T, D / 2]` -> x's shape.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let kind = compute_kind(&[x, cos], None);
    let half = x.size()[3] / 2;
    // [.., T, 1, half]: one angle per token and pair, the same for every head.
    let table = |t: &Tensor| t.f_unsqueeze(-2)?.f_to_kind(kind);
    let (c, s) = (table(cos)?, table(sin)?);
    let xf = x.f_to_kind(kind)?;
    let (x1, x2) = (xf.f_narrow(3, 0, half)?, xf.f_narrow(3, half, half)?);
    let y1 = x1.f_mul(&c)?.f_sub(&x2.f_mul(&s)?)?;
    let y2 = x2.f_mul(&c)?.f_add(&x1.f_mul(&s)?)?;
    Tensor::f_cat(&[y1, y2], 3)?.f_to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{gradcheck, GradcheckOptions, Rng};
    use tch::Kind;

    /// Each pair rotated by its own angle, value by value, and the gradient by gradcheck.
    #[test]
    fn rotates_each_pair_by_its_angle() {
        let mut rng = Rng::new(31);
        let x = rng.randn(&[2, 3, 2, 6], Kind::Double);
        let angles = rng.randn(&[2, 3, 3], Kind::Double);
        let (cos, sin) = (angles.cos(), angles.sin());
        let got = rotary(&x, &cos, &sin).unwrap();
        for (b, t, h, i) in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 1)] {
            let a = angles.double_value(&[b, t, i]);
            let (u, v) = (
                x.double_value(&[b, t, h, i]),
                x.double_value(&[b, t, h, i + 3]),
            );
            let (c, s) = (a.cos(), a.sin());
            assert!((got.double_value(&[b, t, h, i]) - (u * c - v * s)).abs() < 1e-12);
            assert!((got.double_value(&[b, t, h, i + 3]) - (v * c + u * s)).abs() < 1e-12);
        }
        // Tables shared by the rows.
        let first = angles.select(0, 0);
        let (cos, sin) = (first.cos(), first.sin());
        let loss = |t: &[Tensor]| (rotary(&t[0], &cos, &sin).unwrap() * &x).sum(Kind::Double);
        gradcheck(loss, &[("x", &x)], &GradcheckOptions::default()).unwrap();
    }
}
