//! libtorch's causal scaled-dot-product attention on `[B, T, H, D]` tensors, and which of its
//! backends runs it.
//!
//! libtorch picks a backend per call. On an H100 with libtorch 2.11 and cuDNN 9 it picks cuDNN's
//! kernel for bf16 causal attention, not FlashAttention-2, and the two differ by up to 1.9x
//! (ANCHORS.md's "SDPA flash" is FlashAttention-2 alone). [`OnlyBackend`] narrows the choice the
//! way `torch.nn.attention.sdpa_kernel` does; [`chosen_backend`] says what libtorch would run.

use tch::{Kind, TchError, Tensor};

extern "C" {
    fn glatrain_sdp_backends() -> i32;
    fn glatrain_set_sdp_backends(mask: i32);
}

/// A backend of libtorch's `scaled_dot_product_attention` (at::SDPBackend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpaBackend {
    /// Unfused tensor ops.
    Math,
    /// FlashAttention-2.
    Flash,
    /// xFormers' memory-efficient attention.
    Efficient,
    /// cuDNN's fused attention.
    Cudnn,
}

impl SdpaBackend {
    /// at::SDPBackend's value, the bit of this backend in the shim's masks.
    fn index(self) -> i32 {
        match self {
            SdpaBackend::Math => 0,
            SdpaBackend::Flash => 1,
            SdpaBackend::Efficient => 2,
            SdpaBackend::Cudnn => 3,
        }
    }

    fn from_index(index: i64) -> Option<Self> {
        [
            SdpaBackend::Math,
            SdpaBackend::Flash,
            SdpaBackend::Efficient,
            SdpaBackend::Cudnn,
        ]
        .into_iter()
        .find(|b| i64::from(b.index()) == index)
    }

    /// Lower-case name: `math`, `flash`, `efficient`, `cudnn`.
    pub fn name(self) -> &'static str {
        match self {
            SdpaBackend::Math => "math",
            SdpaBackend::Flash => "flash",
            SdpaBackend::Efficient => "efficient",
            SdpaBackend::Cudnn => "cudnn",
        }
    }
}

/// While alive, libtorch runs SDPA on one backend only (a call it does not support fails instead
/// of falling back); dropping it restores the backends enabled before. The setting is global to
/// the process, like `sdpa_kernel`'s.
#[derive(Debug)]
pub struct OnlyBackend {
    previous: i32,
}

impl OnlyBackend {
    /// Enables `backend` alone.
    pub fn new(backend: SdpaBackend) -> Self {
        // SAFETY: both shim calls only read or set flags of libtorch's global context.
        let previous = unsafe { glatrain_sdp_backends() };
        unsafe { glatrain_set_sdp_backends(1 << backend.index()) };
        Self { previous }
    }
}

impl Drop for OnlyBackend {
    fn drop(&mut self) {
        // SAFETY: sets flags of libtorch's global context.
        unsafe { glatrain_set_sdp_backends(self.previous) };
    }
}

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
        // SAFETY: reads flags of libtorch's global context.
        let before = unsafe { glatrain_sdp_backends() };
        {
            let _only = OnlyBackend::new(SdpaBackend::Math);
            assert_eq!(chosen_backend(&q, &k, &v).unwrap(), Some(SdpaBackend::Math));
            assert_eq!(unsafe { glatrain_sdp_backends() }, 1);
            // The math backend still computes the same attention.
            let err = (causal_sdpa(&q, &k, &v).unwrap() - naive(&q, &k, &v))
                .abs()
                .max()
                .double_value(&[]);
            assert!(err < 1e-12, "{err}");
        }
        assert_eq!(unsafe { glatrain_sdp_backends() }, before);
    }

    #[test]
    fn backend_names_and_indices_follow_libtorch() {
        for (index, name) in [(0, "math"), (1, "flash"), (2, "efficient"), (3, "cudnn")] {
            let backend = SdpaBackend::from_index(index).unwrap();
            assert_eq!((backend.index() as i64, backend.name()), (index, name));
        }
        assert_eq!(SdpaBackend::from_index(-1), None);
        assert_eq!(SdpaBackend::from_index(4), None);
    }
}
