//! CUDA autocast regions and their dtype.
//!
//! tch's `autocast` always casts to fp16 and calls libtorch functions that are deprecated (each
//! call prints a warning); libtorch lets the dtype be chosen per device type. [`set_autocast_dtype`]
//! sets it (through the C++ shim) and [`autocast`] runs a closure in a CUDA autocast region.

use std::ffi::{c_char, c_int};

extern "C" {
    fn glatrain_set_autocast_dtype(scalar_type: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn glatrain_get_autocast_dtype() -> c_int;
    fn glatrain_autocast_is_enabled() -> c_int;
    fn glatrain_autocast_enter() -> c_int;
    fn glatrain_autocast_exit(previous: c_int);
}

/// Why the autocast dtype could not be set.
#[derive(Debug, thiserror::Error)]
pub enum AutocastError {
    /// Only fp16 and bf16 are autocast dtypes on CUDA.
    #[error("autocast dtype {0:?} is not supported: use Kind::BFloat16 or Kind::Half")]
    Unsupported(tch::Kind),
    /// libtorch refused it.
    #[error("libtorch refused autocast dtype {kind:?}: {message}")]
    Torch {
        /// The dtype asked for.
        kind: tch::Kind,
        /// libtorch's message.
        message: String,
    },
}

impl AutocastError {
    /// True when the dtype came from the user (a config value) rather than an internal failure.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Unsupported(_))
    }
}

/// c10::ScalarType numbers of the autocast dtypes.
const SCALAR_HALF: c_int = 5;
const SCALAR_BFLOAT16: c_int = 15;

/// Sets the dtype that CUDA autocast regions (`tch::autocast(true, ..)`) cast matmuls to.
///
/// Process-wide; `Kind::BFloat16` or `Kind::Half`.
pub fn set_autocast_dtype(kind: tch::Kind) -> Result<(), AutocastError> {
    let scalar = match kind {
        tch::Kind::Half => SCALAR_HALF,
        tch::Kind::BFloat16 => SCALAR_BFLOAT16,
        other => return Err(AutocastError::Unsupported(other)),
    };
    // SAFETY: the shim writes at most `len` bytes, NUL-terminated, into `err`.
    crate::checked::checked(|err, len| unsafe { glatrain_set_autocast_dtype(scalar, err, len) })
        .map_err(|message| AutocastError::Torch { kind, message })
}

/// The dtype CUDA autocast regions cast to now.
pub fn autocast_dtype() -> tch::Kind {
    // SAFETY: reads a process-wide setting; no arguments.
    match unsafe { glatrain_get_autocast_dtype() } {
        SCALAR_BFLOAT16 => tch::Kind::BFloat16,
        SCALAR_HALF => tch::Kind::Half,
        _ => tch::Kind::Float,
    }
}

/// Whether this thread is inside a CUDA autocast region. Autocast is thread-local: libtorch's
/// backward threads run outside any region.
pub fn autocast_enabled() -> bool {
    // SAFETY: reads thread-local state; no arguments.
    unsafe { glatrain_autocast_is_enabled() != 0 }
}

/// Runs `f` in a CUDA autocast region (matmuls and the like compute in [`autocast_dtype`]).
/// Regions nest; the previous state comes back when `f` returns or panics.
pub fn autocast<T>(f: impl FnOnce() -> T) -> T {
    struct Region(c_int);
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: pairs the enter call that created this region, on the same thread.
            unsafe { glatrain_autocast_exit(self.0) }
        }
    }
    // SAFETY: no arguments; the returned state goes back to the shim on drop.
    let _region = Region(unsafe { glatrain_autocast_enter() });
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_reads_back_bf16_then_fp16() {
        set_autocast_dtype(tch::Kind::BFloat16).unwrap();
        assert_eq!(autocast_dtype(), tch::Kind::BFloat16);
        set_autocast_dtype(tch::Kind::Half).unwrap();
        assert_eq!(autocast_dtype(), tch::Kind::Half);
    }

    #[test]
    fn regions_nest_and_casts_happen_on_cuda() {
        assert!(!autocast_enabled());
        let nested = autocast(|| autocast(|| (7, autocast_enabled())));
        assert_eq!(nested, (7, true));
        assert!(!autocast_enabled());
        if !tch::Cuda::is_available() {
            println!("skipped the cast check: no CUDA device");
            return;
        }
        set_autocast_dtype(tch::Kind::BFloat16).unwrap();
        let a = tch::Tensor::randn([8, 8], (tch::Kind::Float, tch::Device::Cuda(0)));
        assert_eq!(autocast(|| a.matmul(&a)).kind(), tch::Kind::BFloat16);
        // Outside the region (also after a nested one ended) nothing is cast.
        assert_eq!(a.matmul(&a).kind(), tch::Kind::Float);
    }

    #[test]
    fn rejects_non_half_dtypes() {
        let err = set_autocast_dtype(tch::Kind::Double).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("Double"));
    }
}
