//! NVRTC compilation of kernel sources to CUBIN for one architecture, cached on disk.
//!
//! Each entry point of a [`KernelSource`] is its own NVRTC program (`-DKERNEL_INDEX=<index>`,
//! `-DKERNEL_DTYPE_<DTYPE>`, the prelude `kernels/common.cuh` as a named header), and a source's
//! programs compile in parallel. CUBIN (not PTX) is produced so the driver does not JIT at load
//! time.
//!
//! Every kernel compiles at two [`Tier`]s. With an empty cache, `Quick` code (NVRTC's
//! `--Ofast-compile=mid`: about a third of the compile time, kernels ~8x slower) serves the first
//! calls while the `Full` code (the optimised code the benchmarks time) compiles on a background
//! thread and then takes over ([`crate::Gpu`]). Both tiers give the same results bit for bit
//! (a GPU test of each op checks it), so a run from a cold cache matches one from a warm cache.
//! `GLATRAIN_KERNEL_TIER` pins one tier instead ([`TierPolicy`]).
//!
//! The cache lives in [`glatrain_fs::cache_dir`]`("kernels")`, one file per (source and header
//! text, options, NVRTC version, architecture).

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

use crate::error::catch_library_panic;
use crate::source::{KernelDtype, KernelSource, PRELUDE};
use crate::CudaError;

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

/// One NVRTC program: an entry point of a source's text, for a dtype, an architecture and a tier.
#[derive(Debug, Clone, Copy)]
struct Program<'a> {
    text: &'a SourceText,
    source: &'static KernelSource,
    dtype: KernelDtype,
    arch: &'a str,
    kernel: usize,
    tier: Tier,
}

/// A source's text and the prelude's, read once for all of its programs.
#[derive(Debug)]
struct SourceText {
    source: String,
    prelude: String,
}

impl SourceText {
    fn of(source: &KernelSource) -> Result<Self, CudaError> {
        Ok(Self {
            source: source.text()?,
            prelude: PRELUDE.text()?,
        })
    }
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
            format!("-DKERNEL_INDEX={kernel}"),
            // Subnormals flushed: without it every exp carries three instructions of
            // subnormal-range handling, for values (< 1e-38) that never matter here.
            "--ftz=true".to_string(),
        ];
        if tier == Tier::Quick {
            options.push("--Ofast-compile=mid".to_string());
        }
        options
    }

    fn compile_error(&self, log: String) -> CudaError {
        CudaError::Compile {
            source_name: self.source.file.to_string(),
            arch: self.arch.to_string(),
            options: self.options().join(" "),
            log,
        }
    }

    /// Compiles the program to CUBIN; a rejected source's error carries NVRTC's log.
    fn compile(&self) -> Result<Vec<u8>, CudaError> {
        nvrtc_version()?;
        let opts = self.options();
        let c_string = |text: &str, what: &str| {
            CString::new(text)
                .map_err(|_| self.compile_error(format!("{what} contains a NUL byte")))
        };
        let src = c_string(&self.text.source, self.source.file)?;
        let name = c_string(self.source.file, "the file name")?;
        let header = c_string(&self.text.prelude, PRELUDE.file)?;
        let header_name = c_string(PRELUDE.file, "the header name")?;
        let headers = [header.as_ptr()];
        let header_names = [header_name.as_ptr()];
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; the header
        // arrays hold one element each.
        let created = catch_library_panic("loading libnvrtc", || unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                1,
                headers.as_ptr(),
                header_names.as_ptr(),
            )
        })?;
        created
            .result()
            .map_err(|e| CudaError::Library(format!("nvrtcCreateProgram: {e:?}")))?;
        // SAFETY: `prog` was created above and is destroyed exactly once, below; the strings it
        // was created from outlive it.
        let compiled = unsafe { result::compile_program(prog, &opts) };
        // SAFETY: as above; the log and CUBIN getters write into buffers of the sizes NVRTC reports.
        let out = unsafe {
            match compiled {
                Err(_) => {
                    let log = result::get_program_log(prog)
                        .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                        .unwrap_or_else(|e| format!("(no log: {e:?})"));
                    Err(self.compile_error(log))
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
    /// (the source and prelude texts, the options, NVRTC's version).
    fn cache_entry(&self, (major, minor): (c_int, c_int)) -> CacheEntry {
        let mut hasher = Sha256::new();
        hasher.update(self.text.source.as_bytes());
        hasher.update(self.text.prelude.as_bytes());
        hasher.update(self.options().join(" ").as_bytes());
        hasher.update(format!("nvrtc {major}.{minor}").as_bytes());
        let key = hex::encode(&hasher.finalize()[..16]);
        let file = format!(
            "{}-{}-{}-{}-{key}-{}.cubin",
            self.source.file,
            self.source.kernels[self.kernel],
            self.dtype.suffix(),
            self.tier.name(),
            self.arch
        );
        CacheEntry {
            path: glatrain_fs::cache_dir("kernels").map(|d| d.join(file)),
        }
    }
}

/// The program of each kernel of `source` (by index in [`KernelSource::kernels`]).
fn programs<'a>(
    text: &'a SourceText,
    source: &'static KernelSource,
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
    source: &KernelSource,
    f: impl Fn(usize) -> Result<T, CudaError> + Sync,
) -> Result<Vec<T>, CudaError> {
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..source.kernels.len())
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
    source: &'static KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Vec<Compiled>, CudaError> {
    let text = SourceText::of(source)?;
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

/// The CUBINs of every kernel of `source` for `dtype` and `arch` at `tier`
/// ([`KernelSource::kernels`] order), each from the disk cache or freshly compiled (in parallel,
/// then cached; a cache that cannot be written only costs the next run a compilation).
pub fn cubins(
    source: &'static KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Vec<Vec<u8>>, CudaError> {
    let text = SourceText::of(source)?;
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
    source: &'static KernelSource,
    dtype: KernelDtype,
    arch: &str,
    tier: Tier,
) -> Result<Option<Vec<Vec<u8>>>, CudaError> {
    let text = SourceText::of(source)?;
    let version = nvrtc_version()?;
    let program = programs(&text, source, dtype, arch, tier);
    Ok((0..source.kernels.len())
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
            if let Err(e) = glatrain_fs::write_atomic(path, cubin) {
                eprintln!(
                    "glatrain: warning: cannot cache a compiled kernel at {}: {e}",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    static TEST_SOURCE: KernelSource = KernelSource {
        file: "test.cu",
        embedded: "#include \"common.cuh\"\n\
                   #if WANT_KERNEL(0)\n\
                   extern \"C\" __global__ void ENTRY(twice)(const input_t* x, float* y, int n) {\n\
                     const int i = blockIdx.x * blockDim.x + threadIdx.x;\n\
                     if (i < n) y[i] = 2.f * to_f32(x[i]);\n\
                   }\n\
                   #endif\n\
                   #if WANT_KERNEL(1)\n\
                   this is not CUDA\n\
                   #endif\n",
        kernels: &["twice", "broken"],
        dtypes: &KernelDtype::ALL,
    };

    fn text() -> SourceText {
        SourceText {
            source: TEST_SOURCE.embedded.to_string(),
            prelude: PRELUDE.embedded.to_string(),
        }
    }

    fn program(text: &SourceText, kernel: usize, tier: Tier) -> Program<'_> {
        programs(text, &TEST_SOURCE, KernelDtype::Bf16, "sm_90", tier)(kernel)
    }

    #[test]
    fn quick_tier_only_adds_the_fast_compile_option() {
        let text = text();
        let full = program(&text, 1, Tier::Full).options();
        let quick = program(&text, 1, Tier::Quick).options();
        assert_eq!(quick[..full.len()], full[..]);
        assert_eq!(quick[full.len()..], ["--Ofast-compile=mid".to_string()]);
        assert!(full.contains(&"-DKERNEL_INDEX=1".to_string()));
        assert!(full.contains(&"-DKERNEL_DTYPE_BF16".to_string()));
    }

    #[test]
    fn each_entry_point_compiles_alone_with_the_prelude() {
        let text = text();
        let cubin = program(&text, 0, Tier::Full).compile().unwrap();
        assert!(cubin.len() > 500, "{} bytes", cubin.len());
        let err = program(&text, 1, Tier::Full).compile().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("test.cu") && msg.contains("sm_90"), "{msg}");
        assert!(
            msg.contains("-DKERNEL_INDEX=1") && msg.contains("error"),
            "{msg}"
        );
    }

    #[test]
    fn cache_entries_change_with_the_prelude() {
        let original = text();
        let changed = SourceText {
            prelude: format!("{}\n// changed", original.prelude),
            ..text()
        };
        let path = |t: &SourceText| program(t, 0, Tier::Full).cache_entry((13, 0)).path;
        if let Some(a) = path(&original) {
            assert!(a.starts_with(glatrain_fs::cache_dir("kernels").unwrap()));
            assert_ne!(Some(a), path(&changed));
        }
    }
}
