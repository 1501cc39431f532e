//! The GLA kernels' first call in a process with empty kernel caches: what a first training
//! step waits for.

use std::path::PathBuf;
use std::time::Instant;

use glatrain_cuda::compile::{compile_uncached, Compiled};
use glatrain_cuda::{Gpu, KernelDtype, Tier, TierPolicy};
use glatrain_ops::gla::kernels::GLA_TC;
use glatrain_ops::{gla, GlaMode};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::run::log_gates;
use crate::BenchError;

/// What [`measure`] measured, in s.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstCall {
    /// The tier policy in force (`GLATRAIN_KERNEL_TIER`).
    pub tiers: &'static str,
    /// A first GLA training call (forward and backward, bf16, `chunk`) with empty kernel caches:
    /// NVRTC compilation (the Quick tier unless a tier is pinned), module load, run.
    pub first_call_s: f64,
    /// From its start until the policy's final tier was loaded.
    pub final_tier_ready_s: f64,
    /// The bf16 module's NVRTC compilation alone, Full tier.
    pub nvrtc_compile_s: f64,
    /// The same, Quick tier.
    pub nvrtc_quick_compile_s: f64,
    /// Each kernel's Full compilation within it (compiled in parallel: the slowest sets the
    /// module's time).
    pub by_kernel: Vec<(&'static str, f64)>,
}

impl FirstCall {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "kernel_tiers": self.tiers,
            "first_call_s": self.first_call_s,
            "final_tier_ready_s": self.final_tier_ready_s,
            "nvrtc_compile_s": self.nvrtc_compile_s,
            "nvrtc_quick_compile_s": self.nvrtc_quick_compile_s,
            "nvrtc_compile_by_kernel_s": self
                .by_kernel
                .iter()
                .map(|&(name, s)| (name.to_string(), json!(s)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// Two lines for the console.
    pub(crate) fn describe(&self) -> String {
        let (slowest, slowest_s) = self
            .by_kernel
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("none", 0.0));
        format!(
            "first call (forward + backward; NVRTC compile of the bf16 module + load + run; kernel \
             tiers: {}): {:.2} s; optimised kernels loaded after {:.2} s\n\
             NVRTC compile of the bf16 module alone: {:.2} s (its slowest kernel, {slowest}: \
             {slowest_s:.2} s); at the quick tier: {:.2} s",
            self.tiers,
            self.first_call_s,
            self.final_tier_ready_s,
            self.nvrtc_compile_s,
            self.nvrtc_quick_compile_s
        )
    }
}

/// Measures [`FirstCall`] on CUDA device 0. Meaningful only while the bf16 GLA module is not
/// yet loaded in this process: the call runs with `GLATRAIN_CACHE_DIR` pointed at an empty
/// temporary directory (restored and removed after).
pub fn measure(cuda: &Gpu) -> Result<FirstCall, BenchError> {
    let dev = tch::Device::Cuda(0);
    let tiers = TierPolicy::from_env()?.name();
    let cache = TempCache::new()?;
    let shape = [1, 64, 1, 128];
    let leaf = |x: Tensor| x.f_set_requires_grad(true);
    let q = leaf(Tensor::f_randn(shape, (Kind::BFloat16, dev))?)?;
    let g = leaf(log_gates(&shape, dev)?)?;
    // libtorch's own first-use costs (autograd's worker threads, its lazily loaded reduction and
    // fill kernels) are paid before the clock starts, as the earlier layers of a training step
    // would have paid them: the time is the GLA op's own first call.
    tch::with_grad(|| -> Result<(), BenchError> {
        let loss = q.f_to_kind(Kind::Float)?.f_sum(Kind::Float)?;
        let grads = Tensor::f_run_backward(&[&loss], &[&q], false, false)?;
        grads[0].f_sum(Kind::Float)?.f_double_value(&[])?;
        Ok(())
    })?;
    let t0 = Instant::now();
    tch::with_grad(|| -> Result<(), BenchError> {
        let (o, _) = gla(&q, &q, &q, &g, None, None, GlaMode::Chunk, false)?;
        let loss = o.f_sum(Kind::Float)?;
        let grads = Tensor::f_run_backward(&[&loss], &[&q, &g], false, false)?;
        // Reading a value back waits for the kernels.
        grads[1].f_sum(Kind::Float)?.f_double_value(&[])?;
        Ok(())
    })?;
    let first_call_s = t0.elapsed().as_secs_f64();
    // Also what the timed rows need; and the background compile writes into this cache.
    cuda.prepare_final(&GLA_TC, KernelDtype::Bf16)?;
    let final_tier_ready_s = t0.elapsed().as_secs_f64();
    drop(cache);
    let compile = |tier| -> Result<(f64, Vec<Compiled>), BenchError> {
        let t0 = Instant::now();
        let compiled = compile_uncached(&GLA_TC, KernelDtype::Bf16, cuda.arch(), tier)?;
        Ok((t0.elapsed().as_secs_f64(), compiled))
    };
    let (nvrtc_compile_s, compiled) = compile(Tier::Full)?;
    let (nvrtc_quick_compile_s, _) = compile(Tier::Quick)?;
    Ok(FirstCall {
        tiers,
        first_call_s,
        final_tier_ready_s,
        nvrtc_compile_s,
        nvrtc_quick_compile_s,
        by_kernel: GLA_TC
            .kernels
            .iter()
            .zip(&compiled)
            .map(|(&name, c)| (name, c.seconds))
            .collect(),
    })
}

/// Points `GLATRAIN_CACHE_DIR` (our CUBIN cache) at a fresh temporary directory; on drop,
/// restores the variable and removes the directory.
struct TempCache {
    dir: PathBuf,
    previous: Option<std::ffi::OsString>,
}

impl TempCache {
    fn new() -> Result<Self, BenchError> {
        let dir = std::env::temp_dir().join(format!("glatrain-bench-cache-{}", std::process::id()));
        // A leftover from an earlier process with the same id would make the cache warm.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::Cache {
            dir: dir.clone(),
            message: e.to_string(),
        })?;
        let previous = std::env::var_os("GLATRAIN_CACHE_DIR");
        std::env::set_var("GLATRAIN_CACHE_DIR", &dir);
        Ok(Self { dir, previous })
    }
}

impl Drop for TempCache {
    fn drop(&mut self) {
        match &self.previous {
            Some(v) => std::env::set_var("GLATRAIN_CACHE_DIR", v),
            None => std::env::remove_var("GLATRAIN_CACHE_DIR"),
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
