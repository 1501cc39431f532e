//! Launching a kernel: its geometry checked against CUDA's limits first, so a shape a kernel
//! cannot take is an error that names the limit, never a failed or silently truncated launch.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use crate::CudaError;

/// Largest grid x dimension.
pub const MAX_GRID_X: i64 = (1 << 31) - 1;
/// Largest grid y and z dimensions.
pub const MAX_GRID_YZ: i64 = 65_535;
/// Most threads in a block.
pub const MAX_THREADS: u32 = 1024;

/// A loaded kernel ([`crate::Gpu::kernel`]): its function, the stream it launches on and the
/// dynamic shared memory it may use.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The entry point's name without the dtype suffix (for errors).
    pub name: &'static str,
    /// The CUDA function.
    pub function: CudaFunction,
    /// The legacy default stream (libtorch's).
    pub stream: Arc<CudaStream>,
    /// The most dynamic shared memory a block of it may have, bytes.
    pub max_dynamic_smem: u32,
}

impl Kernel {
    /// The launch configuration for `grid` blocks of `threads` threads with `smem` bytes of
    /// dynamic shared memory each, or an error naming the kernel and the limit it exceeds.
    pub fn config(
        &self,
        grid: (i64, i64, i64),
        threads: u32,
        smem: u32,
    ) -> Result<LaunchConfig, CudaError> {
        geometry(self.name, grid, threads, smem, self.max_dynamic_smem)
    }
}

/// [`Kernel::config`] for a kernel `name` allowed `max_smem` bytes of dynamic shared memory.
fn geometry(
    name: &str,
    (x, y, z): (i64, i64, i64),
    threads: u32,
    smem: u32,
    max_smem: u32,
) -> Result<LaunchConfig, CudaError> {
    let limit = |what: String| CudaError::Limit {
        kernel: name.to_string(),
        what,
    };
    for (axis, n, max) in [
        ("x", x, MAX_GRID_X),
        ("y", y, MAX_GRID_YZ),
        ("z", z, MAX_GRID_YZ),
    ] {
        if !(1..=max).contains(&n) {
            return Err(limit(format!(
                "grid {axis} = {n} blocks, outside the 1..={max} CUDA allows"
            )));
        }
    }
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(limit(format!(
            "{threads} threads per block, outside the 1..={MAX_THREADS} CUDA allows"
        )));
    }
    if smem > max_smem {
        return Err(limit(format!(
            "{smem} bytes of dynamic shared memory per block, more than the {max_smem} this GPU \
             gives it"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    })
}

/// Launches `kernel` (a [`Kernel`]) on its stream with `grid` (x, y, z as i64), `threads` per
/// block and `smem` bytes of dynamic shared memory, passing the named locals as arguments;
/// evaluates to `Result<(), CudaError>`. The geometry is checked first ([`Kernel::config`]).
///
/// The caller guarantees what makes the launch sound: the arguments match the kernel's
/// signature in order and type (device addresses as `u64` of live buffers of the shapes the
/// kernel indexes, then `i32` sizes, `f32` scalars, `i32` flags), and the buffers outlive the
/// kernel (libtorch orders any reuse of its memory after work queued on the same stream).
#[macro_export]
macro_rules! launch {
    ($kernel:expr, $grid:expr, $threads:expr, $smem:expr; $($arg:ident),* $(,)?) => {{
        let kernel: &$crate::launch::Kernel = &$kernel;
        match kernel.config($grid, $threads, $smem) {
            Err(e) => Err(e),
            Ok(config) => {
                #[allow(unused_imports)]
                use $crate::cudarc::driver::PushKernelArg;
                let mut builder = kernel.stream.launch_builder(&kernel.function);
                $( builder.arg(&$arg); )*
                // SAFETY: the caller's contract above (arguments match the signature, buffers
                // outlive the launch); the configuration was checked against CUDA's limits.
                unsafe { builder.launch(config) }
                    .map(|_| ())
                    .map_err(|e| $crate::CudaError::Driver {
                        what: format!("cuLaunchKernel({})", kernel.name),
                        message: format!("{e:?}"),
                    })
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_named_before_a_launch() {
        let fits = |grid, threads, smem| geometry("k", grid, threads, smem, 1000);
        let c = fits(((1 << 31) - 1, 65_535, 65_535), 1024, 1000).unwrap();
        assert_eq!(c.grid_dim, (u32::MAX >> 1, 65_535, 65_535));
        for (grid, threads, smem, words) in [
            ((1 << 31, 1, 1), 128, 0, "grid x = 2147483648"),
            ((1, 65_536, 1), 128, 0, "grid y = 65536"),
            ((1, 1, 0), 128, 0, "grid z = 0"),
            ((1, 1, 1), 1025, 0, "1025 threads"),
            ((1, 1, 1), 128, 1001, "1001 bytes"),
        ] {
            let msg = fits(grid, threads, smem).unwrap_err().to_string();
            assert!(msg.starts_with("k: ") && msg.contains(words), "{msg}");
        }
    }
}
