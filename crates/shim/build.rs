//! Links libtorch (CUDA kept) and compiles the C++ shim against its headers: the autograd and
//! tensor helpers, and the c10d process groups (Gloo and NCCL).

use std::path::{Path, PathBuf};

/// CUDA header directories that c10d's `ProcessGroupNCCL.hpp` needs, each with a file it must
/// hold and the pip wheel that ships it (scripts/env.sh installs those wheels into the venv).
const NCCL_HEADERS: [(&str, &str, &str); 4] = [
    (
        "nvidia/cu13/include",
        "cuda_runtime_api.h",
        "nvidia-cuda-runtime",
    ),
    (
        "nvidia/cu13/include",
        "crt/host_config.h",
        "nvidia-cuda-crt",
    ),
    ("nvidia/cu13/include/cccl", "nv/target", "nvidia-cuda-cccl"),
    ("nvidia/nccl/include", "nccl.h", "nvidia-nccl-cu13"),
];

/// The include directories of [`NCCL_HEADERS`] in the torch wheel's `site-packages`; panics with
/// the missing wheel's name when one is absent (a build cannot go on without it).
fn nccl_include_dirs(site_packages: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (dir, file, wheel) in NCCL_HEADERS {
        let dir = site_packages.join(dir);
        if !dir.join(file).exists() {
            panic!(
                "{} is missing: the shim's NCCL process group needs the CUDA headers of the pip \
                 wheel {wheel} next to torch; `source scripts/env.sh` installs it into the venv",
                dir.join(file).display()
            );
        }
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// A C++ build against libtorch's headers.
fn libtorch_build() -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers are noisy under -Wall; the shim's own code is small and reviewed.
        .warnings(false);
    for dir in glatrain_build::libtorch_include_dirs() {
        build.include(dir);
    }
    build
}

fn main() {
    glatrain_build::link_libtorch();

    println!("cargo:rerun-if-changed=csrc");
    let mut shim = libtorch_build();
    shim.file("csrc/shim.cpp");
    // The c10d backends' headers declare their classes only under these macros, and NCCL's
    // needs CUDA's headers: the process groups compile apart from the rest.
    let mut groups = libtorch_build();
    groups
        .file("csrc/process_group.cpp")
        // The wheel lacks gloo's headers: csrc/gloo-decls declares the few gloo names that
        // ProcessGroupGloo.hpp mentions.
        .define("USE_C10D_GLOO", None)
        .include("csrc/gloo-decls")
        .define("USE_C10D_NCCL", None)
        .define("USE_CUDA", None);
    let lib = glatrain_build::libtorch_lib_dir();
    let site_packages = lib.join("../..");
    for dir in nccl_include_dirs(&site_packages.canonicalize().unwrap_or(site_packages)) {
        groups.include(dir);
    }
    shim.compile("glatrain_shim");
    groups.compile("glatrain_process_group");
    // The shim calls into libtorch's C++ API: name those libraries after it on the link line.
    println!("cargo:rustc-link-search=native={}", lib.display());
    for name in ["torch_cuda", "c10_cuda", "torch_cpu", "c10", "stdc++"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
}
