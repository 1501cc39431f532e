//! The preflight as the trainer and `glatrain preflight` run it: the device's profile, the
//! report (by rules, or by timing the GLA kernels on the real shapes), and the kernel mode the
//! model is built with.

use glatrain_config::{
    ActivationCheckpointing, GlaMode, Precision, PreflightPolicy, ResolvedConfig,
};
use glatrain_cuda::{CudaError, CudaTimer, TIMING_ROUNDS};
use glatrain_ops::sdpa;
use glatrain_preflight::{DeviceProfile, LayerShape, ModeTimer, ModelType, Report, SoftmaxTiming};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;

/// Warm-up and timed iterations per candidate mode: seconds in all, not minutes.
const WARMUP_ITERS: usize = 2;
const TIMED_ITERS: usize = 5;

/// The profile of `device` for the rules: a known GPU's rates with the device's own SM count
/// and memory, or the CPU.
pub fn device_profile(device: Device) -> Result<DeviceProfile, TrainError> {
    match device {
        Device::Cuda(ordinal) => {
            let props = glatrain_cuda::Gpu::get(ordinal)
                .and_then(|d| d.properties())
                .map_err(TrainError::Kernels)?;
            Ok(DeviceProfile::from_cuda_device(
                &props.name,
                props.sm_count,
                props.memory_bytes,
            ))
        }
        _ => Ok(DeviceProfile::cpu()),
    }
}

/// The preflight report of `cfg` on `device`: timed when `measure` is set or the config asks
/// for it (`kernels.preflight = "measure"`) and the device is a GPU, by rules otherwise.
pub fn report(cfg: &ResolvedConfig, device: Device, measure: bool) -> Result<Report, TrainError> {
    let profile = device_profile(device)?;
    let measure = measure || cfg.config.kernels.preflight == PreflightPolicy::Measure;
    match (measure, device, glatrain_fs::cache_dir("preflight")) {
        (true, Device::Cuda(ordinal), Some(cache)) => {
            let mut timer = KernelTimer {
                device,
                timer: CudaTimer::new(ordinal).map_err(TrainError::Kernels)?,
            };
            Ok(Report::measured(cfg, &profile, &mut timer, &cache)?)
        }
        _ => Ok(Report::rules(cfg, &profile)),
    }
}

/// The mode to build the model's GLA layers with: the GLA row's decision (every GLA layer has
/// the same shape). A model without GLA layers gets [`GlaMode::Reference`], which it does not use.
pub fn chosen_mode(report: &Report) -> GlaMode {
    report
        .rows
        .iter()
        .find(|row| row.shape.model_type == ModelType::Gla && !row.shape.decoding)
        .and_then(|row| row.decision.op.gla_mode())
        .unwrap_or(GlaMode::Reference)
}

/// The changes to a config whose step ran out of memory that need less and keep its tokens per
/// step: the next activation-checkpointing mode (`selective`, then `full`), and half the
/// micro-batch with twice the accumulation; at a micro-batch of one with full checkpointing, a
/// shorter sequence or a smaller model.
pub fn smaller_step_advice(cfg: &ResolvedConfig) -> String {
    let mb = cfg.config.train.micro_batch_size;
    let next_mode = match cfg.config.train.activation_checkpointing {
        ActivationCheckpointing::None => Some(ActivationCheckpointing::Selective),
        ActivationCheckpointing::Selective => Some(ActivationCheckpointing::Full),
        ActivationCheckpointing::Full => None,
    };
    let mut options = Vec::new();
    if let Some(mode) = next_mode {
        options.push(format!(
            "--set train.activation_checkpointing={}",
            mode.name()
        ));
    }
    if mb > 1 && cfg.batch_size % (mb / 2) == 0 {
        options.push(format!(
            "--set train.micro_batch_size={} (train.batch_tokens stays {}: {} micro-batches per \
             step instead of {})",
            mb / 2,
            cfg.tokens_per_step,
            cfg.batch_size / (mb / 2),
            cfg.grad_accum_steps
        ));
    }
    if options.is_empty() {
        return format!(
            "micro-batch 1 of {} tokens does not fit even with full activation checkpointing: a \
             shorter data.seq_len or a smaller model",
            cfg.config.data.seq_len
        );
    }
    options.join(", or ")
}

/// Times one forward + backward of the GLA op for the measured preflight (the fastest of
/// [`TIMING_ROUNDS`] CUDA-event medians).
struct KernelTimer {
    device: Device,
    timer: CudaTimer,
}

/// A failed timing run, as the preflight reports it.
struct TimingError(String);

impl From<CudaError> for TimingError {
    fn from(e: CudaError) -> Self {
        TimingError(e.to_string())
    }
}

/// Random inputs of one layer's shape: q, k `[B, T, H, K]`, v `[B, T, H, V]` in the shape's
/// dtype (leaves), log gates `[B, T, H, K]` f32 (a leaf) and a fixed output gradient.
struct LayerInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    d_o: Tensor,
}

impl LayerInputs {
    fn new(shape: &LayerShape, dev: Device) -> Self {
        let kind = match shape.dtype {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        };
        let (b, t, h) = (
            shape.batch as i64,
            shape.seq_len as i64,
            shape.num_heads as i64,
        );
        let (dk, dv) = (shape.head_k_dim as i64, shape.head_v_dim as i64);
        let leaf = |size: [i64; 4], kind| Tensor::randn(size, (kind, dev)).set_requires_grad(true);
        LayerInputs {
            q: leaf([b, t, h, dk], kind),
            k: leaf([b, t, h, dk], kind),
            v: leaf([b, t, h, dv], kind),
            gk: (Tensor::randn([b, t, h, dk], (Kind::Float, dev)).log_sigmoid() / 16.0)
                .set_requires_grad(true),
            d_o: Tensor::randn([b, t, h, dv], (kind, dev)),
        }
    }

    /// Ms of `forward` and the backward from the fixed output gradient into the leaves
    /// (`o.backward(d_o)`, the gradients returned rather than accumulated): the fastest of
    /// [`TIMING_ROUNDS`] medians, as the benchmark takes its numbers.
    fn time(
        &self,
        timer: &mut CudaTimer,
        forward: impl Fn(&Self) -> Result<Tensor, TimingError>,
    ) -> Result<f64, String> {
        let run = || -> Result<(), TimingError> {
            let o = forward(self)?;
            let leaves = [&self.q, &self.k, &self.v, &self.gk];
            glatrain_shim::autograd::grad(&o, &self.d_o, &leaves).map_err(TimingError)?;
            Ok(())
        };
        timer
            .fastest_median_ms(TIMING_ROUNDS, WARMUP_ITERS, TIMED_ITERS, run)
            .map_err(|TimingError(message)| message)
    }
}

impl ModeTimer for KernelTimer {
    fn time_ms(&mut self, shape: &LayerShape, mode: GlaMode) -> Result<f64, String> {
        let inputs = LayerInputs::new(shape, self.device);
        if let Device::Cuda(ordinal) = self.device {
            glatrain_ops::gla::prepare(ordinal, inputs.q.kind(), mode, true)
                .map_err(|e| e.to_string())?;
        }
        inputs.time(&mut self.timer, |x| {
            glatrain_ops::gla(&x.q, &x.k, &x.v, &x.gk, None, None, mode, false)
                .map(|(o, _)| o)
                .map_err(|e| TimingError(e.to_string()))
        })
    }

    fn time_softmax(&mut self, shape: &LayerShape) -> Result<SoftmaxTiming, String> {
        // libtorch picks the backend, as it would for a Transformer layer (cuDNN on an H100).
        let inputs = LayerInputs::new(shape, self.device);
        let backend = sdpa::chosen_backend(&inputs.q, &inputs.k, &inputs.v)
            .map_err(|e| e.to_string())?
            .map_or("none", glatrain_shim::sdp::SdpaBackend::name);
        let ms = inputs.time(&mut self.timer, |x| {
            sdpa::causal_sdpa(&x.q, &x.k, &x.v).map_err(|e| TimingError(e.to_string()))
        })?;
        Ok(SoftmaxTiming {
            ms,
            backend: backend.to_string(),
        })
    }

    fn kernel_version(&self) -> String {
        let mut hash = Sha256::new();
        for source in glatrain_ops::kernel_sources() {
            hash.update(source.file);
            hash.update(source.text().unwrap_or_default());
        }
        hash.update(glatrain_cuda::PRELUDE.text().unwrap_or_default());
        hex::encode(&hash.finalize()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(mode: &str) -> ResolvedConfig {
        let text = format!(
            "[model]\ntype = \"gla\"\nvocab_size = 256\nhidden_size = 32\nnum_layers = 1\n\
             num_heads = 4\n[run]\ndevice = \"cpu\"\n[kernels]\nmode = \"{mode}\"\n\
             [train]\nprecision = \"fp32\"\nmicro_batch_size = 2\n[data]\nseq_len = 16\n"
        );
        glatrain_config::from_str(&text, "tiny.toml", &[]).unwrap()
    }

    /// On the CPU the preflight chooses the reference op, and its table says `says`.
    #[track_caller]
    fn assert_cpu_reference(cfg: &ResolvedConfig, measure: bool, says: &str) {
        let report = report(cfg, Device::Cpu, measure).unwrap();
        assert_eq!(chosen_mode(&report), GlaMode::Reference);
        let table = report.render_table();
        assert!(table.contains(says), "{table}");
    }

    #[test]
    fn cpu_runs_the_reference_op_whatever_the_policy() {
        let cfg = tiny("auto");
        assert_cpu_reference(&cfg, true, "reference");
    }

    #[test]
    fn advice_checkpoints_more_or_halves_the_micro_batch_and_keeps_the_step() {
        let cfg = tiny("auto");
        let advice = smaller_step_advice(&cfg);
        assert!(
            advice.starts_with(
                "--set train.activation_checkpointing=selective, or --set train.micro_batch_size=1"
            ),
            "{advice}"
        );
        assert!(advice.contains("batch_tokens stays 32"), "{advice}");
        let mut cfg = tiny("auto");
        cfg.config.train.activation_checkpointing = ActivationCheckpointing::Full;
        cfg.config.train.micro_batch_size = 1;
        let advice = smaller_step_advice(&cfg);
        assert!(advice.starts_with("micro-batch 1 of 16 tokens"), "{advice}");
    }

    #[test]
    fn a_forced_mode_is_reported_as_forced() {
        let cfg = tiny("reference");
        assert_cpu_reference(&cfg, false, "forced");
    }
}
