//! What the trainer reports about the machine: the GPU's name (for the MFU peak table) and the
//! memory the run holds.

use glatrain_shim::memory::MemoryStats;
use tch::Device;

/// The CUDA driver's name for the device (e.g. "NVIDIA H100 80GB HBM3"); `None` on CPU or when
/// the driver cannot be queried.
pub fn gpu_name(device: Device) -> Option<String> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    if !tch::Cuda::is_available() {
        return None;
    }
    let dev = glatrain_cuda::Gpu::get(ordinal).ok()?;
    dev.properties().ok().map(|p| p.name)
}

/// What the run holds in memory, in bytes: on a GPU, libtorch's caching allocator's counters
/// (held by tensors, reserved from the driver, and their peaks since the run started) and the
/// device memory in use (reserved plus the CUDA context and libraries); on the CPU, the process's
/// resident set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryReading {
    Gpu {
        allocator: MemoryStats,
        /// Total minus free, as the driver reports it.
        device_used: u64,
    },
    Cpu {
        rss: u64,
    },
}

impl MemoryReading {
    /// The metrics' scalars of this reading.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        match *self {
            MemoryReading::Gpu {
                allocator: a,
                device_used,
            } => vec![
                ("memory/allocated_bytes", a.allocated as f64),
                ("memory/peak_allocated_bytes", a.peak_allocated as f64),
                ("memory/reserved_bytes", a.reserved as f64),
                ("memory/peak_reserved_bytes", a.peak_reserved as f64),
                ("memory/gpu_used_bytes", device_used as f64),
            ],
            MemoryReading::Cpu { rss } => vec![("memory/rss_bytes", rss as f64)],
        }
    }

    /// The largest the run has held: the allocator's peak on a GPU, the resident set on a CPU.
    pub fn peak(&self) -> u64 {
        match *self {
            MemoryReading::Gpu { allocator, .. } => allocator.peak_allocated,
            MemoryReading::Cpu { rss } => rss,
        }
    }

    /// For the progress line, e.g. `mem 22.1 GB peak (27.0 reserved)`.
    pub fn describe(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        match *self {
            MemoryReading::Gpu { allocator: a, .. } => format!(
                "mem {:.1} GB peak ({:.1} reserved)",
                gb(a.peak_allocated),
                gb(a.peak_reserved)
            ),
            MemoryReading::Cpu { rss } => format!("mem {:.1} GB", gb(rss)),
        }
    }
}

/// The run's memory now on `device`; `None` when it cannot be read.
pub fn memory(device: Device) -> Option<MemoryReading> {
    match device {
        Device::Cuda(ordinal) if tch::Cuda::is_available() => {
            let allocator = glatrain_shim::memory::stats(ordinal).ok()?;
            let dev = glatrain_cuda::Gpu::get(ordinal).ok()?;
            dev.bind().ok()?;
            let (free, total) = dev.context().mem_get_info().ok()?;
            Some(MemoryReading::Gpu {
                allocator,
                device_used: (total - free) as u64,
            })
        }
        _ => process_rss().map(|rss| MemoryReading::Cpu { rss }),
    }
}

/// Resident set size from the `VmRSS` line of `/proc/self/status` (in kB); `None` off Linux.
pub fn process_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_plausible() {
        let rss = process_rss().expect("/proc/self/statm on Linux");
        // A test binary linking libtorch has at least a few MB resident and less than 64 GB.
        assert!(rss > 4 << 20 && rss < 64 << 30, "{rss}");
        let m = memory(Device::Cpu).unwrap();
        assert_eq!(m.scalars()[0].0, "memory/rss_bytes");
        assert!(m.describe().starts_with("mem "));
    }

    #[test]
    fn no_gpu_name_on_cpu() {
        assert_eq!(gpu_name(Device::Cpu), None);
    }

    #[test]
    fn gpu_reading_on_cuda() {
        if glatrain_testing::cuda_or_skip().is_none() {
            return;
        }
        let name = gpu_name(Device::Cuda(0)).expect("driver name");
        assert!(!name.is_empty());
        let m = memory(Device::Cuda(0)).unwrap();
        let names: Vec<&str> = m.scalars().iter().map(|s| s.0).collect();
        assert!(names.contains(&"memory/peak_allocated_bytes"), "{names:?}");
        assert!(m.describe().contains("reserved"));
    }
}
