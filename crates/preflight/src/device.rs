//! What the preflight knows about the machine: a few numbers per device, from the table of known
//! GPUs (`glatrain_cuda::GpuSpec`) or scaled from the SM count.

use glatrain_cuda::GpuSpec;
use serde::{Deserialize, Serialize};

/// SMs of an A100, the basis of [`DeviceProfile::generic_cuda`].
const A100_SMS: usize = 108;

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
    /// Exponentials (`ex2`) per second: SMs x 16 per clock x the boost clock on a GPU
    /// ([`GpuSpec::ex2_per_s`]); what the selective scan's kernels are bound by.
    pub ex2_per_s: f64,
}

impl DeviceProfile {
    /// The profile for a CUDA device as the driver describes it: a known GPU's rates
    /// ([`GpuSpec`]: what a large matmul and a device copy reach, the datasheet fp32 peak) when
    /// the name matches one, else [`Self::generic_cuda`]; the name, SM count and memory are
    /// always the device's own.
    pub fn from_cuda_device(name: &str, sm_count: usize, memory_bytes: u64) -> Self {
        match GpuSpec::lookup(name) {
            Some(spec) => Self {
                name: name.to_owned(),
                kind: DeviceKind::Cuda,
                sm_count,
                memory_bytes,
                mem_bandwidth_bytes_per_s: spec.copy_bytes_per_s,
                peak_tensor_flops: spec.matmul_flops,
                peak_fp32_flops: spec.datasheet_fp32_flops,
                ex2_per_s: spec.ex2_per_s(sm_count),
            },
            None => Self::generic_cuda(name, sm_count, memory_bytes),
        }
    }

    /// An H100 SXM 80 GB with its 132 SMs (tests and examples).
    pub fn h100_sxm() -> Self {
        Self::from_cuda_device("NVIDIA H100 80GB HBM3", 132, 80 * GIB)
    }

    /// An H200 141 GB.
    pub fn h200() -> Self {
        Self::from_cuda_device("NVIDIA H200", 132, 141 * GIB)
    }

    /// An A100 SXM 80 GB.
    pub fn a100_80gb() -> Self {
        Self::from_cuda_device("NVIDIA A100-SXM4-80GB", A100_SMS, 80 * GIB)
    }

    /// An unknown GPU, from what the caller reads off the device: the A100's rates per SM times
    /// `sm_count` (a guess: the rules use only the SM count and the memory; the time estimates
    /// are marked as estimates).
    pub fn generic_cuda(name: &str, sm_count: usize, memory_bytes: u64) -> Self {
        let a100 = Self::a100_80gb();
        let per_sm = sm_count as f64 / A100_SMS as f64;
        Self {
            name: name.to_owned(),
            kind: DeviceKind::Cuda,
            sm_count,
            memory_bytes,
            mem_bandwidth_bytes_per_s: a100.mem_bandwidth_bytes_per_s * per_sm,
            peak_tensor_flops: a100.peak_tensor_flops * per_sm,
            peak_fp32_flops: a100.peak_fp32_flops * per_sm,
            ex2_per_s: a100.ex2_per_s * per_sm,
        }
    }

    /// This machine's CPU: cores from the OS, memory from `/proc/meminfo` (0 = unknown where
    /// that file is missing), and modest per-core rates (~20 GB/s memory, 32 GFLOP/s per core;
    /// no tensor cores; an exp as 8 FLOPs of a polynomial). The reference ops are the only ones
    /// on CPU, so only the estimates use the rates.
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
            ex2_per_s: flops / 8.0,
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
        assert_eq!(p.ex2_per_s, 132.0 * 16.0 * 1.98e9);
        assert_eq!(p.memory_bytes, 79 * GIB);
        assert_eq!(
            DeviceProfile::from_cuda_device("NVIDIA H200", 132, GIB).mem_bandwidth_bytes_per_s,
            4.3e12
        );
        let a100 = DeviceProfile::from_cuda_device("NVIDIA A100-SXM4-40GB", 108, 40 * GIB);
        let spec = GpuSpec::lookup("A100").unwrap();
        assert_eq!(
            (a100.peak_tensor_flops, a100.memory_bytes),
            (spec.matmul_flops, 40 * GIB)
        );
    }

    #[test]
    fn unknown_gpus_scale_with_the_sm_count() {
        let small = DeviceProfile::from_cuda_device("Some GPU", 54, 8 * GIB);
        assert_eq!(small.kind, DeviceKind::Cuda);
        assert_eq!((small.sm_count, small.memory_bytes), (54, 8 * GIB));
        // Half an A100's SMs: half its rates.
        let a100 = DeviceProfile::a100_80gb();
        let half = |x: f64| x / 2.0;
        assert!((small.peak_tensor_flops - half(a100.peak_tensor_flops)).abs() < 1e6);
        assert!((small.ex2_per_s - half(a100.ex2_per_s)).abs() < 1e3);
        assert!(
            (small.mem_bandwidth_bytes_per_s - half(a100.mem_bandwidth_bytes_per_s)).abs() < 1e3
        );
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
