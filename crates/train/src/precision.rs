//! Numeric precision of the forward/backward pass.
//!
//! Design: master weights, gradients and optimizer state are always fp32. `bf16` and `fp16` run
//! the forward pass in a libtorch CUDA autocast region (`glatrain_shim::autocast`), with the
//! autocast dtype set through `glatrain_shim::autocast::set_autocast_dtype` (tch's own autocast is
//! fp16-only and calls deprecated libtorch functions). Autocast casts
//! each fp32 weight to the half type once per forward (its cast cache), runs matmuls and
//! attention in half precision and keeps reductions, norms and the loss in fp32; backward
//! produces fp32 gradients for the fp32 leaves. This is PyTorch AMP's design, used by the
//! reference trainers (flame/torchtitan), and it needs no second copy of the weights.
//! `fp16` adds dynamic loss scaling ([`crate::scaler::LossScaler`]).
//!
//! libtorch's CPU autocast does not cover these models' ops reliably and the CUDA autocast region
//! does nothing on CPU tensors, so half precision on CPU is refused with an error naming
//! `train.precision` rather than silently running fp32.

use glatrain_config::Precision;
use tch::{Device, Kind};

/// Runs forward passes in the configured precision.
#[derive(Debug, Clone, Copy)]
pub struct MixedPrecision {
    precision: Precision,
}

/// Half precision asked for where it cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error(
        "{source_name}: train.precision = \"{precision}\" needs a CUDA device, but the run is on \
         {device:?}; use train.precision = \"fp32\" on CPU"
    )]
    NeedsCuda {
        source_name: String,
        precision: &'static str,
        device: Device,
    },
    #[error("{source_name}: train.precision = \"{precision}\": {source}")]
    Autocast {
        source_name: String,
        precision: &'static str,
        source: glatrain_shim::autocast::AutocastError,
    },
}

impl PrecisionError {
    /// Half precision on CPU is the user's choice; a libtorch refusal is not.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, PrecisionError::NeedsCuda { .. })
    }
}

/// The config spelling of a precision.
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
    }
}

impl MixedPrecision {
    /// Checks that `precision` can run on `device` and sets the autocast dtype; `source_name`
    /// (the config file) goes into errors. ATen keeps the autocast dtype per thread: use the
    /// value on the thread that made it.
    pub fn new(
        precision: Precision,
        device: Device,
        source_name: &str,
    ) -> Result<Self, PrecisionError> {
        let mp = Self { precision };
        let Some(kind) = mp.autocast_kind() else {
            return Ok(mp);
        };
        if !device.is_cuda() {
            return Err(PrecisionError::NeedsCuda {
                source_name: source_name.to_string(),
                precision: precision_name(precision),
                device,
            });
        }
        glatrain_shim::autocast::set_autocast_dtype(kind).map_err(|source| {
            PrecisionError::Autocast {
                source_name: source_name.to_string(),
                precision: precision_name(precision),
                source,
            }
        })?;
        Ok(mp)
    }

    /// The half type autocast computes in, if any.
    pub fn autocast_kind(&self) -> Option<Kind> {
        match self.precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
        }
    }

    /// Whether dynamic loss scaling applies.
    pub fn uses_loss_scaling(&self) -> bool {
        self.precision == Precision::Fp16
    }

    /// Runs `f` (a forward pass) under autocast in the configured half type, or plainly in fp32.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.autocast_kind() {
            None => f(),
            Some(_) => glatrain_shim::autocast::autocast(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_on_cpu_is_refused_naming_the_key() {
        for p in [Precision::Bf16, Precision::Fp16] {
            let err = MixedPrecision::new(p, Device::Cpu, "configs/x.toml").unwrap_err();
            assert!(err.is_bad_input());
            let msg = err.to_string();
            assert!(msg.contains("configs/x.toml"), "{msg}");
            assert!(msg.contains("train.precision"), "{msg}");
            assert!(msg.contains(precision_name(p)), "{msg}");
        }
    }

    #[test]
    fn fp32_runs_plainly_on_cpu() {
        let mp = MixedPrecision::new(Precision::Fp32, Device::Cpu, "x").unwrap();
        assert!(!mp.uses_loss_scaling());
        let out = mp.run(|| {
            tch::Tensor::ones([2, 2], (Kind::Float, Device::Cpu))
                .matmul(&tch::Tensor::ones([2, 2], (Kind::Float, Device::Cpu)))
        });
        assert_eq!(out.kind(), Kind::Float);
    }

    #[test]
    fn bf16_autocast_on_cuda() {
        let Some(dev) = glatrain_testing::cuda_or_skip() else {
            return;
        };
        let mp = MixedPrecision::new(Precision::Bf16, dev, "x").unwrap();
        let a = tch::Tensor::ones([4, 4], (Kind::Float, dev));
        let out = mp.run(|| a.matmul(&a));
        assert_eq!(out.kind(), Kind::BFloat16);
    }
}
