//! Why a kernel could not be compiled, loaded or launched.

/// Why a CUDA kernel could not be compiled, loaded or launched.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {source_name} for {arch} ({options}):\n{log}")]
    Compile {
        /// The kernel source (file name under kernels/).
        source_name: String,
        /// Target architecture, e.g. `sm_90`.
        arch: String,
        /// The options passed to NVRTC.
        options: String,
        /// NVRTC's log.
        log: String,
    },
    /// libnvrtc or libcuda could not be loaded, or an NVRTC call other than compilation failed.
    #[error("NVRTC/CUDA library unavailable or failing: {0}")]
    Library(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {message}")]
    Driver {
        /// The operation that failed.
        what: String,
        /// The driver's error.
        message: String,
    },
    /// A kernel source override could not be read.
    #[error("GLATRAIN_KERNEL_DIR={dir}: cannot read {file}: {message}")]
    Override {
        /// The directory in `GLATRAIN_KERNEL_DIR`.
        dir: String,
        /// The file looked for.
        file: String,
        /// The I/O error.
        message: String,
    },
    /// An environment variable that steers kernel compilation has a value it does not take.
    #[error("{variable}={value:?}: expected {expected}")]
    Setting {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// The values it takes.
        expected: &'static str,
    },
    /// A launch's geometry exceeds what CUDA allows (checked before the launch).
    #[error("{kernel}: {what}")]
    Limit {
        /// The kernel.
        kernel: String,
        /// Which limit, with the values.
        what: String,
    },
}

impl CudaError {
    /// A kernel setting in the environment (`GLATRAIN_KERNEL_DIR`, `GLATRAIN_KERNEL_TIER`) or a
    /// shape beyond a kernel's limits is the user's to fix (the CLI exits 2); other CUDA failures
    /// are not (exit 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CudaError::Override { .. } | CudaError::Setting { .. } | CudaError::Limit { .. }
        )
    }

    pub(crate) fn driver(what: &str, err: impl std::fmt::Debug) -> Self {
        Self::Driver {
            what: what.to_string(),
            message: format!("{err:?}"),
        }
    }
}

/// Runs a cudarc call that may panic when a shared library is missing (its dynamic loading
/// panics), turning the panic into [`CudaError::Library`].
pub(crate) fn catch_library_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        CudaError::Library(format!("{what}: {message}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_panics_become_errors() {
        let err = catch_library_panic("loading libfoo", || panic!("no libfoo.so")).unwrap_err();
        assert!(matches!(err, CudaError::Library(_)));
        assert!(
            err.to_string().contains("loading libfoo: no libfoo.so"),
            "{err}"
        );
        assert!(!err.is_bad_input());
        assert_eq!(catch_library_panic("x", || 7).unwrap(), 7);
    }
}
