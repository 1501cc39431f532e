//! The CUDA caching allocator's counters (what `torch.cuda.memory_stats` reports): bytes held by
//! tensors and bytes reserved from the driver, now and at their peak.

use std::ffi::{c_char, c_int};

use crate::checked::checked;

extern "C" {
    fn glatrain_cuda_memory_stats(
        device: c_int,
        out: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_cuda_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

/// One CUDA device's allocator counters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Held by live tensors now (`memory_allocated`).
    pub allocated: u64,
    /// The most ever held since the last [`reset_peak`] (`max_memory_allocated`).
    pub peak_allocated: u64,
    /// Reserved from the driver by the caching allocator now (`memory_reserved`).
    pub reserved: u64,
    /// The most ever reserved since the last [`reset_peak`] (`max_memory_reserved`).
    pub peak_reserved: u64,
}

/// The allocator counters of CUDA device `ordinal`.
///
/// # Errors
/// libtorch's message (no such device, CUDA not initialised).
pub fn stats(ordinal: usize) -> Result<MemoryStats, String> {
    let mut out = [0i64; 4];
    let device = c_int::try_from(ordinal).map_err(|_| format!("no CUDA device {ordinal}"))?;
    // SAFETY: `out` holds the four counters the shim writes; the message buffer is the checked
    // helper's.
    checked(|err, len| unsafe { glatrain_cuda_memory_stats(device, out.as_mut_ptr(), err, len) })?;
    let bytes = |x: i64| x.max(0) as u64;
    Ok(MemoryStats {
        allocated: bytes(out[0]),
        peak_allocated: bytes(out[1]),
        reserved: bytes(out[2]),
        peak_reserved: bytes(out[3]),
    })
}

/// Starts the peaks of [`stats`] afresh at the current values.
///
/// # Errors
/// libtorch's message.
pub fn reset_peak(ordinal: usize) -> Result<(), String> {
    let device = c_int::try_from(ordinal).map_err(|_| format!("no CUDA device {ordinal}"))?;
    // SAFETY: the message buffer is the checked helper's.
    checked(|err, len| unsafe { glatrain_cuda_reset_peak(device, err, len) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn peaks_follow_allocations() {
        if glatrain_testing::cuda_or_skip().is_none() {
            return;
        }
        let before = stats(0).unwrap();
        reset_peak(0).unwrap();
        let big = Tensor::zeros([64 << 20], (Kind::Uint8, Device::Cuda(0)));
        let during = stats(0).unwrap();
        assert!(
            during.allocated >= before.allocated + (64 << 20),
            "{during:?}"
        );
        assert!(during.peak_allocated >= during.allocated);
        assert!(during.reserved >= during.allocated);
        drop(big);
        let after = stats(0).unwrap();
        assert!(after.allocated < during.allocated);
        assert_eq!(after.peak_allocated, during.peak_allocated);
        reset_peak(0).unwrap();
        assert!(stats(0).unwrap().peak_allocated < during.peak_allocated);
    }
}
