//! Benchmark of the GLA kernels next to libtorch's SDPA on the ANCHORS.md shapes, and the
//! CUDA-event timer it uses.
//!
//! SDPA runs twice per shape: `sdpa_flash` on the FlashAttention backend alone (ANCHORS.md's
//! baseline), and `sdpa` on the backend libtorch picks by itself (cuDNN on an H100), named in the
//! row.
//!
//! For each B x T x H x D (K = V = D, bf16 q/k/v, f32 log gates) and each mode: forward, and
//! forward + backward (`o.backward(do)` as ANCHORS.md times it, the same for SDPA), as CUDA-event
//! medians after warm-up (the fastest of three rounds), on the legacy default stream that libtorch
//! uses, each call queued behind a cache-flushing write as Triton's `do_bench` does
//! ([`CudaTimer::median_ms`]). Also the first call's wall time (NVRTC compilation into an empty
//! cache, then module load), and each shape's memory floor. [`run_gla_bench`] prints a table as it
//! goes and can write the report as JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::DriverError;
use serde_json::{json, Value};
use tch::{Device, Kind, TchError, Tensor};

use crate::cuda::compile::{compile_uncached, Compiled};
use crate::cuda::{CudaError, Device as CudaDevice, KernelDtype, KernelSource, Tier, TierPolicy};
use crate::gla::{gla, GlaMode, OpError};
use crate::sdpa::{causal_sdpa, chosen_backend, OnlyBackend, SdpaBackend};

/// Device-to-device copy bandwidth of an H100 SXM measured on the bench machine (bytes read +
/// written), used for the memory floor.
const COPY_BYTES_PER_S: f64 = 3.0e12;

/// B, T, H, D of the ANCHORS.md rows.
const SHAPES: [(i64, i64, i64, i64); 6] = [
    (8, 2048, 16, 32),
    (8, 2048, 16, 64),
    (8, 2048, 16, 128),
    (4, 4096, 16, 128),
    (2, 8192, 16, 128),
    (1, 16384, 16, 128),
];

/// FLA chunk_gla fwd+bwd from ANCHORS.md (ms), for the same shapes.
const FLA_FWD_BWD_MS: [f64; 6] = [2.41, 2.81, 3.69, 3.74, 3.97, 4.53];

/// Why the benchmark could not run or write its report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// libtorch sees no CUDA device.
    #[error("bench gla: no CUDA device (libtorch reports none); the benchmark needs a GPU")]
    NoCuda,
    /// A CUDA driver call, NVRTC compilation or kernel launch failed.
    #[error("bench gla: {0}")]
    Cuda(#[from] CudaError),
    /// The GLA op failed.
    #[error("bench gla: {0}")]
    Op(#[from] OpError),
    /// A libtorch operation (allocation, SDPA, backward) failed.
    #[error("bench gla: libtorch: {0}")]
    Torch(#[from] TchError),
    /// libtorch's backward from the output gradient failed.
    #[error("bench gla: libtorch backward: {0}")]
    Backward(String),
    /// The temporary kernel cache for the first-call measurement could not be made.
    #[error("bench gla: cannot create the temporary kernel cache {dir}: {message}")]
    Cache {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// A `--shape` or `--mode` filter names something the benchmark does not run.
    #[error("bench gla: {flag} {value:?} is not one of: {allowed}")]
    Filter {
        /// The command-line flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What the flag accepts.
        allowed: String,
    },
    /// The JSON report could not be written.
    #[error("bench gla: cannot write {path}: {message}")]
    Write {
        /// The report's path (from `--json`).
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
}

impl BenchError {
    /// True when a flag, the report path or a kernel setting in the environment is wrong; a
    /// missing GPU or a failing kernel is not the user's input.
    pub fn is_bad_input(&self) -> bool {
        match self {
            BenchError::Write { .. } | BenchError::Filter { .. } => true,
            BenchError::Cuda(e) => e.is_bad_input(),
            BenchError::Op(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// Times GPU work on the legacy default stream (the one libtorch and the GLA kernels launch on)
/// with CUDA events.
#[derive(Debug)]
pub struct CudaTimer {
    dev: Arc<CudaDevice>,
}

/// What [`CudaTimer::median_ms`] writes ahead of each timed call: 256 MiB, as `do_bench`, over
/// twice the L2 cache of any current GPU (50 MB on an H100), and ~90 us of work on an H100, longer
/// than the host takes to launch a call's first kernel.
pub const FLUSH_BYTES: i64 = 256 << 20;

/// The least warm-up time of [`CudaTimer::median_ms`].
pub const WARMUP_MIN: std::time::Duration = std::time::Duration::from_millis(100);

impl CudaTimer {
    /// A timer on the device with this ordinal; fails when the driver or the device is missing.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Self {
            dev: CudaDevice::get(ordinal)?,
        })
    }

    /// Median over `iters` event-timed calls of `f`, after `warmup` untimed calls (and more of
    /// them, each waited for, until [`WARMUP_MIN`] has passed: a GPU coming out of idle clocks
    /// would otherwise slow the first calls of a short shape), in ms; `f` must launch its work on
    /// the legacy default stream. Errors from `f` and from the driver are returned at once.
    ///
    /// Each timed call is queued behind a write of [`FLUSH_BYTES`], as Triton's `do_bench` (the
    /// timer of FLA's own benchmarks) does: the call finds none of its inputs in L2, and the GPU
    /// is still busy with the write when the host records the start event and launches the
    /// call, so the time is the GPU's, not the host's latency to the first kernel (in training
    /// the host runs ahead of the GPU too). The calls are not waited for one by one.
    ///
    /// # Panics
    ///
    /// If `iters` is 0 (there is no median of nothing).
    pub fn median_ms<E: From<CudaError>>(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f64, E> {
        assert!(iters > 0, "CudaTimer::median_ms: iters must be at least 1");
        let ctx = self.dev.context();
        let stream = self.dev.stream();
        let started = Instant::now();
        let mut calls = 0;
        while calls < warmup || started.elapsed() < WARMUP_MIN {
            f()?;
            stream
                .synchronize()
                .map_err(|e| driver_error("cuStreamSynchronize", e))?;
            calls += 1;
        }
        let mut flush = Tensor::f_empty([FLUSH_BYTES], (Kind::Uint8, Device::Cuda(ctx.ordinal())))
            .map_err(CudaError::from)?;
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_error("cuEventCreate", e))?;
            let end = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_error("cuEventCreate", e))?;
            drop(flush.f_zero_().map_err(CudaError::from)?);
            start
                .record(stream)
                .map_err(|e| driver_error("cuEventRecord", e))?;
            f()?;
            end.record(stream)
                .map_err(|e| driver_error("cuEventRecord", e))?;
            events.push((start, end));
        }
        let mut times = events
            .iter()
            .map(|(start, end)| {
                start
                    .elapsed_ms(end)
                    .map(f64::from)
                    .map_err(|e| driver_error("cuEventElapsedTime", e))
            })
            .collect::<Result<Vec<f64>, CudaError>>()?;
        Ok(median(&mut times))
    }

    /// The fastest of `rounds` [`median_ms`](Self::median_ms) rounds of `f` (each warmed up), in
    /// ms. The H100 hosts have slow phases in which a whole round comes out 1.3x to 2x the others
    /// (SDPA's as well as GLA's); with rounds, one costs a round, not the number.
    pub fn fastest_median_ms<E: From<CudaError>>(
        &self,
        rounds: usize,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f64, E> {
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            best = best.min(self.median_ms(warmup, iters, &mut f)?);
        }
        Ok(best)
    }
}

/// Rounds per timed number, here and in the measured preflight: the fastest round's median counts.
pub const TIMING_ROUNDS: usize = 3;

fn driver_error(what: &str, err: DriverError) -> CudaError {
    CudaError::Driver {
        what: what.to_string(),
        message: format!("{err:?}"),
    }
}

/// The upper median of a non-empty slice (sorted in place).
fn median(times: &mut [f64]) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// One shape and mode of the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// B, T, H, D (K = V = D).
    pub shape: [i64; 4],
    /// `chunk`, `fused_chunk`, `fused_recurrent`, `sdpa_flash` or `sdpa`.
    pub mode: &'static str,
    /// The SDPA backend that ran (`sdpa` and `sdpa_flash` rows).
    pub sdpa_backend: Option<&'static str>,
    /// Forward median, ms.
    pub fwd_ms: f64,
    /// Forward + backward median, ms.
    pub fwd_bwd_ms: f64,
    /// Memory floor of the forward, ms.
    pub floor_fwd_ms: f64,
    /// Memory floor of forward + backward, ms.
    pub floor_fwd_bwd_ms: f64,
    /// FLA chunk_gla forward + backward on this shape from ANCHORS.md, ms.
    pub fla_fwd_bwd_ms: f64,
}

/// Column titles of [`BenchRow::table_line`].
pub fn table_header() -> String {
    format!(
        "{:<20} {:<15} {:>9} {:>11} {:>9} {:>10} {:>10}",
        "B x T x H x D", "mode", "fwd ms", "fwd+bwd ms", "floor ms", "x floor", "vs FLA"
    )
}

impl BenchRow {
    /// The row as printed under [`table_header`]: fwd+bwd against its floor and against FLA.
    pub fn table_line(&self) -> String {
        let [b, t, h, d] = self.shape;
        let mode = match self.sdpa_backend {
            Some(backend) if self.mode == "sdpa" => format!("sdpa ({backend})"),
            _ => self.mode.to_string(),
        };
        format!(
            "{:<20} {:<15} {:>9.3} {:>11.3} {:>9.3} {:>10.1} {:>10.2}",
            format!("{b} x {t} x {h} x {d}"),
            mode,
            self.fwd_ms,
            self.fwd_bwd_ms,
            self.floor_fwd_bwd_ms,
            self.fwd_bwd_ms / self.floor_fwd_bwd_ms,
            self.fwd_bwd_ms / self.fla_fwd_bwd_ms
        )
    }

    fn to_json(&self) -> Value {
        let [b, t, h, d] = self.shape;
        json!({
            "shape": {"B": b, "T": t, "H": h, "K": d, "V": d},
            "mode": self.mode,
            "sdpa_backend": self.sdpa_backend,
            "fwd_ms": self.fwd_ms,
            "fwd_bwd_ms": self.fwd_bwd_ms,
            "floor_fwd_ms": self.floor_fwd_ms,
            "floor_fwd_bwd_ms": self.floor_fwd_bwd_ms,
            "fla_chunk_fwd_bwd_ms_anchor": self.fla_fwd_bwd_ms,
        })
    }
}

/// What [`run_gla_bench`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The GPU's name as the driver gives it.
    pub gpu: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// Which kernel tiers the process compiled (`GLATRAIN_KERNEL_TIER`: tiered, full or quick).
    pub kernel_tiers: &'static str,
    /// Wall time of the first GLA call: NVRTC compilation of the bf16 module into an empty
    /// cache (the Quick tier unless a tier is pinned), module load and run, s.
    pub first_call_s: f64,
    /// From the start of that call until the policy's final tier (Full unless `quick` is pinned)
    /// was loaded, s.
    pub final_tier_ready_s: f64,
    /// NVRTC compilation of the bf16 module at the Full tier alone, s.
    pub nvrtc_compile_s: f64,
    /// The same at the Quick tier, s.
    pub nvrtc_quick_compile_s: f64,
    /// Each kernel's share of that compilation (kernel name, s; compiled in parallel, so the
    /// slowest sets the module's time).
    pub nvrtc_compile_by_kernel_s: Vec<(&'static str, f64)>,
    /// One row per shape and mode.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    /// The report as JSON, with the method described in words.
    pub fn to_json(&self) -> Value {
        json!({
            "gpu": self.gpu,
            "date": self.date,
            "dtype": "bf16 q/k/v, f32 log gates",
            "timing": "CUDA-event median after warm-up, the fastest of 3 rounds; each timed call queued behind a 256 MiB write (Triton do_bench's method: cold L2, the host's launch latency hidden); fwd+bwd = forward + o.backward(do) (gradients returned, not accumulated)",
            "floor": "bytes moved once at 3.0 TB/s: fwd 12 B/elem, fwd+bwd 34 B/elem of B*T*H*D",
            "kernel_tiers": self.kernel_tiers,
            "first_call_s": self.first_call_s,
            "final_tier_ready_s": self.final_tier_ready_s,
            "nvrtc_compile_s": self.nvrtc_compile_s,
            "nvrtc_quick_compile_s": self.nvrtc_quick_compile_s,
            "nvrtc_compile_by_kernel_s": self
                .nvrtc_compile_by_kernel_s
                .iter()
                .map(|&(name, s)| (name.to_string(), json!(s)))
                .collect::<serde_json::Map<_, _>>(),
            "rows": self.rows.iter().map(BenchRow::to_json).collect::<Vec<_>>(),
        })
    }

    /// Writes [`Self::to_json`] (pretty-printed) to `path`, creating its parent directories.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let write_err = |e: std::io::Error| BenchError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        create_parent(path).map_err(write_err)?;
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| BenchError::Write {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        std::fs::write(path, text + "\n").map_err(write_err)
    }
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// Memory floors (forward, forward + backward) in ms of a B x T x H x D shape: the forward reads
/// q, k, v (bf16) and g (f32) and writes o (bf16), 12 B/elem; the backward also reads do and
/// writes dq, dk, dv (bf16) and dg (f32), 34 B/elem in all.
fn floors_ms(b: i64, t: i64, h: i64, d: i64) -> (f64, f64) {
    let n = (b * t * h * d) as f64;
    (
        12.0 * n / COPY_BYTES_PER_S * 1e3,
        34.0 * n / COPY_BYTES_PER_S * 1e3,
    )
}

/// Every mode the benchmark can time.
const MODES: [&str; 5] = [
    "chunk",
    "fused_chunk",
    "fused_recurrent",
    "sdpa_flash",
    "sdpa",
];

/// Which rows to run: shapes as `BxTxHxD` (ANCHORS.md rows) and modes; empty means all.
#[derive(Debug, Clone, Default)]
pub struct BenchFilter {
    /// Shapes to run, e.g. `8x2048x16x128`.
    pub shapes: Vec<String>,
    /// Modes to run (`chunk`, `fused_chunk`, `fused_recurrent`, `sdpa_flash`, `sdpa`).
    pub modes: Vec<String>,
}

impl BenchFilter {
    /// Checks every name before the (long) run starts.
    fn validate(&self) -> Result<(), BenchError> {
        for shape in &self.shapes {
            if !SHAPES.iter().any(|&s| shape_name(s) == *shape) {
                return Err(BenchError::Filter {
                    flag: "--shape",
                    value: shape.clone(),
                    allowed: SHAPES.map(shape_name).join(", "),
                });
            }
        }
        for mode in &self.modes {
            if !MODES.contains(&mode.as_str()) {
                return Err(BenchError::Filter {
                    flag: "--mode",
                    value: mode.clone(),
                    allowed: MODES.join(", "),
                });
            }
        }
        Ok(())
    }

    fn keeps_shape(&self, shape: (i64, i64, i64, i64)) -> bool {
        self.shapes.is_empty() || self.shapes.contains(&shape_name(shape))
    }

    fn keeps_mode(&self, mode: &str) -> bool {
        self.modes.is_empty() || self.modes.iter().any(|m| m == mode)
    }
}

fn shape_name((b, t, h, d): (i64, i64, i64, i64)) -> String {
    format!("{b}x{t}x{h}x{d}")
}

/// Runs the GLA benchmark on CUDA device 0: every ANCHORS.md shape, each GLA mode that supports
/// it, SDPA on the flash backend and SDPA on libtorch's own choice (or the rows `filter` keeps),
/// printing a table as it goes; writes the report as JSON to `json_out` when given (parent
/// directories are created).
///
/// The first-call time is meaningful only while the bf16 GLA module is not yet loaded in this
/// process and CUDA is not yet initialised (call this before any other CUDA work): it disables
/// NVRTC's own cache for the process and points `GLATRAIN_CACHE_DIR` at an empty temporary
/// directory for that call (then restores it and removes the directory).
///
/// # Errors
///
/// [`BenchError::NoCuda`] without a CUDA device; CUDA, op or libtorch failures; a report that
/// cannot be written.
pub fn run_gla_bench(
    json_out: Option<&Path>,
    filter: &BenchFilter,
) -> Result<BenchReport, BenchError> {
    filter.validate()?;
    // CUDA 13 keeps NVRTC results in its own cache (~/.nv/ComputeCache), which would make the
    // first-call measurement a cache hit. The driver reads this variable when CUDA initialises,
    // which the next line does.
    std::env::set_var("CUDA_CACHE_DISABLE", "1");
    if !tch::Cuda::is_available() {
        return Err(BenchError::NoCuda);
    }
    // Fail before the long run, not after it, when the report's directory cannot be made.
    if let Some(path) = json_out {
        create_parent(path).map_err(|e| BenchError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let dev = Device::Cuda(0);
    let cuda = CudaDevice::get(0)?;
    let gpu = cuda
        .context()
        .name()
        .map_err(|e| driver_error("cuDeviceGetName", e))?;
    let timer = CudaTimer { dev: cuda.clone() };
    let _guard = tch::no_grad_guard();

    let first = first_call_times(&cuda, dev)?;
    println!(
        "first call (forward + backward; NVRTC compile of the bf16 module + load + run; kernel \
         tiers: {}): {:.2} s; optimised kernels loaded after {:.2} s",
        first.tiers, first.first_call_s, first.final_tier_ready_s
    );
    let (slowest, slowest_s) = first
        .by_kernel
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0));
    println!(
        "NVRTC compile of the bf16 module alone: {:.2} s (its slowest kernel, {slowest}: \
         {slowest_s:.2} s); at the quick tier: {:.2} s",
        first.nvrtc_compile_s, first.nvrtc_quick_compile_s
    );

    let mut rows = Vec::new();
    println!("{}", table_header());
    for (&(b, t, h, d), &fla_fwd_bwd_ms) in SHAPES.iter().zip(&FLA_FWD_BWD_MS) {
        if !filter.keeps_shape((b, t, h, d)) {
            continue;
        }
        let (floor_fwd_ms, floor_fwd_bwd_ms) = floors_ms(b, t, h, d);
        let shape = [b, t, h, d];
        let q = Tensor::f_randn(shape, (Kind::BFloat16, dev))?;
        let k = Tensor::f_randn(shape, (Kind::BFloat16, dev))?;
        let v = Tensor::f_randn(shape, (Kind::BFloat16, dev))?;
        let g = log_gates(&shape, dev)?;
        let d_o = Tensor::f_randn(shape, (Kind::BFloat16, dev))?;
        let iters = if t * b >= 16384 { 10 } else { 20 };

        let mut modes: Vec<(&'static str, Timed)> = vec![
            ("chunk", Timed::Gla(GlaMode::Chunk)),
            ("fused_chunk", Timed::Gla(GlaMode::FusedChunk)),
        ];
        if d <= 64 {
            modes.push(("fused_recurrent", Timed::Gla(GlaMode::FusedRecurrent)));
        }
        modes.push(("sdpa_flash", Timed::Sdpa(Some(SdpaBackend::Flash))));
        modes.push(("sdpa", Timed::Sdpa(None)));
        modes.retain(|(name, _)| filter.keeps_mode(name));
        for (name, mode) in modes {
            let _only = match mode {
                Timed::Sdpa(Some(backend)) => Some(OnlyBackend::new(backend)),
                _ => None,
            };
            let sdpa_backend = match mode {
                Timed::Sdpa(_) => chosen_backend(&q, &k, &v)?.map(SdpaBackend::name),
                Timed::Gla(mode) => {
                    crate::gla::prepare_optimised(0, Kind::BFloat16, mode)?;
                    None
                }
            };
            let fwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 3, iters, || {
                attention(mode, &q, &k, &v, &g).map(drop)
            })?;
            let leaves = [&q, &k, &v, &g]
                .iter()
                .map(|x| x.f_detach()?.f_set_requires_grad(true))
                .collect::<Result<Vec<Tensor>, TchError>>()?;
            let inputs: Vec<&Tensor> = leaves.iter().collect();
            let fwd_bwd_ms = timer.fastest_median_ms(
                TIMING_ROUNDS,
                2,
                iters,
                || -> Result<(), BenchError> {
                    tch::with_grad(|| {
                        let o = attention(mode, &leaves[0], &leaves[1], &leaves[2], &leaves[3])?;
                        // o.backward(do), the gradients returned instead of accumulated.
                        crate::autograd::grad(&o, &d_o, &inputs).map_err(BenchError::Backward)?;
                        Ok(())
                    })
                },
            )?;
            let row = BenchRow {
                shape,
                mode: name,
                sdpa_backend,
                fwd_ms,
                fwd_bwd_ms,
                floor_fwd_ms,
                floor_fwd_bwd_ms,
                fla_fwd_bwd_ms,
            };
            println!("{}", row.table_line());
            rows.push(row);
        }
    }
    let report = BenchReport {
        gpu,
        date: civil_date(days_since_epoch()),
        kernel_tiers: first.tiers,
        first_call_s: first.first_call_s,
        final_tier_ready_s: first.final_tier_ready_s,
        nvrtc_compile_s: first.nvrtc_compile_s,
        nvrtc_quick_compile_s: first.nvrtc_quick_compile_s,
        nvrtc_compile_by_kernel_s: first.by_kernel,
        rows,
    };
    if let Some(path) = json_out {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}

/// Log gates in (-inf, 0), mild enough that decays stay well inside f32 over long sequences.
fn log_gates(shape: &[i64], dev: Device) -> Result<Tensor, TchError> {
    Tensor::f_randn(shape, (Kind::Float, dev))?
        .f_log_sigmoid()?
        .f_div_scalar(16.0)
}

/// What [`first_call_times`] measured, in s.
struct FirstCall {
    /// The tier policy in force.
    tiers: &'static str,
    /// A first GLA training call with empty kernel caches.
    first_call_s: f64,
    /// From its start until the final tier was loaded.
    final_tier_ready_s: f64,
    /// The bf16 module's NVRTC compilation alone, Full tier.
    nvrtc_compile_s: f64,
    /// The same, Quick tier.
    nvrtc_quick_compile_s: f64,
    /// Each kernel's Full compilation within it.
    by_kernel: Vec<(&'static str, f64)>,
}

/// Wall time of a first GLA training call (forward and backward, bf16, `chunk`) with empty kernel
/// caches: NVRTC compilation of the module's kernels (in parallel), load, run; and until the
/// optimised kernels that every later call runs are loaded. Then of each tier's compilation
/// alone, and of each kernel's.
fn first_call_times(cuda: &CudaDevice, dev: Device) -> Result<FirstCall, BenchError> {
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
    let source = KernelSource::GlaTensorCore;
    // Also what the timed rows need; and the background compile writes into this cache.
    cuda.prepare_final(source, KernelDtype::Bf16)?;
    let final_tier_ready_s = t0.elapsed().as_secs_f64();
    drop(cache);
    let compile = |tier| -> Result<(f64, Vec<Compiled>), BenchError> {
        let t0 = Instant::now();
        let compiled = compile_uncached(source, KernelDtype::Bf16, cuda.arch(), tier)?;
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
        by_kernel: source
            .kernels()
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

/// The op a benchmark row times.
#[derive(Debug, Clone, Copy)]
enum Timed {
    /// GLA in this mode.
    Gla(GlaMode),
    /// Causal SDPA on this backend alone, or on libtorch's own choice.
    Sdpa(Option<SdpaBackend>),
}

/// GLA or causal SDPA (the backend restricted by the caller).
///
/// # Shapes
///
/// q, k, v, g: [B, T, H, D]; returns o: [B, T, H, D].
fn attention(
    op: Timed,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
) -> Result<Tensor, BenchError> {
    match op {
        Timed::Gla(mode) => Ok(gla(q, k, v, g, None, None, mode, false)?.0),
        Timed::Sdpa(_) => Ok(causal_sdpa(q, k, v)?),
    }
}

fn days_since_epoch() -> i64 {
    // A clock before 1970 reads as day 0 rather than failing the benchmark.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        .div_euclid(86_400)
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_upper_middle_value() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&mut [5.0]), 5.0);
    }

    #[test]
    fn civil_date_handles_epoch_leap_days_and_centuries() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(11_017), "2000-03-01");
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(20_417), "2025-11-25");
        assert_eq!(civil_date(-1), "1969-12-31");
    }

    #[test]
    fn floor_matches_the_anchor() {
        // ANCHORS.md: 8 x 2048 x 16 x 128 forward+backward moves ~1.14 GB = ~0.38 ms.
        let (fwd, fwd_bwd) = floors_ms(8, 2048, 16, 128);
        assert!((fwd_bwd - 0.380).abs() < 1e-3, "{fwd_bwd}");
        assert!((fwd / fwd_bwd - 12.0 / 34.0).abs() < 1e-12);
    }

    fn sample_report() -> BenchReport {
        let (floor_fwd_ms, floor_fwd_bwd_ms) = floors_ms(8, 2048, 16, 128);
        BenchReport {
            gpu: "NVIDIA H100 80GB HBM3".into(),
            date: "2026-11-25".into(),
            kernel_tiers: "tiered",
            first_call_s: 0.6,
            final_tier_ready_s: 1.7,
            nvrtc_compile_s: 1.2,
            nvrtc_quick_compile_s: 0.4,
            nvrtc_compile_by_kernel_s: vec![("gla_tc_attn", 0.5), ("gla_tc_bwd_dqk", 1.1)],
            rows: vec![BenchRow {
                shape: [8, 2048, 16, 128],
                mode: "chunk",
                sdpa_backend: None,
                fwd_ms: 0.5,
                fwd_bwd_ms: 1.52,
                floor_fwd_ms,
                floor_fwd_bwd_ms,
                fla_fwd_bwd_ms: 3.69,
            }],
        }
    }

    #[test]
    fn table_line_shows_ratios_to_floor_and_fla() {
        let line = sample_report().rows[0].table_line();
        let cols: Vec<&str> = line.split_whitespace().collect();
        // "8 x 2048 x 16 x 128" is 7 words, then mode, fwd, fwd+bwd, floor, x floor, vs FLA.
        assert_eq!(
            &cols[7..],
            ["chunk", "0.500", "1.520", "0.380", "4.0", "0.41"]
        );
        assert_eq!(
            table_header().split_whitespace().count(),
            "B x T x H x D mode fwd ms fwd+bwd ms floor ms x floor vs FLA"
                .split_whitespace()
                .count()
        );
    }

    #[test]
    fn sdpa_rows_name_the_backend_libtorch_chose() {
        let mut row = sample_report().rows[0].clone();
        row.mode = "sdpa";
        row.sdpa_backend = Some("cudnn");
        assert!(
            row.table_line().contains("sdpa (cudnn)"),
            "{}",
            row.table_line()
        );
        assert_eq!(row.to_json()["sdpa_backend"], "cudnn");
        row.mode = "sdpa_flash";
        row.sdpa_backend = Some("flash");
        assert!(!row.table_line().contains('('), "{}", row.table_line());
        assert_eq!(row.to_json()["mode"], "sdpa_flash");
    }

    #[test]
    fn report_json_round_trips_through_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results/gla.json");
        let report = sample_report();
        report.write_json(&path).unwrap();
        let read: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read, report.to_json());
        assert_eq!(read["rows"][0]["shape"]["K"], 128);
        assert_eq!(read["rows"][0]["fla_chunk_fwd_bwd_ms_anchor"], 3.69);
        assert_eq!(read["first_call_s"], 0.6);
        assert_eq!(read["kernel_tiers"], "tiered");
        assert_eq!(read["final_tier_ready_s"], 1.7);
        assert_eq!(read["nvrtc_compile_by_kernel_s"]["gla_tc_bwd_dqk"], 1.1);
    }

    #[test]
    fn unwritable_report_path_is_bad_input_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        // A path under a regular file cannot be created.
        let path = file.join("gla.json");
        let err = sample_report().write_json(&path).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn unknown_filters_are_bad_input_before_anything_runs() {
        let shape = BenchFilter {
            shapes: vec!["8x2048x16x100".to_string()],
            modes: vec![],
        };
        let err = run_gla_bench(None, &shape).unwrap_err();
        assert!(err.is_bad_input());
        let text = err.to_string();
        assert!(text.contains("--shape \"8x2048x16x100\""), "{text}");
        assert!(text.contains("8x2048x16x128"), "{text}");
        let mode = BenchFilter {
            shapes: vec!["8x2048x16x128".to_string()],
            modes: vec!["flash".to_string()],
        };
        let err = run_gla_bench(None, &mode).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("--mode \"flash\""), "{err}");
        assert!(BenchFilter::default().keeps_mode("sdpa_flash"));
        assert!(mode.keeps_shape((8, 2048, 16, 128)) && !mode.keeps_shape((8, 2048, 16, 64)));
    }

    #[test]
    fn bench_without_cuda_says_so() {
        if tch::Cuda::is_available() {
            println!("skipped: a CUDA device is present");
            return;
        }
        let err = run_gla_bench(None, &BenchFilter::default()).unwrap_err();
        assert!(matches!(err, BenchError::NoCuda), "{err}");
        assert!(!err.is_bad_input());
        assert!(err.to_string().contains("no CUDA device"), "{err}");
    }

    #[test]
    fn timer_measures_gpu_work_and_passes_errors_on() {
        if !tch::Cuda::is_available() {
            println!("skipped: no CUDA device");
            return;
        }
        let timer = CudaTimer::new(0).unwrap();
        let a = Tensor::randn([1024, 1024], (Kind::Float, Device::Cuda(0)));
        // cuBLAS starts on the first product, which can take longer than WARMUP_MIN alone; with
        // it done, a ~0.1 ms product takes many calls to fill the warm-up time.
        a.matmul(&a).sum(Kind::Float).double_value(&[]);
        let mut calls = 0;
        let started = Instant::now();
        let ms = timer
            .median_ms(2, 5, || -> Result<(), BenchError> {
                calls += 1;
                Ok(a.f_matmul(&a).map(drop)?)
            })
            .unwrap();
        // At least the 2 warm-up calls asked for, more until WARMUP_MIN has passed, then 5.
        assert!(calls > 7, "{calls}");
        assert!(started.elapsed() >= WARMUP_MIN);
        assert!(ms > 0.0 && ms < 1000.0, "{ms}");
        // Rounds: the fastest of their medians, each round warmed up again.
        calls = 0;
        let best = timer
            .fastest_median_ms(3, 2, 5, || -> Result<(), BenchError> {
                calls += 1;
                Ok(a.f_matmul(&a).map(drop)?)
            })
            .unwrap();
        assert!(calls > 3 * 7, "{calls}");
        assert!(best > 0.0 && best < 1000.0, "{best}");
        let err = timer
            .median_ms(0, 3, || -> Result<(), BenchError> {
                Err(BenchError::NoCuda)
            })
            .unwrap_err();
        assert!(matches!(err, BenchError::NoCuda));
    }
}
