//! What the preflight knows about the machine: a few numbers per device, from a table of known
//! GPUs (measured where we measured, datasheet otherwise) or scaled from the SM count.

use serde::{Deserialize, Serialize};

const GIB: u64 = 1 << 30;

/// CPU or CUDA GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// "cpu" or "cuda".
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// The device numbers the rules and the roofline estimates use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// As the driver reports it ("NVIDIA H100 80GB HBM3"); keys the measured-mode cache.
    pub name: String,
    pub kind: DeviceKind,
    /// Streaming multiprocessors (CUDA) or cores (CPU): what a kernel grid has to fill.
    pub sm_count: usize,
    /// Memory a run may use (device memory, or system memory on CPU); 0 = unknown, which skips
    /// the out-of-memory check.
    pub memory_bytes: u64,
    /// Bandwidth a device-to-device copy reaches (not the datasheet number).
    pub mem_bandwidth_bytes_per_s: f64,
    /// Dense bf16/fp16 tensor-core FLOP/s a large matmul reaches (equal to
    /// `peak_fp32_flops` where there are no tensor cores).
    pub peak_tensor_flops: f64,
    /// Scalar fp32 FLOP/s (FMA = 2 FLOPs), no tensor cores.
    pub peak_fp32_flops: f64,
}

impl DeviceProfile {
    /// H100 SXM 80 GB. Copy bandwidth 3.0e12 B/s and bf16 matmul 790e12 FLOP/s were measured on
    /// the project's H100 (2026-11-25; datasheet: 3.35e12 and 989e12).
    pub fn h100_sxm() -> Self {
        Self {
            name: "NVIDIA H100 80GB HBM3".into(),
            kind: DeviceKind::Cuda,
            sm_count: 132,
            memory_bytes: 80 * GIB,
            mem_bandwidth_bytes_per_s: 3.0e12,
            peak_tensor_flops: 790e12,
            peak_fp32_flops: 67e12,
        }
    }

    /// H200 SXM 141 GB: the H100's compute with more and faster memory (4.3e12 B/s assumed
    /// for a copy, 4.8e12 datasheet).
    pub fn h200() -> Self {
        Self {
            name: "NVIDIA H200".into(),
            kind: DeviceKind::Cuda,
            sm_count: 132,
            memory_bytes: 141 * GIB,
            mem_bandwidth_bytes_per_s: 4.3e12,
            peak_tensor_flops: 790e12,
            peak_fp32_flops: 67e12,
        }
    }

    /// A100 SXM 80 GB (datasheet tensor peak 312e12, copy bandwidth ~2.0e12 B/s).
    pub fn a100_80gb() -> Self {
        Self {
            name: "NVIDIA A100-SXM4-80GB".into(),
            kind: DeviceKind::Cuda,
            sm_count: 108,
            memory_bytes: 80 * GIB,
            mem_bandwidth_bytes_per_s: 2.0e12,
            peak_tensor_flops: 312e12,
            peak_fp32_flops: 19.5e12,
        }
    }

    /// An unknown GPU, from what the caller reads off the device. Rates are the A100's per SM
    /// times `sm_count` (a guess: the rules use only the SM count and the memory; the time
    /// estimates are marked as estimates).
    pub fn generic_cuda(name: &str, sm_count: usize, memory_bytes: u64) -> Self {
        let a100 = Self::a100_80gb();
        let per_sm = sm_count as f64 / a100.sm_count as f64;
        Self {
            name: name.to_owned(),
            kind: DeviceKind::Cuda,
            sm_count,
            memory_bytes,
            mem_bandwidth_bytes_per_s: a100.mem_bandwidth_bytes_per_s * per_sm,
            peak_tensor_flops: a100.peak_tensor_flops * per_sm,
            peak_fp32_flops: a100.peak_fp32_flops * per_sm,
        }
    }

    /// The profile for a CUDA device as the driver describes it: a known GPU's rates when the
    /// name matches one (H200, H100, A100), else [`Self::generic_cuda`]; the name, SM count and
    /// memory are always the device's own.
    pub fn from_cuda_device(name: &str, sm_count: usize, memory_bytes: u64) -> Self {
        let known = if name.contains("H200") {
            Some(Self::h200())
        } else if name.contains("H100") {
            Some(Self::h100_sxm())
        } else if name.contains("A100") {
            Some(Self::a100_80gb())
        } else {
            None
        };
        match known {
            Some(profile) => Self {
                name: name.to_owned(),
                sm_count,
                memory_bytes,
                ..profile
            },
            None => Self::generic_cuda(name, sm_count, memory_bytes),
        }
    }

    /// This machine's CPU: cores from the OS, memory from `/proc/meminfo` (0 = unknown where
    /// that file is missing), and modest per-core rates (~20 GB/s memory, 32 GFLOP/s per core;
    /// no tensor cores). The reference ops are the only ones on CPU, so only the estimates use
    /// the rates.
    pub fn cpu() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total_bytes(&text))
            .unwrap_or(0);
        let flops = 32e9 * cores as f64;
        Self {
            name: "CPU".into(),
            kind: DeviceKind::Cpu,
            sm_count: cores,
            memory_bytes,
            mem_bandwidth_bytes_per_s: 20e9,
            peak_tensor_flops: flops,
            peak_fp32_flops: flops,
        }
    }

    /// The same profile with another memory size (e.g. the free memory read off the device).
    pub fn with_memory_bytes(self, memory_bytes: u64) -> Self {
        Self {
            memory_bytes,
            ..self
        }
    }
}

/// `MemTotal` of `/proc/meminfo` text, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_keep_their_rates_and_take_the_device_numbers() {
        let p = DeviceProfile::from_cuda_device("NVIDIA H100 80GB HBM3", 132, 79 * GIB);
        assert_eq!(p.peak_tensor_flops, 790e12);
        assert_eq!(p.memory_bytes, 79 * GIB);
        assert_eq!(
            DeviceProfile::from_cuda_device("NVIDIA H200", 132, GIB).mem_bandwidth_bytes_per_s,
            4.3e12
        );
        let a100 = DeviceProfile::from_cuda_device("NVIDIA A100-SXM4-40GB", 108, 40 * GIB);
        assert_eq!(
            (a100.peak_tensor_flops, a100.memory_bytes),
            (312e12, 40 * GIB)
        );
    }

    #[test]
    fn unknown_gpus_scale_with_the_sm_count() {
        let small = DeviceProfile::from_cuda_device("Some GPU", 54, 8 * GIB);
        assert_eq!(small.kind, DeviceKind::Cuda);
        assert_eq!((small.sm_count, small.memory_bytes), (54, 8 * GIB));
        assert!(
            (small.peak_tensor_flops - 156e12).abs() < 1e6,
            "{}",
            small.peak_tensor_flops
        );
        assert!((small.mem_bandwidth_bytes_per_s - 1.0e12).abs() < 1e3);
    }

    #[test]
    fn cpu_profile_reads_the_machine() {
        let cpu = DeviceProfile::cpu();
        assert_eq!(cpu.kind, DeviceKind::Cpu);
        assert!(cpu.sm_count >= 1);
        assert_eq!(cpu.peak_tensor_flops, cpu.peak_fp32_flops);
        assert_eq!(
            mem_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(cpu.with_memory_bytes(GIB).memory_bytes, GIB);
    }
}
