//! One GPU as the kernels see it: the primary context (shared with libtorch), its legacy default
//! stream, and the modules, functions and occupancies loaded on it, with the tiered swap from
//! quickly compiled to optimised code.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule, CudaStream};

use crate::compile::{self, Tier, TierPolicy};
use crate::error::catch_library_panic;
use crate::launch::Kernel;
use crate::source::{KernelDtype, KernelSource};
use crate::CudaError;

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

/// Background compiles under way, and a signal when one ends.
static BACKGROUND: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// One background compile of a Full tier, counted while it lives. The process waits for every
/// one at exit: a thread still inside libnvrtc or the driver while their static destructors run
/// could crash a process that has done its work, and the finished CUBINs reach the disk cache.
struct BackgroundCompile;

impl BackgroundCompile {
    fn start() -> Self {
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // Registered after libnvrtc and libcuda were loaded, so it runs before their destructors.
        // SAFETY: registers a function that only waits on a static condition variable.
        AT_EXIT.call_once(|| unsafe {
            atexit(wait_for_background_compiles);
        });
        *BACKGROUND.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        BackgroundCompile
    }
}

impl Drop for BackgroundCompile {
    fn drop(&mut self) {
        *BACKGROUND.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        BACKGROUND.1.notify_all();
    }
}

extern "C" fn wait_for_background_compiles() {
    let mut running = BACKGROUND.0.lock().unwrap_or_else(|e| e.into_inner());
    while *running > 0 {
        running = BACKGROUND
            .1
            .wait(running)
            .unwrap_or_else(|e| e.into_inner());
    }
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

/// A source's modules for one dtype, at the tier they were compiled at.
struct Loaded {
    tier: Tier,
    modules: SourceModules,
    /// Why the background compile of the Full tier failed (the Quick code then stays).
    upgrade_error: Option<String>,
}

/// A kernel: its source, dtype and index in [`KernelSource::kernels`].
type KernelKey = (&'static KernelSource, KernelDtype, usize);

/// One device's context (the primary one, shared with libtorch), its legacy default stream and
/// the modules loaded on it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: usize,
    max_shared_per_block: u32,
    modules: Mutex<HashMap<(&'static KernelSource, KernelDtype), Loaded>>,
    /// Signalled when modules of another tier are put in place (or the background compile of
    /// the Full tier fails).
    upgraded: Condvar,
    /// Modules that another tier's replaced: kept loaded for the process, because kernels
    /// launched from them may still be queued.
    retired: Mutex<Vec<SourceModules>>,
    /// Kernels looked up before, ready to launch with any shared memory the GPU allows: a call
    /// launches without driver lookups or attribute calls ahead of its first kernel.
    functions: Mutex<HashMap<KernelKey, Kernel>>,
    /// Resident blocks per SM of a kernel by (dynamic shared memory, threads).
    occupancy: Mutex<HashMap<(KernelKey, u32, u32), i64>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .finish()
    }
}

impl Gpu {
    /// The device with this ordinal, created on first use and kept for the process.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
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
        let device = Arc::new(Gpu {
            ctx,
            stream,
            arch: format!("sm_{major}{minor}"),
            sm_count,
            max_shared_per_block,
            modules: Mutex::new(HashMap::new()),
            upgraded: Condvar::new(),
            retired: Mutex::new(Vec::new()),
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
    /// gives a block, ready for [`crate::launch!`]. On the first use of a (source, dtype), all of
    /// its kernels are compiled (in parallel, or read from the disk cache) and loaded, so a
    /// training step waits once: for the Quick tier where the Full one is not cached (see
    /// [`TierPolicy`]).
    pub fn kernel(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
        name: &'static str,
    ) -> Result<Kernel, CudaError> {
        let key = Self::key(source, dtype, name)?;
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = functions.get(&key) {
            return Ok(k.clone());
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
        let kernel = Kernel {
            name,
            function: f,
            stream: self.stream.clone(),
            max_dynamic_smem: dynamic.max(0) as u32,
        };
        functions.insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Blocks of the kernel `name` resident per SM with `smem` bytes of dynamic shared memory and
    /// `threads` threads each, with its shared-memory carveout at the maximum (set on the first
    /// query): kernels that size their grids by it want every block the shared memory allows.
    pub fn resident_blocks(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
        name: &'static str,
        smem: u32,
        threads: u32,
    ) -> Result<i64, CudaError> {
        let key = (Self::key(source, dtype, name)?, smem, threads);
        // Held throughout, so that an answer computed for Quick code cannot land in the map
        // after an upgrade has cleared it.
        let mut occupancy = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = occupancy.get(&key) {
            return Ok(*n);
        }
        use cudarc::driver::sys::CUfunction_attribute as Attr;
        let f = self.kernel(source, dtype, name)?.function;
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .map_err(|e| CudaError::driver("cuFuncSetAttribute", e))?;
        let blocks = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .map_err(|e| CudaError::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor", e))?;
        let blocks = i64::from(blocks).max(1);
        occupancy.insert(key, blocks);
        Ok(blocks)
    }

    fn key(
        source: &'static KernelSource,
        dtype: KernelDtype,
        name: &str,
    ) -> Result<KernelKey, CudaError> {
        Ok((source, dtype, source.index_of(name)?))
    }

    /// Compiles (or reads from the disk cache) and loads every kernel of `source` for `dtype`,
    /// unless that was done already: a later first call then does not wait for NVRTC. Binds the
    /// context to the calling thread.
    pub fn prepare(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
    ) -> Result<(), CudaError> {
        self.bind()?;
        self.with_modules(source, dtype, |_| ())
    }

    /// Like [`Gpu::prepare`], then waits until the modules are at the policy's final tier
    /// (Full unless `GLATRAIN_KERNEL_TIER=quick`): what timings need.
    pub fn prepare_final(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
    ) -> Result<(), CudaError> {
        self.prepare(source, dtype)?;
        let wanted = TierPolicy::from_env()?.final_tier();
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let loaded = modules
                .get(&(source, dtype))
                .expect("prepare loaded the modules");
            if loaded.tier == wanted {
                return Ok(());
            }
            if let Some(error) = &loaded.upgrade_error {
                return Err(CudaError::Library(error.clone()));
            }
            modules = self
                .upgraded
                .wait(modules)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The tier of the loaded modules of (source, dtype), None before their first use.
    pub fn loaded_tier(&self, source: &'static KernelSource, dtype: KernelDtype) -> Option<Tier> {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.get(&(source, dtype)).map(|loaded| loaded.tier)
    }

    /// `f` of the loaded modules of (source, dtype), compiled and loaded first if need be (under
    /// the lock: a concurrent first use waits for the one compilation). Under the tiered policy
    /// without a cached Full tier, the Quick tier is compiled here and the Full one on a
    /// background thread that swaps it in when done.
    fn with_modules<T>(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
        f: impl FnOnce(&SourceModules) -> T,
    ) -> Result<T, CudaError> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(loaded) = modules.get(&(source, dtype)) {
            return Ok(f(&loaded.modules));
        }
        let policy = TierPolicy::from_env()?;
        let cached_full = match policy {
            TierPolicy::Tiered => compile::cached_cubins(source, dtype, &self.arch, Tier::Full)?,
            TierPolicy::Only(_) => None,
        };
        let (tier, cubins) = match (policy, cached_full) {
            (_, Some(cubins)) => (Tier::Full, cubins),
            (TierPolicy::Only(tier), None) => {
                (tier, compile::cubins(source, dtype, &self.arch, tier)?)
            }
            (TierPolicy::Tiered, None) => {
                let ordinal = self.ctx.ordinal();
                let running = BackgroundCompile::start();
                std::thread::spawn(move || {
                    if let Ok(device) = Gpu::get(ordinal) {
                        device.upgrade(source, dtype);
                    }
                    drop(running);
                });
                (
                    Tier::Quick,
                    compile::cubins(source, dtype, &self.arch, Tier::Quick)?,
                )
            }
        };
        let loaded = Loaded {
            tier,
            modules: self.load(cubins)?,
            upgrade_error: None,
        };
        Ok(f(&modules.entry((source, dtype)).or_insert(loaded).modules))
    }

    fn load(&self, cubins: Vec<Vec<u8>>) -> Result<SourceModules, CudaError> {
        cubins
            .into_iter()
            .map(|cubin| {
                self.ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                    .map_err(|e| CudaError::driver("cuModuleLoadData", e))
            })
            .collect()
    }

    /// Loads `tier`'s kernels of (source, dtype), from the disk cache or compiled, in place of
    /// whatever is loaded: later lookups get them (and their own occupancy). The tiered policy's
    /// background compile does this with Full; tests switch back and forth to compare the tiers.
    pub fn use_tier(
        &self,
        source: &'static KernelSource,
        dtype: KernelDtype,
        tier: Tier,
    ) -> Result<(), CudaError> {
        self.bind()?;
        let new = self.load(compile::cubins(source, dtype, &self.arch, tier)?)?;
        let loaded = Loaded {
            tier,
            modules: new,
            upgrade_error: None,
        };
        let old = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((source, dtype), loaded);
        if let Some(old) = old {
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(old.modules);
        }
        // After the swap and outside the modules lock (`function` takes the functions lock
        // first): an entry made from the old modules is in the map by now.
        let ours = |k: &KernelKey| k.0 == source && k.1 == dtype;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !ours(k));
        self.occupancy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _, _), _| !ours(k));
        self.upgraded.notify_all();
        Ok(())
    }

    /// The tiered policy's background compile: the Full tier in place of the Quick one. A
    /// failure leaves the Quick modules, is reported once, and ends [`Gpu::prepare_final`]'s
    /// wait.
    fn upgrade(&self, source: &'static KernelSource, dtype: KernelDtype) {
        let Err(e) = self.use_tier(source, dtype, Tier::Full) else {
            return;
        };
        eprintln!(
            "glatrain: warning: the optimised {} kernels ({}) did not compile; the quick ones \
             stay: {e}",
            source.file,
            dtype.suffix()
        );
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(loaded) = modules.get_mut(&(source, dtype)) {
            loaded.upgrade_error = Some(e.to_string());
        }
        drop(modules);
        self.upgraded.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_waits_for_background_compiles() {
        let running = BackgroundCompile::start();
        let done = Arc::new(Mutex::new(false));
        let compile = {
            let done = done.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                *done.lock().unwrap() = true;
                drop(running);
            })
        };
        wait_for_background_compiles();
        assert!(*done.lock().unwrap());
        compile.join().unwrap();
    }
}
