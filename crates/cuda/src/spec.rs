//! What we know about GPU models: one table, used by the preflight's roofline, the MFU and the
//! benchmark's memory floor.

/// The rates of one GPU model.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSpec {
    /// A fragment of the driver's device name that identifies the model ("H100 PCIe").
    pub model: &'static str,
    /// Dense bf16/fp16 tensor-core FLOP/s from the vendor's datasheet (no sparsity): what MFU
    /// divides by, as published MFU numbers do.
    pub datasheet_half_flops: f64,
    /// Dense fp32 FLOP/s (no tensor cores) from the datasheet.
    pub datasheet_fp32_flops: f64,
    /// bf16 FLOP/s a large matrix product reaches: the roofline's compute rate.
    pub matmul_flops: f64,
    /// Bytes per second (read + written) a large device-to-device copy reaches: the memory floor.
    pub copy_bytes_per_s: f64,
    /// The datasheet's maximum boost clock of the SMs, Hz: the fastest any instruction issues.
    pub boost_clock_hz: f64,
    /// Where `matmul_flops` and `copy_bytes_per_s` come from.
    pub measured: &'static str,
}

/// `ex2` (2^x, the `MUFU.EX2` instruction every `exp` compiles to) results per SM per clock on
/// compute capability 8.0 to 9.0: the CUDA C++ Programming Guide's table of arithmetic
/// instruction throughput ("base-2 exponential (exp2f)": 16).
pub const EX2_PER_SM_PER_CLOCK: f64 = 16.0;

/// Known GPUs, the most specific name fragments first (an "H100 PCIe" is not an "H100" SXM).
/// Datasheets: NVIDIA H100 (SXM 989.4 / PCIe 756 / NVL 835 TFLOP/s bf16 dense; 3.35 / 2.0 / 3.9
/// TB/s; 132 / 114 / 132 SMs at 1.98 / 1.755 / 1.785 GHz boost), H200 (989.4 TFLOP/s, 4.8 TB/s;
/// 132 SMs, 1.98 GHz), A100 80GB SXM (312 TFLOP/s, 2.04 TB/s; 108 SMs, 1.41 GHz).
const TABLE: &[GpuSpec] = &[
    GpuSpec {
        model: "H100 PCIe",
        datasheet_half_flops: 756e12,
        datasheet_fp32_flops: 51e12,
        matmul_flops: 0.8 * 756e12,
        copy_bytes_per_s: 0.9 * 2.0e12,
        boost_clock_hz: 1.755e9,
        measured: "not measured: 0.8x / 0.9x the datasheet",
    },
    GpuSpec {
        model: "H100 NVL",
        datasheet_half_flops: 835e12,
        datasheet_fp32_flops: 60e12,
        matmul_flops: 0.8 * 835e12,
        copy_bytes_per_s: 0.9 * 3.9e12,
        boost_clock_hz: 1.785e9,
        measured: "not measured: 0.8x / 0.9x the datasheet",
    },
    GpuSpec {
        model: "H100",
        datasheet_half_flops: 989e12,
        datasheet_fp32_flops: 67e12,
        matmul_flops: 790e12,
        copy_bytes_per_s: 3.0e12,
        boost_clock_hz: 1.98e9,
        measured: "measured on an H100 80GB HBM3 (SXM), 2026-11-25: an 8192^3 bf16 matmul and a \
                   device-to-device copy through PyTorch",
    },
    GpuSpec {
        model: "H200",
        datasheet_half_flops: 989e12,
        datasheet_fp32_flops: 67e12,
        matmul_flops: 790e12,
        copy_bytes_per_s: 4.3e12,
        boost_clock_hz: 1.98e9,
        measured: "not measured: matmul as the H100's (the same compute), copy 0.9x the datasheet",
    },
    GpuSpec {
        model: "A100",
        datasheet_half_flops: 312e12,
        datasheet_fp32_flops: 19.5e12,
        matmul_flops: 0.8 * 312e12,
        copy_bytes_per_s: 0.9 * 2.04e12,
        boost_clock_hz: 1.41e9,
        measured: "not measured: 0.8x / 0.9x the datasheet",
    },
];

impl GpuSpec {
    /// The spec of the GPU the driver names `device_name` (case-insensitive fragment match), if
    /// it is in the table.
    pub fn lookup(device_name: &str) -> Option<&'static GpuSpec> {
        let name = device_name.to_ascii_uppercase();
        TABLE
            .iter()
            .find(|spec| name.contains(&spec.model.to_ascii_uppercase()))
    }

    /// ex2 results per second with `sm_count` SMs at the boost clock: the exponential floor of
    /// kernels that take one `exp` per element (the selective scan's).
    pub fn ex2_per_s(&self, sm_count: usize) -> f64 {
        sm_count as f64 * EX2_PER_SM_PER_CLOCK * self.boost_clock_hz
    }

    /// The table, for listings and tests.
    pub fn all() -> &'static [GpuSpec] {
        TABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_find_their_model() {
        for (name, model) in [
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA H100 PCIe", "H100 PCIe"),
            ("NVIDIA H100 NVL", "H100 NVL"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA A100-SXM4-80GB", "A100"),
        ] {
            assert_eq!(
                GpuSpec::lookup(name).map(|s| s.model),
                Some(model),
                "{name}"
            );
        }
        assert!(GpuSpec::lookup("NVIDIA GeForce RTX 4090").is_none());
    }

    #[test]
    fn the_h100_takes_4_2e12_ex2_per_second() {
        // 132 SMs x 16 per clock x 1.98 GHz.
        let h100 = GpuSpec::lookup("NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!(h100.ex2_per_s(132), 132.0 * 16.0 * 1.98e9);
        assert!((h100.ex2_per_s(132) - 4.18e12).abs() < 0.01e12);
    }

    #[test]
    fn measured_rates_stay_under_the_datasheet() {
        for spec in GpuSpec::all() {
            assert!(
                spec.matmul_flops <= spec.datasheet_half_flops,
                "{}",
                spec.model
            );
            assert!(
                spec.datasheet_fp32_flops < spec.datasheet_half_flops,
                "{}",
                spec.model
            );
        }
    }
}
