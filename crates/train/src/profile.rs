//! A step profile: what the GPU spent a training step on, by category, from libtorch's
//! profiler events (`glatrain_shim::profiler`).
//!
//! Every GPU event (kernel, copy, memset) is put in one [`Category`] by its name; what is left of
//! the steps' wall time when the GPU was busy with nothing is the host's share ("host gaps": the
//! GPU waiting for the CPU to launch work).

use std::path::{Path, PathBuf};
use std::time::Instant;

use glatrain_config::LoggingConfig;
use glatrain_shim::profiler::{self, Event};
use serde::Serialize;
use tch::Device;

use crate::error::TrainError;

/// The steps `logging.profile_steps = [first, last]` asks for, recorded into
/// `<run>/profile/`: `trace.json` (Chrome / Perfetto: chrome://tracing, ui.perfetto.dev),
/// `summary.json` and `summary.txt`.
#[derive(Debug)]
pub struct ProfileWindow {
    first: u64,
    last: u64,
    dir: PathBuf,
    device: Device,
    started: Option<Instant>,
}

impl ProfileWindow {
    /// The window of the config, if it asks for one.
    pub fn from_config(logging: &LoggingConfig, run_dir: &Path, device: Device) -> Option<Self> {
        match logging.profile_steps[..] {
            [first, last] => Some(Self {
                first,
                last,
                dir: run_dir.join("profile"),
                device,
                started: None,
            }),
            _ => None,
        }
    }

    /// Waits for the GPU's queued work, so that the profile holds the steps' work alone.
    fn synchronize(&self) {
        if let Device::Cuda(ordinal) = self.device {
            tch::Cuda::synchronize(ordinal as i64);
        }
    }

    fn failed(what: &str, message: String) -> TrainError {
        TrainError::Torch {
            what: what.to_string(),
            message,
        }
    }

    /// Call before optimizer step `step` (1-based): starts recording at the window's first step.
    pub fn before_step(&mut self, step: u64) -> Result<(), TrainError> {
        if step == self.first && self.started.is_none() {
            self.synchronize();
            profiler::start(matches!(self.device, Device::Cuda(_)))
                .map_err(|m| Self::failed("starting the profiler", m))?;
            self.started = Some(Instant::now());
        }
        Ok(())
    }

    /// Call after optimizer step `step`: at the window's last step, stops recording, writes the
    /// trace and the summary, and returns the summary's text.
    pub fn after_step(&mut self, step: u64) -> Result<Option<String>, TrainError> {
        let Some(started) = self.started.filter(|_| step == self.last) else {
            return Ok(None);
        };
        self.synchronize();
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        self.started = None;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let trace = self.dir.join("trace.json");
        let events =
            profiler::stop(Some(&trace)).map_err(|m| Self::failed("stopping the profiler", m))?;
        let summary = summarize(&events, self.last - self.first + 1, wall_ms);
        let json = serde_json::to_vec_pretty(&summary)
            .map_err(|e| Self::failed("writing the profile summary", e.to_string()))?;
        let json_path = self.dir.join("summary.json");
        glatrain_fs::write_atomic(&json_path, &json).map_err(io(&json_path))?;
        let text = summary.render();
        let text_path = self.dir.join("summary.txt");
        glatrain_fs::write_atomic(&text_path, text.as_bytes()).map_err(io(&text_path))?;
        Ok(Some(format!(
            "{text}trace: {} (chrome://tracing or ui.perfetto.dev)",
            trace.display()
        )))
    }
}

/// What a GPU event was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Matrix products (cuBLAS / CUTLASS kernels).
    Matmul,
    /// The sequence-mixing ops: glatrain's GLA and selective-scan kernels, softmax attention.
    Mixing,
    /// RMSNorm and the fused norm-gate kernels.
    Norm,
    /// Softmax, log-softmax and the cross-entropy loss.
    Loss,
    /// The optimizer step (fused AdamW, the gradient norm and scaling).
    Optimizer,
    /// Copies, casts and fills (dtype conversions, memsets, device copies).
    Copy,
    /// Every other kernel: element-wise ops and reductions.
    Elementwise,
}

impl Category {
    /// Every category, in the summary's order.
    pub const ALL: [Category; 7] = [
        Category::Matmul,
        Category::Mixing,
        Category::Norm,
        Category::Loss,
        Category::Optimizer,
        Category::Copy,
        Category::Elementwise,
    ];

    /// The summary's label.
    pub fn name(self) -> &'static str {
        match self {
            Category::Matmul => "matrix products",
            Category::Mixing => "GLA / scan / attention ops",
            Category::Norm => "norms",
            Category::Loss => "loss (softmax, cross-entropy)",
            Category::Optimizer => "optimizer",
            Category::Copy => "copies and casts",
            Category::Elementwise => "elementwise and reductions",
        }
    }

    /// The category of a GPU event by its name (kernel names as CUDA reports them).
    pub fn of(name: &str) -> Category {
        let n = name.to_ascii_lowercase();
        let has = |parts: &[&str]| parts.iter().any(|p| n.contains(p));
        if has(&[
            "gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "gemv",
        ]) {
            Category::Matmul
        } else if has(&[
            "gla_",
            "selective_scan",
            "flash",
            "fmha",
            "attention",
            "cudnn",
        ]) {
            Category::Mixing
        } else if has(&["norm", "moments"]) {
            Category::Norm
        } else if has(&["softmax", "cross_entropy", "nll_loss"]) {
            Category::Loss
        } else if has(&["adam", "multi_tensor", "foreach"]) {
            Category::Optimizer
        } else if has(&["memcpy", "memset", "copy", "cast", "fill"]) {
            Category::Copy
        } else {
            Category::Elementwise
        }
    }
}

/// One category's time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Share {
    pub category: String,
    /// Per step, ms.
    pub ms_per_step: f64,
    /// Of the steps' wall time.
    pub fraction: f64,
}

/// The profile of `steps` training steps that took `wall_ms` in all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub steps: u64,
    /// Wall time per step, ms.
    pub step_ms: f64,
    /// GPU time by category, then the host gaps.
    pub shares: Vec<Share>,
    /// The ten kernels that took the most time: name, ms per step.
    pub top_kernels: Vec<(String, f64)>,
}

/// Summarises the GPU `events` of `steps` steps that took `wall_ms` of wall time.
pub fn summarize(events: &[Event], steps: u64, wall_ms: f64) -> Summary {
    let steps = steps.max(1);
    let per_step = |ns: u64| ns as f64 / 1e6 / steps as f64;
    let gpu: Vec<&Event> = events.iter().filter(|e| e.on_gpu).collect();
    let mut by_category = std::collections::BTreeMap::new();
    let mut by_kernel = std::collections::HashMap::<&str, u64>::new();
    for e in &gpu {
        *by_category.entry(Category::of(&e.name)).or_insert(0u64) += e.duration_ns;
        *by_kernel.entry(e.name.as_str()).or_insert(0) += e.duration_ns;
    }
    let step_ms = wall_ms / steps as f64;
    let fraction = |ms: f64| if step_ms > 0.0 { ms / step_ms } else { 0.0 };
    let mut shares: Vec<Share> = Category::ALL
        .iter()
        .map(|c| {
            let ms = per_step(by_category.get(c).copied().unwrap_or(0));
            Share {
                category: c.name().to_string(),
                ms_per_step: ms,
                fraction: fraction(ms),
            }
        })
        .collect();
    let idle_ms = (step_ms - per_step(busy_ns(&gpu))).max(0.0);
    shares.push(Share {
        category: "host gaps (GPU idle)".to_string(),
        ms_per_step: idle_ms,
        fraction: fraction(idle_ms),
    });
    let mut top: Vec<(String, f64)> = by_kernel
        .into_iter()
        .map(|(name, ns)| (name.to_string(), per_step(ns)))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(10);
    Summary {
        steps,
        step_ms,
        shares,
        top_kernels: top,
    }
}

/// Nanoseconds in which at least one of `events` ran (the union of their intervals).
fn busy_ns(events: &[&Event]) -> u64 {
    let mut spans: Vec<(u64, u64)> = events
        .iter()
        .map(|e| (e.start_ns, e.start_ns + e.duration_ns))
        .collect();
    spans.sort_unstable();
    let mut busy = 0;
    let mut current: Option<(u64, u64)> = None;
    for (start, end) in spans {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                busy += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    busy + current.map_or(0, |(s, e)| e - s)
}

impl Summary {
    /// The summary as a table: one line per category with ms per step and share of the step.
    pub fn render(&self) -> String {
        let mut out = format!(
            "profile of {} step(s): {:.1} ms per step\n{:<32} {:>10} {:>7}\n",
            self.steps, self.step_ms, "category", "ms/step", "share"
        );
        for s in &self.shares {
            out += &format!(
                "{:<32} {:>10.2} {:>6.1}%\n",
                s.category,
                s.ms_per_step,
                100.0 * s.fraction
            );
        }
        out += "top kernels (ms/step):\n";
        for (name, ms) in &self.top_kernels {
            let short: String = name.chars().take(90).collect();
            out += &format!("  {ms:>8.2}  {short}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, start_ns: u64, duration_ns: u64) -> Event {
        Event {
            name: name.into(),
            on_gpu: true,
            start_ns,
            duration_ns,
        }
    }

    #[test]
    fn kernels_fall_into_categories() {
        for (name, want) in [
            (
                "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
                Category::Matmul,
            ),
            (
                "nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT",
                Category::Matmul,
            ),
            ("gla_tc_bwd_dqk_bf16", Category::Mixing),
            ("selective_scan_fwd_bf16", Category::Mixing),
            (
                "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel",
                Category::Norm,
            ),
            (
                "void at::native::cunn_SoftMaxForward<4, float>",
                Category::Loss,
            ),
            (
                "void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
                Category::Optimizer,
            ),
            ("Memcpy DtoD (Device -> Device)", Category::Copy),
            (
                "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>",
                Category::Elementwise,
            ),
        ] {
            assert_eq!(Category::of(name), want, "{name}");
        }
    }

    #[test]
    fn shares_add_up_and_gaps_are_the_idle_time() {
        // Two steps of 10 ms: a 4 ms product and 2 ms of overlapping elementwise work each.
        let events = vec![
            gpu("gemm", 0, 4_000_000),
            gpu("add", 3_000_000, 2_000_000),
            gpu("gemm", 10_000_000, 4_000_000),
            gpu("add", 13_000_000, 2_000_000),
            Event {
                name: "aten::mm".into(),
                on_gpu: false,
                start_ns: 0,
                duration_ns: 9_000_000,
            },
        ];
        let s = summarize(&events, 2, 20.0);
        assert_eq!(s.step_ms, 10.0);
        let ms = |c: &str| {
            s.shares
                .iter()
                .find(|x| x.category == c)
                .unwrap()
                .ms_per_step
        };
        assert!((ms("matrix products") - 4.0).abs() < 1e-9);
        assert!((ms("elementwise and reductions") - 2.0).abs() < 1e-9);
        // Busy 5 ms of each 10 (the kernels overlap by 1 ms).
        assert!((ms("host gaps (GPU idle)") - 5.0).abs() < 1e-9);
        assert_eq!(s.top_kernels[0].0, "gemm");
        assert!(s.render().contains("host gaps"));
    }
}
