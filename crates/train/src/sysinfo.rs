//! What the trainer reports about the machine: the GPU's name (for the MFU peak table) and the
//! memory in use (CUDA device memory in use on GPU, the process's resident set on CPU).

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

/// A memory reading: which quantity and its value in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReading {
    /// Metric tag: `memory/gpu_used_bytes` or `memory/rss_bytes`.
    pub tag: &'static str,
    pub bytes: u64,
}

/// Device memory in use (total minus free, which includes libtorch's cached blocks) on a GPU;
/// the process's resident set size on CPU. `None` when neither can be read.
pub fn memory(device: Device) -> Option<MemoryReading> {
    match device {
        Device::Cuda(ordinal) if tch::Cuda::is_available() => {
            let dev = glatrain_cuda::Gpu::get(ordinal).ok()?;
            dev.bind().ok()?;
            let (free, total) = dev.context().mem_get_info().ok()?;
            Some(MemoryReading {
                tag: "memory/gpu_used_bytes",
                bytes: (total - free) as u64,
            })
        }
        _ => process_rss().map(|bytes| MemoryReading {
            tag: "memory/rss_bytes",
            bytes,
        }),
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
        assert_eq!(m.tag, "memory/rss_bytes");
    }

    #[test]
    fn no_gpu_name_on_cpu() {
        assert_eq!(gpu_name(Device::Cpu), None);
    }

    #[test]
    fn gpu_reading_on_cuda() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let name = gpu_name(Device::Cuda(0)).expect("driver name");
        assert!(!name.is_empty());
        let m = memory(Device::Cuda(0)).unwrap();
        assert_eq!(m.tag, "memory/gpu_used_bytes");
        assert!(m.bytes > 0);
    }
}
