//! The causal depthwise convolution with silu (Mamba's `conv1d`, flash-linear-attention's
//! `ShortConvolution`), over whole rows or packed documents.

use tch::{Kind, TchError, Tensor};

/// `y_t = silu(bias + sum_{j<K} w_j x_{t-K+1+j})`, zero before the row's first step; with
/// `resets`, also zero before the latest restart at or before t (each document convolved as if
/// it were alone). Computed in fp32 (f64 for f64 inputs), returned in x's dtype.
///
/// Without restarts, libtorch's grouped `conv1d`; with them, a sum of the K shifted inputs, each
/// masked where its step lies in another document.
///
/// # Shapes
/// `x: [B, T, D]`, `w: [D, K]`, `bias: [D]`, `resets: [B, T]` bool -> `[B, T, D]`.
pub fn causal_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    resets: Option<&Tensor>,
) -> Result<Tensor, TchError> {
    let kind = if x.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let (t, d, k) = (x.size()[1], w.size()[0], w.size()[1]);
    let xc = x.f_to_kind(kind)?;
    let w = w.f_to_kind(kind)?;
    let bias = bias.map(|b| b.f_to_kind(kind)).transpose()?;
    let pre = match resets {
        None => xc
            .f_transpose(1, 2)?
            .f_conv1d(&w.f_view([d, 1, k])?, bias.as_ref(), [1], [k - 1], [1], d)?
            .f_narrow(2, 0, t)?
            .f_transpose(1, 2)?,
        Some(resets) => {
            // Each step's document number within its row, from 1 (0 marks the padding before the
            // row); tap j reads step t - (K - 1 - j).
            let ids = resets.f_cumsum(1, Kind::Int64)?.f_add_scalar(1)?;
            let mut pre = match &bias {
                Some(b) => b.f_expand_as(&xc)?,
                None => xc.f_zeros_like()?,
            };
            for j in 0..k {
                let shift = k - 1 - j;
                if shift >= t {
                    continue;
                }
                let src = xc
                    .f_narrow(1, 0, t - shift)?
                    .f_constant_pad_nd([0, 0, shift, 0])?;
                let src_ids = ids
                    .f_narrow(1, 0, t - shift)?
                    .f_constant_pad_nd([shift, 0])?;
                let same = src_ids
                    .f_eq_tensor(&ids)?
                    .f_unsqueeze(-1)?
                    .f_to_kind(kind)?;
                pre = pre.f_add(&src.f_mul(&w.f_select(1, j)?)?.f_mul(&same)?)?;
            }
            pre
        }
    };
    pre.f_silu()?.f_to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{gradcheck, rel_rms, GradcheckOptions, Rng};
    use tch::Device;

    /// f64 inputs of `t` steps: x `[2, t, 3]`, a width-4 weight `[3, 4]`, bias `[3]`.
    fn inputs(rng: &mut Rng, t: i64) -> (Tensor, Tensor, Tensor) {
        let kd = Kind::Double;
        (
            rng.randn(&[2, t, 3], kd),
            rng.randn(&[3, 4], kd),
            rng.randn(&[3], kd),
        )
    }

    #[test]
    fn rows_as_one_document_match_the_direct_sum_and_the_masked_form() {
        let (x, w, b) = inputs(&mut Rng::new(4), 6);
        let y = causal_conv(&x, &w, Some(&b), None).unwrap();
        for t in 0..6 {
            let mut acc = b.expand([2, 3], false).copy();
            for j in 0..4 {
                let src = t - 3 + j;
                if src >= 0 {
                    acc += x.select(1, src) * w.select(1, j);
                }
            }
            assert!(rel_rms(&y.select(1, t), &acc.silu()) < 1e-14, "t {t}");
        }
        let none = Tensor::zeros([2, 6], (Kind::Bool, Device::Cpu));
        let masked = causal_conv(&x, &w, Some(&b), Some(&none)).unwrap();
        assert!(rel_rms(&masked, &y) < 1e-14);
    }

    #[test]
    fn documents_are_convolved_apart_with_their_gradients() {
        let mut rng = Rng::new(6);
        let (x, w, b) = inputs(&mut rng, 9);
        let mut flags = vec![false; 18];
        for p in [2, 3, 9 + 8] {
            flags[p] = true;
        }
        let resets = Tensor::from_slice(&flags).view([2, 9]);
        let y = causal_conv(&x, &w, Some(&b), Some(&resets)).unwrap();
        for (row, begin, len) in [(0, 0, 2), (0, 2, 1), (0, 3, 6), (1, 0, 8), (1, 8, 1)] {
            let piece = x.narrow(0, row, 1).narrow(1, begin, len);
            let want = causal_conv(&piece, &w, Some(&b), None).unwrap();
            let got = y.narrow(0, row, 1).narrow(1, begin, len);
            assert!(rel_rms(&got, &want) < 1e-14, "row {row} from {begin}");
        }
        let kd = Kind::Double;
        let dy = rng.randn(&[2, 9, 3], kd);
        let loss = |t: &[Tensor]| {
            (causal_conv(&t[0], &t[1], Some(&t[2]), Some(&resets)).unwrap() * &dy).sum(kd)
        };
        let inputs = [("x", &x), ("w", &w), ("bias", &b)];
        gradcheck(loss, &inputs, &GradcheckOptions::default()).unwrap();
    }
}
