//! Which backends libtorch's `scaled_dot_product_attention` may choose from: the global flags
//! `torch.nn.attention.sdpa_kernel` sets, which tch does not bind.

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
}
