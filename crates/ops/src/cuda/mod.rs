//! CUDA side of the ops: kernel sources compiled at run time by NVRTC, cached on disk, loaded
//! once per process and device, and launched on the legacy default stream that libtorch uses.
//!
//! - [`compile`]: the embedded sources (overridable from disk with `GLATRAIN_KERNEL_DIR`), NVRTC
//!   compilation to CUBIN for the device's architecture, and the on-disk cache.
//! - [`gla`]: the GLA launchers (forward and backward for each schedule) over tch tensors.
//!
//! libtorch and cudarc share the device's primary context, and both launch on the legacy default
//! stream, so kernels here are ordered with libtorch's ops without any synchronisation.

pub mod compile;
pub mod gla;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

pub use compile::{KernelDtype, KernelSource};

/// Why a CUDA kernel could not be compiled, loaded or launched.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {source_name} for {arch} ({options}):\n{log}")]
    Compile {
        /// The kernel source (file name under kernels/).
        source_name: String,
        /// Target architecture, e.g. `sm_90`.
        arch: String,
        /// The options passed to NVRTC.
        options: String,
        /// NVRTC's log.
        log: String,
    },
    /// libnvrtc or libcuda could not be loaded, or an NVRTC call other than compilation failed.
    #[error("NVRTC/CUDA library unavailable or failing: {0}")]
    Library(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {message}")]
    Driver {
        /// The operation that failed.
        what: String,
        /// The driver's error.
        message: String,
    },
    /// A kernel source override could not be read.
    #[error("GLATRAIN_KERNEL_DIR={dir}: cannot read {file}: {message}")]
    Override {
        /// The directory in `GLATRAIN_KERNEL_DIR`.
        dir: String,
        /// The file looked for.
        file: String,
        /// The I/O error.
        message: String,
    },
    /// A libtorch operation inside a launcher failed.
    #[error("libtorch error in a CUDA launcher: {0}")]
    Torch(#[from] tch::TchError),
}

impl CudaError {
    /// CUDA failures are never the user's input: the CLI exits 1.
    pub fn is_bad_input(&self) -> bool {
        false
    }

    fn driver(what: &str, err: impl std::fmt::Debug) -> Self {
        Self::Driver {
            what: what.to_string(),
            message: format!("{err:?}"),
        }
    }
}

/// Runs a cudarc call that may panic when a shared library is missing (its dynamic loading
/// panics), turning the panic into [`CudaError::Library`].
fn catch_library_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        CudaError::Library(format!("{what}: {message}"))
    })
}

/// A GPU's name, multiprocessor count and memory, read from the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProperties {
    pub name: String,
    pub sm_count: usize,
    pub memory_bytes: u64,
}

/// The loaded modules of one source and dtype: one per kernel, in [`KernelSource::kernels`] order.
type SourceModules = Vec<Arc<CudaModule>>;

/// A kernel: its source, dtype and index in [`KernelSource::kernels`].
type KernelKey = (KernelSource, KernelDtype, usize);

/// One device's context (the primary one, shared with libtorch), its legacy default stream and
/// the modules loaded on it.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: usize,
    max_shared_per_block: u32,
    modules: Mutex<HashMap<(KernelSource, KernelDtype), SourceModules>>,
    /// Kernels looked up before, ready to launch with any shared memory the GPU allows: a call
    /// launches without driver lookups or attribute calls ahead of its first kernel.
    functions: Mutex<HashMap<KernelKey, CudaFunction>>,
    /// Resident blocks per SM of a kernel by (dynamic shared memory, threads).
    occupancy: Mutex<HashMap<(KernelKey, u32, u32), i64>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

impl Device {
    /// The device with this ordinal, created on first use and kept for the process.
    pub fn get(ordinal: usize) -> Result<Arc<Device>, CudaError> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let ctx = catch_library_panic("loading libcuda", || CudaContext::new(ordinal))?
            .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        let stream = ctx.default_stream();
        use cudarc::driver::sys::CUdevice_attribute as Attr;
        let attribute = |a| {
            ctx.attribute(a)
                .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))
        };
        let sm_count = attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
        let max_shared_per_block =
            attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u32;
        let device = Arc::new(Device {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            sm_count,
            max_shared_per_block,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            occupancy: Mutex::new(HashMap::new()),
        });
        map.insert(ordinal, device.clone());
        Ok(device)
    }

    /// The NVRTC architecture name of this device, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The number of streaming multiprocessors (launchers size grids by it).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub fn max_shared_per_block(&self) -> u32 {
        self.max_shared_per_block
    }

    /// The legacy default stream (the one libtorch launches on unless told otherwise).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context (shared with libtorch).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// What the preflight needs to know about the GPU: its name, multiprocessor count and
    /// memory.
    pub fn properties(&self) -> Result<DeviceProperties, CudaError> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        let name = self
            .ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        let sm_count = self
            .ctx
            .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        let memory_bytes = self
            .ctx
            .total_mem()
            .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?;
        Ok(DeviceProperties {
            name,
            sm_count: sm_count.max(0) as usize,
            memory_bytes: memory_bytes as u64,
        })
    }

    /// Binds the context to the calling thread (autograd's backward runs on its own thread).
    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))
    }

    /// The kernel `name` of `source` for `dtype`, allowed all the dynamic shared memory the GPU
    /// gives a block. On the first use of a (source, dtype), all of its kernels are compiled (in
    /// parallel, or read from the disk cache) and loaded, so a training step waits once.
    pub fn function(
        &self,
        source: KernelSource,
        dtype: KernelDtype,
        name: &str,
    ) -> Result<CudaFunction, CudaError> {
        let key = Self::key(source, dtype, name)?;
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(&key) {
            return Ok(f.clone());
        }
        let module = self.with_modules(source, dtype, |m| m[key.2].clone())?;
        let full = format!("{name}_{}", dtype.suffix());
        let f = module
            .load_function(&full)
            .map_err(|e| CudaError::driver(&format!("cuModuleGetFunction({full})"), e))?;
        use cudarc::driver::sys::CUfunction_attribute as Attr;
        let attribute_error = |e| CudaError::driver(&format!("cuFuncSetAttribute({full})"), e);
        let fixed = f
            .get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map_err(attribute_error)?;
        let dynamic = self.max_shared_per_block as i32 - fixed;
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic,
        )
        .map_err(attribute_error)?;
        functions.insert(key, f.clone());
        Ok(f)
    }

    /// Blocks of the kernel `name` resident per SM with `smem` bytes of dynamic shared memory and
    /// `threads` threads each, with its shared-memory carveout at the maximum (set on the first
    /// query): kernels that size their grids by it want every block the shared memory allows.
    pub fn resident_blocks(
        &self,
        source: KernelSource,
        dtype: KernelDtype,
        name: &str,
        smem: u32,
        threads: u32,
    ) -> Result<i64, CudaError> {
        let key = (Self::key(source, dtype, name)?, smem, threads);
        if let Some(n) = self
            .occupancy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(*n);
        }
        use cudarc::driver::sys::CUfunction_attribute as Attr;
        let f = self.function(source, dtype, name)?;
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .map_err(|e| CudaError::driver("cuFuncSetAttribute", e))?;
        let blocks = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .map_err(|e| CudaError::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
        let blocks = i64::from(blocks).max(1);
        let mut occupancy = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        occupancy.insert(key, blocks);
        Ok(blocks)
    }

    fn key(source: KernelSource, dtype: KernelDtype, name: &str) -> Result<KernelKey, CudaError> {
        let index = source
            .kernels()
            .iter()
            .position(|k| *k == name)
            .ok_or_else(|| {
                CudaError::Library(format!("{} has no kernel {name}", source.file_name()))
            })?;
        Ok((source, dtype, index))
    }

    /// Compiles (or reads from the disk cache) and loads every kernel of `source` for `dtype`,
    /// unless that was done already: a later first call then does not wait for NVRTC. Binds the
    /// context to the calling thread.
    pub fn prepare(&self, source: KernelSource, dtype: KernelDtype) -> Result<(), CudaError> {
        self.bind()?;
        self.with_modules(source, dtype, |_| ())
    }

    /// `f` of the loaded modules of (source, dtype), compiled and loaded first if need be (under
    /// the lock: a concurrent first use waits for the one compilation).
    fn with_modules<T>(
        &self,
        source: KernelSource,
        dtype: KernelDtype,
        f: impl FnOnce(&SourceModules) -> T,
    ) -> Result<T, CudaError> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&(source, dtype)) {
            return Ok(f(m));
        }
        let loaded = compile::cubins(source, dtype, &self.arch)?
            .into_iter()
            .map(|cubin| {
                self.ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                    .map_err(|e| CudaError::driver("cuModuleLoadData", e))
            })
            .collect::<Result<SourceModules, _>>()?;
        Ok(f(modules.entry((source, dtype)).or_insert(loaded)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_panics_become_errors() {
        let err = catch_library_panic("loading libfoo", || panic!("no libfoo.so")).unwrap_err();
        assert!(matches!(err, CudaError::Library(_)));
        assert!(
            err.to_string().contains("loading libfoo: no libfoo.so"),
            "{err}"
        );
        assert!(!err.is_bad_input());
        assert_eq!(catch_library_panic("x", || 7).unwrap(), 7);
    }
}
