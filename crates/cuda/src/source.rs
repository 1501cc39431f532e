//! Kernel sources: the `.cu` files under `kernels/`, their entry points and dtypes.

use std::path::PathBuf;

use crate::CudaError;

/// A kernel source file under `kernels/`, as an op declares it (a `static`).
///
/// Each entry point is compiled as its own NVRTC program (`-DKERNEL_INDEX=<index in kernels>`)
/// for each dtype (`-DKERNEL_DTYPE_<DTYPE>`), so a source's kernels compile in parallel and a
/// first call waits for the slowest one, not for all of them. Every source includes the prelude
/// [`PRELUDE`] (`kernels/common.cuh`).
#[derive(Debug)]
pub struct KernelSource {
    /// The file name under `kernels/`, e.g. `gla.cu`; identifies the source.
    pub file: &'static str,
    /// The file's text as compiled into the binary (`include_str!`).
    pub embedded: &'static str,
    /// Entry points in the order of their `KERNEL_INDEX` (names without the dtype suffix).
    pub kernels: &'static [&'static str],
    /// The input dtypes the source is instantiated for.
    pub dtypes: &'static [KernelDtype],
}

/// The prelude every kernel source includes: `kernels/common.cuh`.
pub static PRELUDE: Header = Header {
    file: "common.cuh",
    embedded: include_str!("../../../kernels/common.cuh"),
};

/// A header the kernel sources include by name.
#[derive(Debug)]
pub struct Header {
    /// The file name under `kernels/`, as the sources `#include` it.
    pub file: &'static str,
    /// The file's text as compiled into the binary.
    pub embedded: &'static str,
}

/// The text of a file under `kernels/`: `$GLATRAIN_KERNEL_DIR/<file>` when that variable is set
/// (kernel work without a Rust rebuild), else the embedded copy.
fn text_of(file: &str, embedded: &'static str) -> Result<String, CudaError> {
    match std::env::var_os("GLATRAIN_KERNEL_DIR") {
        Some(dir) => {
            let path = PathBuf::from(&dir).join(file);
            std::fs::read_to_string(&path).map_err(|e| CudaError::Override {
                dir: dir.to_string_lossy().into_owned(),
                file: file.to_string(),
                message: e.to_string(),
            })
        }
        None => Ok(embedded.to_string()),
    }
}

impl Header {
    /// The header's text (see [`KernelSource::text`]).
    pub fn text(&self) -> Result<String, CudaError> {
        text_of(self.file, self.embedded)
    }
}

impl KernelSource {
    /// The source text: `$GLATRAIN_KERNEL_DIR/<file>` when that variable is set, else embedded.
    pub fn text(&self) -> Result<String, CudaError> {
        text_of(self.file, self.embedded)
    }

    /// The index of entry point `name`.
    pub fn index_of(&self, name: &str) -> Result<usize, CudaError> {
        self.kernels
            .iter()
            .position(|k| *k == name)
            .ok_or_else(|| CudaError::Library(format!("{} has no kernel {name}", self.file)))
    }
}

impl PartialEq for KernelSource {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for KernelSource {}

impl std::hash::Hash for KernelSource {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.file.hash(state);
    }
}

/// The element type a kernel program is instantiated for (one program per dtype).
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
    /// Every dtype.
    pub const ALL: [KernelDtype; 3] = [KernelDtype::F32, KernelDtype::Bf16, KernelDtype::F16];

    /// The suffix of entry-point names (`gla_chunk_fwd_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// The define that selects this dtype in `kernels/common.cuh`.
    pub(crate) fn define(self) -> &'static str {
        match self {
            Self::F32 => "-DKERNEL_DTYPE_F32",
            Self::Bf16 => "-DKERNEL_DTYPE_BF16",
            Self::F16 => "-DKERNEL_DTYPE_F16",
        }
    }
}
