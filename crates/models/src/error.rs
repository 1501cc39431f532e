//! The one error type of this crate: a model config whose shapes cannot be built.

/// A `[model]` table that describes an impossible model. The message names the key, its value
/// and why it is rejected; the CLI prefixes the config file's path.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A key whose value (alone or together with others) gives an impossible shape.
    #[error("model.{key} = {value}: {reason}")]
    BadShape {
        /// The `[model]` key, without the `model.` prefix.
        key: &'static str,
        /// The value as the user wrote it.
        value: String,
        /// What is wrong, with the derived sizes involved.
        reason: String,
    },
    /// glatrain's CUDA kernels cannot run on the model's device (no driver, no NVRTC).
    #[error("GLA kernels cannot run on cuda:{ordinal} (set kernels.mode = \"reference\" to use tensor ops): {source}")]
    Kernels {
        ordinal: usize,
        source: glatrain_cuda::CudaError,
    },
}

impl ModelError {
    /// Shapes come from the user's config (the CLI exits 2); a device that cannot run the
    /// kernels is a failure of the environment.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ModelError::BadShape { .. } => true,
            ModelError::Kernels { .. } => false,
        }
    }

    pub(crate) fn bad(key: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        ModelError::BadShape {
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Rejects a size of zero: `model.<key> = 0: must be at least 1`.
pub(crate) fn require_positive(key: &'static str, value: usize) -> Result<(), ModelError> {
    if value == 0 {
        return Err(ModelError::bad(key, value, "must be at least 1"));
    }
    Ok(())
}

/// `value` of `key` must be finite and above zero.
pub(crate) fn require_positive_number(key: &'static str, value: f64) -> Result<(), ModelError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ModelError::bad(key, value, "must be a positive number"));
    }
    Ok(())
}

/// `norm_eps > 0` and `initializer_range >= 0`, shared by every model family.
pub(crate) fn check_norm_and_init(norm_eps: f64, init_range: f64) -> Result<(), ModelError> {
    require_positive_number("norm_eps", norm_eps)?;
    if !(init_range.is_finite() && init_range >= 0.0) {
        return Err(ModelError::bad(
            "initializer_range",
            init_range,
            "must be a non-negative number",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_key_value_and_reason() {
        let e = ModelError::bad("num_heads", 3, "hidden_size 1024 is not divisible by it");
        assert_eq!(
            e.to_string(),
            "model.num_heads = 3: hidden_size 1024 is not divisible by it"
        );
        assert!(e.is_bad_input());
        assert!(require_positive("num_layers", 0)
            .unwrap_err()
            .to_string()
            .contains("model.num_layers = 0"));
        assert!(require_positive("num_layers", 1).is_ok());
    }
}
