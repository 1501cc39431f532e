//! Kernel sources and their compilation: NVRTC to CUBIN for one architecture, cached on disk.
//!
//! Sources are embedded in the binary (`include_str!` of `kernels/`). For iterating on a kernel
//! without rebuilding Rust, `GLATRAIN_KERNEL_DIR=<dir>` makes the launchers read `<dir>/<file>`
//! instead. Each kernel of a source is its own NVRTC program (`-DGLA_KERNEL=<index>` selects it),
//! and a source's kernels are compiled in parallel: the first call waits for the slowest kernel,
//! not for all of them. CUBIN (not PTX) is produced so the driver does not JIT at load time.
//!
//! Every kernel compiles at two [`Tier`]s. With an empty cache, `Quick` code (NVRTC's
//! `--Ofast-compile=mid`: the bf16 module in ~0.6 s instead of 1.1-2.3 s on an H100 host, kernels
//! ~8x slower) serves the first calls while the `Full` code (the optimised code the benchmarks
//! time) compiles on a background thread and then takes over. Both tiers give the same results
//! bit for bit (tests/cuda_tiers.rs), so a run from a cold cache matches one from a warm cache.
//! `GLATRAIN_KERNEL_TIER` pins one tier instead ([`TierPolicy`]).
//!
//! The cache lives in `$GLATRAIN_CACHE_DIR`, else `$XDG_CACHE_HOME/glatrain/kernels`, else
//! `~/.cache/glatrain/kernels`, one file per (source text, options, NVRTC version, arch).

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

use super::{catch_library_panic, CudaError};

/// A kernel source file under `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSource {
    /// `kernels/gla.cu`: every GLA schedule (the only one for fp32 inputs).
    Gla,
    /// `kernels/gla_tc.cu`: the `chunk` schedule on bf16/fp16 tensor cores.
    GlaTensorCore,
}

impl KernelSource {
    /// Every source, for the compile-everything check.
    pub const ALL: [KernelSource; 2] = [KernelSource::Gla, KernelSource::GlaTensorCore];

    /// The file name under `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            KernelSource::Gla => "gla.cu",
            KernelSource::GlaTensorCore => "gla_tc.cu",
        }
    }

    /// The kernels of this source, in the order of their `GLA_KERNEL` index (the names without
    /// the dtype suffix).
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            KernelSource::Gla => &[
                "gla_recurrent_fwd",
                "gla_recurrent_bwd",
                "gla_chunk_fwd",
                "gla_chunk_bwd",
                "gla_chunk_states",
                "gla_dg",
            ],
            KernelSource::GlaTensorCore => &[
                "gla_tc_states",
                "gla_tc_attn",
                "gla_tc_fwd_o",
                "gla_tc_bwd_dv",
                "gla_tc_bwd_dqk",
                "gla_tc_carry",
                "gla_tc_fixup",
                "gla_tc_walk_o",
                "gla_tc_walk_dv",
                "gla_tc_walk_o_wide",
                "gla_tc_walk_dv_wide",
            ],
        }
    }

    /// The input dtypes this source is instantiated for.
    pub fn dtypes(self) -> &'static [KernelDtype] {
        match self {
            KernelSource::Gla => &KernelDtype::ALL,
            KernelSource::GlaTensorCore => &[KernelDtype::Bf16, KernelDtype::F16],
        }
    }

    fn embedded(self) -> &'static str {
        match self {
            KernelSource::Gla => include_str!("../../../../kernels/gla.cu"),
            KernelSource::GlaTensorCore => include_str!("../../../../kernels/gla_tc.cu"),
        }
    }

    /// The source text: `$GLATRAIN_KERNEL_DIR/<file>` when that variable is set, else embedded.
    pub fn text(self) -> Result<String, CudaError> {
        match std::env::var_os("GLATRAIN_KERNEL_DIR") {
            Some(dir) => {
                let path = PathBuf::from(&dir).join(self.file_name());
                std::fs::read_to_string(&path).map_err(|e| CudaError::Override {
                    dir: dir.to_string_lossy().into_owned(),
                    file: self.file_name().to_string(),
                    message: e.to_string(),
                })
            }
            None => Ok(self.embedded().to_string()),
        }
    }
}

/// The element type a kernel module is instantiated for (one module per dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelDtype {
    /// fp32 inputs.
    F32,
    /// bf16 inputs.
    Bf16,
    /// fp16 inputs.
    F16,
}

impl KernelDtype {
    /// Every dtype, for the compile-everything check.
    pub const ALL: [KernelDtype; 3] = [KernelDtype::F32, KernelDtype::Bf16, KernelDtype::F16];

    /// The dtype of a tch kind, if kernels exist for it.
    pub fn of(kind: tch::Kind) -> Option<Self> {
        match kind {
            tch::Kind::Float => Some(Self::F32),
            tch::Kind::BFloat16 => Some(Self::Bf16),
            tch::Kind::Half => Some(Self::F16),
            _ => None,
        }
    }

    /// The suffix of kernel names (`gla_chunk_fwd_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    fn define(self) -> &'static str {
        match self {
            Self::F32 => "-DGLA_DTYPE_F32",
            Self::Bf16 => "-DGLA_DTYPE_BF16",
            Self::F16 => "-DGLA_DTYPE_F16",
        }
    }
}

/// How much optimisation NVRTC spends on a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// `--Ofast-compile=mid`: no unrolling, arrays in local memory; about a third of the compile
    /// time for ~8x slower kernels, so a first call need not wait for the optimiser. (`max`
    /// compiles no faster and runs ~150x slower; `min` barely shortens the compile.)
    Quick,
    /// NVRTC's default optimisation: the code every later call runs.
    Full,
}

impl Tier {
    /// The tier's name, as `GLATRAIN_KERNEL_TIER` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Quick => "quick",
            Tier::Full => "full",
        }
    }
}

/// Which tiers a process compiles: `GLATRAIN_KERNEL_TIER` = `tiered` (the default), `full` or
/// `quick`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierPolicy {
    /// Full code from the disk cache when it is all there; else Quick code at once and Full code
    /// from a background compile as soon as it is ready.
    Tiered,
    /// Only this tier: `full` waits for the optimised code, as before there were tiers; `quick`
    /// never leaves the quick code (testing it).
    Only(Tier),
}

impl TierPolicy {
    /// The policy `GLATRAIN_KERNEL_TIER` asks for.
    pub fn from_env() -> Result<Self, CudaError> {
        Self::parse(std::env::var_os("GLATRAIN_KERNEL_TIER").as_deref())
    }

    /// The policy for a value of `GLATRAIN_KERNEL_TIER` (None: unset).
    fn parse(value: Option<&std::ffi::OsStr>) -> Result<Self, CudaError> {
        let Some(value) = value else {
            return Ok(TierPolicy::Tiered);
        };
        match value.to_str() {
            Some("tiered") | Some("") => Ok(TierPolicy::Tiered),
            Some("full") => Ok(TierPolicy::Only(Tier::Full)),
            Some("quick") => Ok(TierPolicy::Only(Tier::Quick)),
            _ => Err(CudaError::Setting {
                variable: "GLATRAIN_KERNEL_TIER",
                value: value.to_string_lossy().into_owned(),
                expected: "tiered, full or quick",
            }),
        }
    }

    /// The policy's name, as `GLATRAIN_KERNEL_TIER` spells it.
    pub fn name(self) -> &'static str {
        match self {
            TierPolicy::Tiered => "tiered",
            TierPolicy::Only(tier) => tier.name(),
        }
    }

    /// The tier a module ends with under this policy.
    pub fn final_tier(self) -> Tier {
        match self {
            TierPolicy::Tiered => Tier::Full,
            TierPolicy::Only(tier) => tier,
        }
    }
}

/// One NVRTC program: a kernel of a source's text, for a dtype, an architecture and a tier.
#[derive(Debug, Clone, Copy)]
struct Program<'a> {
    text: &'a str,
    source: KernelSource,
    dtype: KernelDtype,
    arch: &'a str,
    kernel: usize,
    tier: Tier,
}

impl Program<'_> {
    fn options(&self) -> Vec<String> {
        let Program {
            dtype,
            arch,
            kernel,
            tier,
            ..
        } = *self;
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
            dtype.define().to_string(),
            format!("-DGLA_KERNEL={kernel}"),
            // Subnormals flushed: without it every exp carries three instructions of
            // subnormal-range handling, for values (< 1e-38) that never matter here.
            "--ftz=true".to_string(),
        ];
        if tier == Tier::Quick {
            options.push("--Ofast-compile=mid".to_string());
        }
        options
    }

    /// Compiles the program to CUBIN; a rejected source's error carries NVRTC's log.
    fn compile(&self) -> Result<Vec<u8>, CudaError> {
        nvrtc_version()?;
        let opts = self.options();
        let src = CString::new(self.text).map_err(|_| CudaError::Compile {
            source_name: self.source.file_name().to_string(),
            arch: self.arch.to_string(),
            options: opts.join(" "),
            log: "the source contains a NUL byte".to_string(),
        })?;
        let name = CString::new(self.source.file_name()).expect("file names have no NUL");
        let prog = catch_library_panic("loading libnvrtc", || {
            result::create_program(&src, Some(&name))
        })?
        .map_err(|e| CudaError::Library(format!("nvrtcCreateProgram: {e:?}")))?;
        // SAFETY: `prog` was created above and is destroyed exactly once, below; `src` and `name`
        // outlive it.
        let compiled = unsafe { result::compile_program(prog, &opts) };
        // SAFETY: as above; the log and CUBIN getters write into buffers of the sizes NVRTC reports.
        let out = unsafe {
            match compiled {
                Err(_) => {
                    let log = result::get_program_log(prog)
                        .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                        .unwrap_or_else(|e| format!("(no log: {e:?})"));
                    Err(CudaError::Compile {
                        source_name: self.source.file_name().to_string(),
                        arch: self.arch.to_string(),
                        options: opts.join(" "),
                        log,
                    })
                }
                Ok(()) => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| CudaError::Library(format!("nvrtcGetCUBINSize: {e:?}")))
                        .and_then(|()| {
                            let mut cubin = vec![0u8; size];
                            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
                                .result()
                                .map_err(|e| CudaError::Library(format!("nvrtcGetCUBIN: {e:?}")))
                                .map(|()| cubin)
                        })
                }
            }
        };
        // SAFETY: `prog` is valid and not used after this.
        unsafe { result::destroy_program(prog) }
            .map_err(|e| CudaError::Library(format!("nvrtcDestroyProgram: {e:?}")))?;
        out
    }

    /// The program's file in the disk cache, named by a hash of everything its CUBIN depends on
    /// (the source text, the options, NVRTC's version).
    fn cache_entry(&self, (major, minor): (c_int, c_int)) -> CacheEntry {
        let mut hasher = Sha256::new();
        hasher.update(self.text.as_bytes());
        hasher.update(self.options().join(" ").as_bytes());
        hasher.update(format!("nvrtc {major}.{minor}").as_bytes());
        let key = hex::encode(&hasher.finalize()[..16]);
        let file = format!(
            "{}-{}-{}-{}-{key}-{}.cubin",
            self.source.file_name(),
            self.source.kernels()[self.kernel],
            self.dtype.suffix(),
            self.tier.name(),
            self.arch
        );
        CacheEntry {
            path: cache_dir().map(|d| d.join(file)),
        }
    }
}

/// The program of each kernel of `source` (by index in [`KernelSource::kernels`]).
fn programs<'a>(
    text: &'a str,
    source: KernelSource,
    dtype: KernelDtype,
    arch: &'a str,
    tier: Tier,
) -> impl Fn(usize) -> Program<'a> + Sync {
    move |kernel| Program {
        text,
        source,
        dtype,
        arch,
        kernel,
        tier,
    }
}

/// Runs `f` for every kernel index of `source` on its own thread (NVRTC compiles independent
/// programs concurrently), in index order.
fn each_kernel<T: Send>(
    source: KernelSource,
    f: impl Fn(usize) -> Result<T, CudaError> + Sync,
) -> Result<Vec<T>, CudaError> {
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..source.kernels().len())
            .map(|i| scope.spawn(move || f(i)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(CudaError::Library("kernel compilation panicked".into()))
                })
            })
            .collect()
    })
}

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut std::ffi::c_void;
}

/// Loads `libnvrtc-builtins.so.<major>.<minor>` by name from this binary, once.
///
/// libnvrtc opens its builtins library with a plain `dlopen` that searches only its own paths;
/// the binary's RUNPATH (set to the torch wheel's `nvidia/cu13/lib` by glatrain-build) does not
/// apply to it. Loading the library from here first, where the RUNPATH does apply, lets
/// libnvrtc's later `dlopen` find it already loaded. A failure is left for NVRTC to report.
fn preload_builtins(major: c_int, minor: c_int) {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        const RTLD_NOW: c_int = 2;
        const RTLD_GLOBAL: c_int = 0x100;
        let name = CString::new(format!("libnvrtc-builtins.so.{major}.{minor}"))
            .expect("no NUL in the library name");
        // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
        unsafe { dlopen(name.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    });
}

fn nvrtc_version() -> Result<(c_int, c_int), CudaError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers.
    let rc = catch_library_panic("loading libnvrtc", || unsafe {
        sys::nvrtcVersion(&mut major, &mut minor)
    })?;
    rc.result()
        .map_err(|e| CudaError::Library(format!("nvrtcVersion: {e:?}")))?;
    preload_builtins(major, minor);
    Ok((major, minor))
}

/// One kernel's CUBIN and how long NVRTC took to compile it.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The CUBIN.
    pub cubin: Vec<u8>,
    /// Wall time of its compilation (alongside the source's other kernels), s.
    pub seconds: f64,
}

/// Compiles every kernel of `source` for `dtype` and `arch` (e.g. `sm_90`) at `tier` to CUBIN, in
/// parallel, bypassing the cache: one per kernel, in [`KernelSource::kernels`] order.
pub fn compile_uncached(
    source: KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Vec<Compiled>, CudaError> {
    let text = source.text()?;
    let program = programs(&text, source, dtype, arch, tier);
    each_kernel(source, |kernel| {
        let start = std::time::Instant::now();
        let cubin = program(kernel).compile()?;
        Ok(Compiled {
            cubin,
            seconds: start.elapsed().as_secs_f64(),
        })
    })
}

/// The cache directory (see the module docs).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("GLATRAIN_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("glatrain").join("kernels"))
}

/// The CUBINs of every kernel of `source` for `dtype` and `arch` at `tier`
/// ([`KernelSource::kernels`] order), each from the disk cache or freshly compiled (in parallel,
/// then cached; a cache that cannot be written only costs the next run a compilation).
pub fn cubins(
    source: KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Vec<Vec<u8>>, CudaError> {
    let text = source.text()?;
    let version = nvrtc_version()?;
    let program = programs(&text, source, dtype, arch, tier);
    each_kernel(source, |kernel| {
        let entry = program(kernel).cache_entry(version);
        if let Some(bytes) = entry.read() {
            return Ok(bytes);
        }
        let cubin = program(kernel).compile()?;
        entry.write(&cubin);
        Ok(cubin)
    })
}

/// The CUBINs of every kernel of `source` for `dtype` and `arch` at `tier`, if the disk cache
/// holds all of them (nothing is compiled).
pub fn cached_cubins(
    source: KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Option<Vec<Vec<u8>>>, CudaError> {
    let text = source.text()?;
    let version = nvrtc_version()?;
    let program = programs(&text, source, dtype, arch, tier);
    Ok((0..source.kernels().len())
        .map(|kernel| program(kernel).cache_entry(version).read())
        .collect())
}

/// One program's file in the disk cache.
struct CacheEntry {
    path: Option<PathBuf>,
}

impl CacheEntry {
    fn read(&self) -> Option<Vec<u8>> {
        self.path.as_ref().and_then(|p| std::fs::read(p).ok())
    }

    fn write(&self, cubin: &[u8]) {
        if let Some(path) = &self.path {
            if let Err(e) = write_atomically(path, cubin) {
                eprintln!(
                    "glatrain: warning: cannot cache a compiled kernel at {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Writes through a temporary file and a rename, so concurrent processes never read half a file.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_of_kind() {
        assert_eq!(
            KernelDtype::of(tch::Kind::BFloat16),
            Some(KernelDtype::Bf16)
        );
        assert_eq!(KernelDtype::of(tch::Kind::Half), Some(KernelDtype::F16));
        assert_eq!(KernelDtype::of(tch::Kind::Float), Some(KernelDtype::F32));
        assert_eq!(KernelDtype::of(tch::Kind::Double), None);
    }

    #[test]
    fn tier_policy_from_its_variable() {
        let parse = |v: Option<&str>| TierPolicy::parse(v.map(std::ffi::OsStr::new));
        assert_eq!(parse(None).unwrap(), TierPolicy::Tiered);
        assert_eq!(parse(Some("tiered")).unwrap(), TierPolicy::Tiered);
        assert_eq!(parse(Some("full")).unwrap(), TierPolicy::Only(Tier::Full));
        assert_eq!(parse(Some("quick")).unwrap(), TierPolicy::Only(Tier::Quick));
        assert_eq!(TierPolicy::Tiered.final_tier(), Tier::Full);
        for policy in [
            TierPolicy::Tiered,
            TierPolicy::Only(Tier::Full),
            TierPolicy::Only(Tier::Quick),
        ] {
            assert_eq!(parse(Some(policy.name())).unwrap(), policy);
        }
        let err = parse(Some("fast")).unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(
            msg.contains("GLATRAIN_KERNEL_TIER")
                && msg.contains("\"fast\"")
                && msg.contains("quick"),
            "{msg}"
        );
    }

    fn program(text: &str, source: KernelSource, kernel: usize, tier: Tier) -> Program<'_> {
        programs(text, source, KernelDtype::F16, "sm_90", tier)(kernel)
    }

    #[test]
    fn quick_tier_only_adds_the_fast_compile_option() {
        let full = program("", KernelSource::Gla, 3, Tier::Full).options();
        let quick = program("", KernelSource::Gla, 3, Tier::Quick).options();
        assert_eq!(quick[..full.len()], full[..]);
        assert_eq!(quick[full.len()..], ["--Ofast-compile=mid".to_string()]);
    }

    #[test]
    fn compile_error_carries_the_log() {
        let err = program("this is not CUDA", KernelSource::Gla, 2, Tier::Full)
            .compile()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gla.cu") && msg.contains("sm_90"), "{msg}");
        assert!(
            msg.contains("-DGLA_KERNEL=2") && msg.contains("error"),
            "{msg}"
        );
    }

    #[test]
    fn every_kernel_is_its_own_program() {
        for source in KernelSource::ALL {
            let text = source.embedded();
            for (i, name) in source.kernels().iter().enumerate() {
                // Its index selects the section that defines the entry point.
                let guard = format!("GLA_KERNEL == {i}\n");
                let section = text.split_once(&guard).map(|(_, rest)| rest);
                let section = section.and_then(|rest| rest.split_once("#endif"));
                let (section, _) = section.unwrap_or_else(|| panic!("{name}: no {guard}"));
                assert!(
                    section.contains(&format!("ENTRY({name})("))
                        || section.contains(&format!("WALK_ENTRY({name},")),
                    "{name}"
                );
                assert!(program(text, source, i, Tier::Full)
                    .options()
                    .contains(&format!("-DGLA_KERNEL={i}")));
            }
        }
    }

    #[test]
    fn cache_dir_prefers_the_variable() {
        // Read-only check of the resolution order (the variable may be set by the environment).
        if let Some(dir) = std::env::var_os("GLATRAIN_CACHE_DIR") {
            assert_eq!(cache_dir(), Some(PathBuf::from(dir)));
        } else {
            assert!(cache_dir().is_some_and(|d| d.ends_with("glatrain/kernels")));
        }
    }
}
