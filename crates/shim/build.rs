//! Links libtorch (CUDA kept) and compiles the C++ autograd shim against its headers.

fn main() {
    glatrain_build::link_libtorch();

    println!("cargo:rerun-if-changed=csrc");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/process_group.cpp")
        // ProcessGroupGloo.hpp declares its class only with this set; the wheel lacks gloo's
        // headers, so csrc/gloo-decls declares the few gloo names that header mentions.
        .define("USE_C10D_GLOO", None)
        .include("csrc/gloo-decls")
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's headers are noisy under -Wall; the shim's own code is small and reviewed.
        .warnings(false);
    for dir in glatrain_build::libtorch_include_dirs() {
        build.include(dir);
    }
    build.compile("glatrain_shim");
    // The shim calls into libtorch's C++ API: name those libraries after it on the link line.
    let lib = glatrain_build::libtorch_lib_dir();
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}
