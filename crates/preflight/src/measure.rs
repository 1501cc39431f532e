//! The measured mode: time each candidate schedule on the real shape and keep the fastest,
//! cached on disk so the next run decides instantly.

use std::path::{Path, PathBuf};

use glatrain_config::{GlaMode, ModeChoice};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::device::{DeviceKind, DeviceProfile};
use crate::error::PreflightError;
use crate::estimate::estimate;
use crate::op::{LayerOp, Source};
use crate::report::ms;
use crate::rules::{choose_mode, measured_softmax_advice, softmax_advice, Decision};
use crate::shape::{LayerShape, ModelType};
use crate::tiles::Padding;
use glatrain_fs::write_atomic;

/// fused_recurrent is timed only up to this T: beyond it, a token-by-token walk is far from the
/// fastest and its timing would only slow the preflight down.
pub const MEASURE_RECURRENT_MAX_T: usize = 1024;
/// Bumped when the cache entry's layout or the meaning of its key changes.
const CACHE_FORMAT: u32 = 2;

/// One measurement of causal softmax attention at a layer's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftmaxTiming {
    /// Milliseconds of one forward + backward.
    pub ms: f64,
    /// The SDPA backend libtorch ran it on (`cudnn`, `flash`, ...).
    pub backend: String,
}

/// Times the GLA op on the device (implemented by the CLI on top of the ops crate).
pub trait ModeTimer {
    /// Milliseconds of one forward + backward of the GLA op with `shape`'s B, T, H, K, V and
    /// dtype in `mode` (a representative figure such as a median after warm-up), or why it
    /// could not run.
    fn time_ms(&mut self, shape: &LayerShape, mode: GlaMode) -> Result<f64, String>;
    /// One forward + backward of causal softmax attention (SDPA, the backend libtorch picks)
    /// with the same B, T, H, K, V and dtype, or why it could not run: the softmax advice then
    /// compares two measurements.
    fn time_softmax(&mut self, shape: &LayerShape) -> Result<SoftmaxTiming, String>;
    /// Identifies the kernels that run (e.g. a hash of their sources): a new version
    /// invalidates every cached decision.
    fn kernel_version(&self) -> String;
}

/// One cached decision; `key` guards against a file-name collision.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    decision: Decision,
}

/// The modes worth timing for `shape`.
fn candidates(shape: &LayerShape) -> Vec<GlaMode> {
    let mut modes = vec![GlaMode::Chunk, GlaMode::FusedChunk];
    if shape.decoding || shape.seq_len <= MEASURE_RECURRENT_MAX_T {
        modes.push(GlaMode::FusedRecurrent);
    }
    modes
}

/// What identifies a measurement: the GPU, the shape, the dtype and the kernels.
fn cache_key(shape: &LayerShape, device: &DeviceProfile, kernel_version: &str) -> String {
    format!(
        "format={CACHE_FORMAT}|gpu={}|B={}|T={}|H={}|K={}|V={}|dtype={}|decoding={}|kernels={kernel_version}",
        device.name,
        shape.batch,
        shape.seq_len,
        shape.num_heads,
        shape.head_k_dim,
        shape.head_v_dim,
        shape.dtype_name(),
        shape.decoding
    )
}

fn cache_path(cache_dir: &Path, key: &str) -> PathBuf {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    cache_dir.join(format!("{}.json", &digest[..32]))
}

/// Times each candidate mode of a GLA `shape` with `timer` and picks the fastest; the decision
/// is cached in `cache_dir` (written atomically) under (GPU name, shape, dtype, kernel
/// version), and a cached decision is returned at once with [`Source::Cached`].
///
/// Candidates: chunk, fused_chunk, and fused_recurrent for T <= [`MEASURE_RECURRENT_MAX_T`] or
/// decoding. A candidate that fails is skipped with a warning. Shapes with nothing to measure
/// (Transformer, Mamba, or a CPU device) get [`choose_mode`]'s decision. Forced modes are the
/// caller's to respect: call [`choose_mode`] for them.
///
/// # Errors
/// [`PreflightError::Measure`] when no candidate could be timed. A cache that cannot be read or
/// written only adds a warning.
pub fn measure(
    shape: &LayerShape,
    device: &DeviceProfile,
    timer: &mut dyn ModeTimer,
    cache_dir: &Path,
) -> Result<Decision, PreflightError> {
    if shape.model_type != ModelType::Gla || device.kind == DeviceKind::Cpu {
        return Ok(choose_mode(shape, device, ModeChoice::Auto));
    }
    let version = timer.kernel_version();
    let key = cache_key(shape, device, &version);
    let path = cache_path(cache_dir, &key);
    let mut warnings = Vec::new();
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<CacheEntry>(&bytes) {
            Ok(entry) if entry.key == key => {
                let mut decision = entry.decision;
                decision.source = Source::Cached;
                return Ok(decision);
            }
            Ok(_) => warnings.push(format!(
                "{}: cache entry of another shape; measuring again",
                path.display()
            )),
            Err(e) => warnings.push(format!(
                "{}: unreadable cache entry ({e}); measuring again",
                path.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(format!(
            "{}: cannot read the cache ({e}); measuring again",
            path.display()
        )),
    }

    let mut timings = Vec::new();
    let mut failures = Vec::new();
    for kernel_mode in candidates(shape) {
        match timer.time_ms(shape, kernel_mode) {
            Ok(t) if t.is_finite() && t > 0.0 => timings.push((kernel_mode, t)),
            Ok(t) => failures.push(format!("{}: the timer returned {t} ms", kernel_mode.name())),
            Err(e) => failures.push(format!("{}: {e}", kernel_mode.name())),
        }
    }
    let Some(&(best, best_ms)) = timings.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
        return Err(PreflightError::Measure {
            shape: describe(shape),
            failures: failures.join("; "),
        });
    };
    warnings.extend(
        failures
            .iter()
            .map(|f| format!("measuring {}: {f}", describe(shape))),
    );
    let mode = LayerOp::Gla(best);
    let (advice, softmax) = match timer.time_softmax(shape) {
        Ok(sdpa) if sdpa.ms.is_finite() && sdpa.ms > 0.0 => {
            let op = format!("sdpa ({})", sdpa.backend);
            (
                measured_softmax_advice(shape, device, mode, best_ms, sdpa.ms, &op),
                format!("; softmax attention {op} {}", ms(sdpa.ms)),
            )
        }
        failed => {
            let why = failed.map_or_else(|e| e, |t| format!("the timer returned {} ms", t.ms));
            warnings.push(format!(
                "measuring softmax attention at {}: {why}; its advice compares an estimate",
                describe(shape)
            ));
            (softmax_advice(shape, device, mode, best_ms), String::new())
        }
    };
    let listed: Vec<String> = timings
        .iter()
        .map(|(m, t)| format!("{} {}", m.name(), ms(*t)))
        .collect();
    let mut decision = Decision {
        op: mode,
        source: Source::Measured,
        reason: format!(
            "measured on {} (kernels {version}): {}; fastest: {}{softmax}",
            device.name,
            listed.join(", "),
            mode.name()
        ),
        est_time_ms: best_ms,
        est_memory_bytes: estimate(shape, device, mode).memory_bytes,
        padding: Padding::for_tiles(shape.head_k_dim, shape.head_v_dim),
        advice,
        warnings: Vec::new(),
    };
    let entry = CacheEntry {
        key,
        decision: decision.clone(),
    };
    let json = serde_json::to_vec_pretty(&entry).expect("a decision serializes");
    if let Err(e) = write_atomic(&path, &json) {
        warnings.push(format!(
            "{}: cannot cache the measurement ({e})",
            path.display()
        ));
    }
    decision.warnings = warnings;
    Ok(decision)
}

/// "B 8 T 2048 H 4 K 128 V 256 bf16", for messages.
fn describe(shape: &LayerShape) -> String {
    format!(
        "B {} T {} H {} K {} V {} {}",
        shape.batch,
        shape.seq_len,
        shape.num_heads,
        shape.head_k_dim,
        shape.head_v_dim,
        shape.dtype_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_config::Precision;

    fn softmax(ms: f64) -> SoftmaxTiming {
        SoftmaxTiming {
            ms,
            backend: "cudnn".into(),
        }
    }

    /// A deterministic timer: fixed times per mode, counting its calls.
    struct FakeTimer {
        chunk: Result<f64, String>,
        fused_chunk: Result<f64, String>,
        fused_recurrent: Result<f64, String>,
        softmax: Result<SoftmaxTiming, String>,
        calls: Vec<GlaMode>,
        version: String,
    }

    impl FakeTimer {
        fn new(chunk: f64, fused_chunk: f64, fused_recurrent: f64) -> Self {
            Self {
                chunk: Ok(chunk),
                fused_chunk: Ok(fused_chunk),
                fused_recurrent: Ok(fused_recurrent),
                softmax: Ok(softmax(100.0)),
                calls: Vec::new(),
                version: "v1".into(),
            }
        }
    }

    impl ModeTimer for FakeTimer {
        fn time_ms(&mut self, _shape: &LayerShape, mode: GlaMode) -> Result<f64, String> {
            self.calls.push(mode);
            match mode {
                GlaMode::Chunk => self.chunk.clone(),
                GlaMode::FusedChunk => self.fused_chunk.clone(),
                GlaMode::FusedRecurrent => self.fused_recurrent.clone(),
                other => Err(format!("{other:?} is not timed")),
            }
        }
        fn time_softmax(&mut self, _shape: &LayerShape) -> Result<SoftmaxTiming, String> {
            self.softmax.clone()
        }
        fn kernel_version(&self) -> String {
            self.version.clone()
        }
    }

    fn shape(t: usize) -> LayerShape {
        LayerShape {
            model_type: ModelType::Gla,
            num_layers: 24,
            batch: 8,
            seq_len: t,
            num_heads: 4,
            num_kv_heads: 4,
            head_k_dim: 128,
            head_v_dim: 256,
            hidden_size: 1024,
            mlp_size: 2816,
            short_conv: false,
            dtype: Precision::Bf16,
            device: "cuda".into(),
            decoding: false,
        }
    }

    #[test]
    fn picks_the_fastest_caches_it_and_reuses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let h100 = DeviceProfile::h100_sxm();
        let mut timer = FakeTimer::new(0.9, 0.6, 3.0);
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(
            (d.op, d.source, d.est_time_ms),
            (LayerOp::Gla(GlaMode::FusedChunk), Source::Measured, 0.6)
        );
        // T = 2048 > 1024: fused_recurrent is not timed.
        assert_eq!(timer.calls, [GlaMode::Chunk, GlaMode::FusedChunk]);
        assert!(
            d.reason
                .contains("chunk 0.900 ms, fused_chunk 0.600 ms; fastest: fused_chunk"),
            "{}",
            d.reason
        );
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // Second call: from the cache, without timing anything.
        let mut second = FakeTimer::new(0.1, 0.1, 0.1);
        let cached = measure(&shape(2048), &h100, &mut second, dir.path()).unwrap();
        assert!(second.calls.is_empty());
        assert_eq!(cached.source, Source::Cached);
        assert_eq!(
            (cached.op, cached.est_time_ms, &cached.reason),
            (d.op, d.est_time_ms, &d.reason)
        );

        // Another kernel version, GPU or shape measures again.
        second.version = "v2".into();
        assert_eq!(
            measure(&shape(2048), &h100, &mut second, dir.path())
                .unwrap()
                .source,
            Source::Measured
        );
        assert_eq!(second.calls.len(), 2);
        let mut third = FakeTimer::new(0.5, 0.6, 0.2);
        let d = measure(&shape(512), &DeviceProfile::h200(), &mut third, dir.path()).unwrap();
        assert_eq!(
            third.calls.len(),
            3,
            "T = 512: fused_recurrent is a candidate"
        );
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::FusedRecurrent), Source::Measured)
        );
    }

    #[test]
    fn softmax_advice_compares_two_measurements() {
        let h100 = DeviceProfile::h100_sxm();
        let mut timer = FakeTimer::new(0.9, 1.2, 3.0);
        // SDPA slower than the measured GLA time: no advice, whatever the estimates say.
        timer.softmax = Ok(softmax(1.0));
        let dir = tempfile::tempdir().unwrap();
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(d.advice, None);
        // Faster: the advice quotes both measurements.
        timer.softmax = Ok(softmax(0.4));
        let dir = tempfile::tempdir().unwrap();
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        let advice = d.advice.expect("SDPA measured faster");
        assert!(
            advice.starts_with(
                "softmax attention measured faster at this shape: sdpa (cudnn) 0.400 ms vs GLA chunk \
                 0.900 ms fwd+bwd per layer"
            ),
            "{advice}"
        );
        assert!(
            d.reason
                .ends_with("fastest: chunk; softmax attention sdpa (cudnn) 0.400 ms"),
            "{}",
            d.reason
        );
        // SDPA could not run: a warning, and the estimate-based advice.
        timer.softmax = Err("out of memory".into());
        let dir = tempfile::tempdir().unwrap();
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(
            d.warnings,
            [
                "measuring softmax attention at B 8 T 2048 H 4 K 128 V 256 bf16: out of memory; \
              its advice compares an estimate"
            ]
        );
        assert_eq!(
            d.advice,
            softmax_advice(&shape(2048), &h100, LayerOp::Gla(GlaMode::Chunk), 0.9)
        );
    }

    #[test]
    fn failures_are_skipped_or_reported() {
        let dir = tempfile::tempdir().unwrap();
        let h100 = DeviceProfile::h100_sxm();
        let mut timer = FakeTimer::new(0.9, 0.6, 3.0);
        timer.fused_chunk = Err("launch failed".into());
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(d.op, LayerOp::Gla(GlaMode::Chunk));
        assert_eq!(
            d.warnings,
            ["measuring B 8 T 2048 H 4 K 128 V 256 bf16: fused_chunk: launch failed"]
        );

        let mut broken = FakeTimer::new(f64::NAN, 0.0, 1.0);
        let err = measure(&shape(4096), &h100, &mut broken, dir.path()).unwrap_err();
        assert!(!err.is_bad_input());
        assert!(
            err.to_string()
                .contains("chunk: the timer returned NaN ms; fused_chunk: the timer returned 0 ms"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_cache_entry_is_measured_again_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let h100 = DeviceProfile::h100_sxm();
        let key = cache_key(&shape(2048), &h100, "v1");
        std::fs::write(cache_path(dir.path(), &key), "{ not json").unwrap();
        let mut timer = FakeTimer::new(0.9, 0.6, 3.0);
        let d = measure(&shape(2048), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(d.source, Source::Measured);
        assert!(
            d.warnings[0].contains("unreadable cache entry"),
            "{:?}",
            d.warnings
        );
        let mut again = FakeTimer::new(0.1, 0.1, 0.1);
        assert_eq!(
            measure(&shape(2048), &h100, &mut again, dir.path())
                .unwrap()
                .source,
            Source::Cached
        );
    }

    #[test]
    fn nothing_to_measure_on_cpu_or_for_baselines() {
        let dir = tempfile::tempdir().unwrap();
        let mut timer = FakeTimer::new(0.9, 0.6, 3.0);
        let d = measure(&shape(2048), &DeviceProfile::cpu(), &mut timer, dir.path()).unwrap();
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::Reference), Source::Rules)
        );
        let t = LayerShape {
            model_type: ModelType::Transformer,
            ..shape(2048)
        };
        assert_eq!(
            measure(&t, &DeviceProfile::h100_sxm(), &mut timer, dir.path())
                .unwrap()
                .op,
            LayerOp::SdpaFused
        );
        assert!(timer.calls.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
