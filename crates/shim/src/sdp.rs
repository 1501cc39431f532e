//! Which backends libtorch's `scaled_dot_product_attention` may choose from (the global flags
//! `torch.nn.attention.sdpa_kernel` sets), and libtorch's FlashAttention over sequences packed
//! end to end (flash-attn's `flash_attn_varlen_func`); tch binds neither.

use std::ffi::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::checked::checked;

extern "C" {
    fn glatrain_sdp_backends() -> i32;
    fn glatrain_set_sdp_backends(mask: i32);
    fn glatrain_flash_supports(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        gqa: c_int,
        supported: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn glatrain_flash_varlen_causal(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_seqlens: *const C_tensor,
        max_seqlen: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
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
    /// at::SDPBackend's value, the bit of this backend in [`enabled_mask`].
    pub fn index(self) -> i32 {
        match self {
            SdpaBackend::Math => 0,
            SdpaBackend::Flash => 1,
            SdpaBackend::Efficient => 2,
            SdpaBackend::Cudnn => 3,
        }
    }

    /// The backend of an at::SDPBackend value (what `_fused_sdp_choice` returns).
    pub fn from_index(index: i64) -> Option<Self> {
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

/// The backends libtorch may choose from now, one bit per [`SdpaBackend::index`].
pub fn enabled_mask() -> i32 {
    // SAFETY: reads flags of libtorch's global context.
    unsafe { glatrain_sdp_backends() }
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
        let previous = enabled_mask();
        // SAFETY: sets flags of libtorch's global context.
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

/// Whether libtorch's FlashAttention backend takes causal attention of these inputs, by
/// libtorch's own check (`sdp::can_use_flash_attention`): a FlashAttention build, a GPU it
/// supports, fp16 or bf16, head dims it has kernels for, and the backend enabled (an
/// [`OnlyBackend`] of another backend turns it off).
///
/// # Shapes
/// q: [B, H, T, D], k, v: [B, H_kv, T, D] (SDPA's layout), H a multiple of H_kv.
///
/// # Errors
/// libtorch's message.
pub fn flash_supports(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool, String> {
    let gqa = c_int::from(q.size().get(1) != k.size().get(1));
    let mut supported: c_int = 0;
    // SAFETY: the tensors are live tch tensors borrowed for the call; `supported` outlives it.
    checked(|err, len| unsafe {
        glatrain_flash_supports(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            gqa,
            &mut supported,
            err,
            len,
        )
    })?;
    Ok(supported != 0)
}

/// Causal attention with scale 1/sqrt(D) inside each of the sequences laid end to end along
/// the first dimension: sequence `i` spans rows `cu_seqlens[i] .. cu_seqlens[i + 1]`.
/// libtorch's varlen FlashAttention (`_flash_attention_forward`), which autograd differentiates
/// (`_flash_attention_backward`). Inputs must pass [`flash_supports`] and have head dims that are
/// multiples of 8.
///
/// # Shapes
/// q: [total, H, D], k, v: [total, H_kv, D] (last dimension contiguous), `cu_seqlens`: int32
/// [sequences + 1] on their device, `max_seqlen` the longest sequence; returns [total, H, D].
///
/// # Errors
/// libtorch's message (a GPU, dtype, shape or stride FlashAttention does not take).
pub fn flash_varlen_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_seqlen: i64,
) -> Result<Tensor, String> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: the tensors are live tch tensors borrowed for the call; on success the shim sets
    // `out` to a new tensor whose ownership passes to us.
    checked(|err, len| unsafe {
        glatrain_flash_varlen_causal(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            cu_seqlens.as_ptr(),
            max_seqlen,
            &mut out,
            err,
            len,
        )
    })?;
    // SAFETY: set by the shim on success, owned by us from here.
    Ok(unsafe { Tensor::from_ptr(out) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_and_indices_follow_libtorch() {
        for (index, name) in [(0, "math"), (1, "flash"), (2, "efficient"), (3, "cudnn")] {
            let backend = SdpaBackend::from_index(index).unwrap();
            assert_eq!((backend.index() as i64, backend.name()), (index, name));
        }
        assert_eq!(SdpaBackend::from_index(-1), None);
        assert_eq!(SdpaBackend::from_index(4), None);
    }

    #[test]
    fn flash_takes_no_cpu_tensors() {
        let x = Tensor::randn([1, 2, 3, 8], (tch::Kind::BFloat16, tch::Device::Cpu));
        assert!(!flash_supports(&x, &x, &x).unwrap());
    }

    #[test]
    fn varlen_flash_on_the_cpu_is_an_error_not_a_crash() {
        let x = Tensor::randn([5, 2, 8], (tch::Kind::BFloat16, tch::Device::Cpu));
        let offsets = Tensor::from_slice(&[0i32, 2, 5]);
        let err = flash_varlen_causal(&x, &x, &x, &offsets, 3).unwrap_err();
        assert!(err.contains("_flash_attention_forward"), "{err}");
        assert!(!err.contains("frame #"), "{err}");
    }
}
