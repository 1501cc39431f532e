//! libtorch's causal scaled-dot-product attention on `[B, T, H, D]` tensors, and which of its
//! backends runs it.
//!
//! libtorch picks a backend per call. On an H100 with libtorch 2.11 and cuDNN 9 it picks cuDNN's
//! kernel for bf16 causal attention, not FlashAttention-2, and the two differ by up to 1.9x
//! (flash-linear-attention's comparisons use FlashAttention-2 alone). `glatrain_shim::sdp::OnlyBackend`
//! narrows the choice the way `torch.nn.attention.sdpa_kernel` does; [`chosen_backend`] says what
//! libtorch would run.

use glatrain_shim::sdp::SdpaBackend;
use tch::{Kind, TchError, Tensor};

/// q, k, v as [B, H, T, D] views, SDPA's layout (it handles the strides).
fn heads_first(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[Tensor; 3], TchError> {
    Ok([
        q.f_transpose(1, 2)?,
        k.f_transpose(1, 2)?,
        v.f_transpose(1, 2)?,
    ])
}

/// Causal softmax attention with scale 1/sqrt(D), on whichever backend libtorch picks.
///
/// # Shapes
///
/// q, k: [B, T, H, D], v: [B, T, H, Dv]; returns [B, T, H, Dv] (a view with heads-first strides).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, TchError> {
    let [q, k, v] = heads_first(q, k, v)?;
    Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)?
        .f_transpose(1, 2)
}

/// The backend libtorch would run [`causal_sdpa`] on for these inputs, with the backends enabled
/// now; `None` when none of them supports the inputs.
pub fn chosen_backend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<SdpaBackend>, TchError> {
    let [q, k, v] = heads_first(q, k, v)?;
    let choice =
        Tensor::f_internal_fused_sdp_choice::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)?;
    Ok(SdpaBackend::from_index(choice))
}

/// The obviously right reference of [`causal_sdpa`]: softmax(q k^T / sqrt(D) + causal mask) v,
/// every product and the softmax in `kind`.
///
/// # Shapes
///
/// As [`causal_sdpa`].
pub fn naive_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, kind: Kind) -> Tensor {
    let (t, d) = (q.size()[1], q.size()[3]);
    let [q, k, v] = [q, k, v].map(|x| x.to_kind(kind).transpose(1, 2));
    let scores = q.matmul(&k.transpose(2, 3)) / (d as f64).sqrt();
    let future = Tensor::ones([t, t], (Kind::Bool, q.device())).triu(1);
    let p = scores
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, kind);
    p.matmul(&v).transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_shim::sdp::{enabled_mask, OnlyBackend};
    use tch::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        naive_causal_attention(q, k, v, Kind::Double)
    }

    #[test]
    fn naive_attention_of_one_token_is_its_value_and_later_keys_are_masked() {
        let opts = (Kind::Double, Device::Cpu);
        let (q, k, v) = (
            Tensor::randn([1, 3, 1, 4], opts),
            Tensor::randn([1, 3, 1, 4], opts),
            Tensor::randn([1, 3, 1, 2], opts),
        );
        let o = naive(&q, &k, &v);
        // Token 0 attends only to itself; token 1 mixes values 0 and 1 by the softmax of scores.
        let err0 = (o.get(0).get(0) - v.get(0).get(0))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err0 < 1e-12, "{err0}");
        let s: Vec<f64> = (0..2)
            .map(|j| {
                (q.get(0).get(1) * k.get(0).get(j))
                    .sum(Kind::Double)
                    .double_value(&[])
                    / 2.0
            })
            .collect();
        let w1 = 1.0 / (1.0 + (s[0] - s[1]).exp());
        let want = v.get(0).get(0) * (1.0 - w1) + v.get(0).get(1) * w1;
        let err1 = (o.get(0).get(1) - want).abs().max().double_value(&[]);
        assert!(err1 < 1e-12, "{err1}");
    }

    fn inputs() -> (Tensor, Tensor, Tensor) {
        let opts = (Kind::Double, Device::Cpu);
        (
            Tensor::randn([2, 7, 3, 5], opts),
            Tensor::randn([2, 7, 3, 5], opts),
            Tensor::randn([2, 7, 3, 4], opts),
        )
    }

    #[test]
    fn causal_sdpa_is_masked_softmax_attention_in_the_token_major_layout() {
        let (q, k, v) = inputs();
        let o = causal_sdpa(&q, &k, &v).unwrap();
        assert_eq!(o.size(), [2, 7, 3, 4]);
        let err = (&o - naive(&q, &k, &v)).abs().max().double_value(&[]);
        assert!(err < 1e-12, "{err}");
    }

    #[test]
    fn only_backend_narrows_the_choice_and_restores_it_on_drop() {
        let (q, k, v) = inputs();
        let before = enabled_mask();
        {
            let _only = OnlyBackend::new(SdpaBackend::Math);
            assert_eq!(chosen_backend(&q, &k, &v).unwrap(), Some(SdpaBackend::Math));
            assert_eq!(enabled_mask(), 1);
            // The math backend still computes the same attention.
            let err = (causal_sdpa(&q, &k, &v).unwrap() - naive(&q, &k, &v))
                .abs()
                .max()
                .double_value(&[]);
            assert!(err < 1e-12, "{err}");
        }
        assert_eq!(enabled_mask(), before);
    }
}
