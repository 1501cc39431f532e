//! Helpers for the build scripts of crates that link libtorch.
//!
//! torch-sys (`links = "tch"`) exports the libtorch library directory to the build scripts of
//! crates that depend on it directly, as `DEP_TCH_LIBTORCH_LIB`. Each crate whose binaries or
//! tests touch libtorch calls [`link_libtorch`] from its `build.rs`.

use std::path::PathBuf;

/// The libtorch `lib/` directory that torch-sys linked against.
///
/// # Panics
/// When the calling package does not depend on `torch-sys` directly (the variable is then unset).
pub fn libtorch_lib_dir() -> PathBuf {
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB is unset: add torch-sys to this crate's [dependencies]");
    PathBuf::from(dir)
}

/// Header directories of that libtorch, for compiling C++ against it.
pub fn libtorch_include_dirs() -> Vec<PathBuf> {
    let root = libtorch_lib_dir().join("..");
    vec![
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
    ]
}

/// Emits the link arguments every libtorch-linking binary (and test binary) needs:
///
/// - an rpath to libtorch's `lib/` so the binary runs without `LD_LIBRARY_PATH`, and one to the
///   wheel's NVRTC directory so run-time kernel compilation finds `libnvrtc`;
/// - `libtorch_cuda` linked with `--no-as-needed`: nothing references it by symbol, so the
///   default `--as-needed` would drop it and leave CUDA unavailable at run time.
pub fn link_libtorch() {
    let lib = libtorch_lib_dir();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    for nvrtc_dir in nvrtc_lib_dirs(&lib) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nvrtc_dir.display());
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Emits an rpath to the torch wheel's NVRTC directory, for crates that compile kernels but do
/// not link libtorch (their binaries then find `libnvrtc` without `LD_LIBRARY_PATH`). The wheel
/// is found through the Python that the build environment puts first on `PATH` (the project's
/// venv, as for torch-sys's `LIBTORCH_USE_PYTORCH`); without one nothing is emitted.
pub fn link_nvrtc() {
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output();
    let Some(lib) = output
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    else {
        println!("cargo:warning=no torch wheel found through python3: no rpath to libnvrtc");
        return;
    };
    for nvrtc_dir in nvrtc_lib_dirs(&lib) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nvrtc_dir.display());
    }
}

/// Directories of the pip wheels next to torch that hold `libnvrtc` (`nvidia/cu13/lib` for
/// CUDA 13 wheels, `nvidia/cuda_nvrtc/lib` for CUDA 12 ones).
pub fn nvrtc_lib_dirs(libtorch_lib: &std::path::Path) -> Vec<PathBuf> {
    let site_packages = libtorch_lib.join("../..");
    ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"]
        .iter()
        .map(|d| site_packages.join(d))
        .filter(|d| d.exists())
        .map(|d| d.canonicalize().unwrap_or(d))
        .collect()
}
