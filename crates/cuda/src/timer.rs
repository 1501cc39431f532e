//! GPU time of work on the legacy default stream, as CUDA-event medians taken the way Triton's
//! `do_bench` (the timer of flash-linear-attention's own benchmarks) takes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUevent_flags;

use crate::{CudaError, Gpu};

/// What [`CudaTimer::median_ms`] writes ahead of each timed call: 256 MiB, as `do_bench`, over
/// twice the L2 cache of any current GPU (50 MB on an H100), and ~90 us of work on an H100, longer
/// than the host takes to launch a call's first kernel.
pub const FLUSH_BYTES: usize = 256 << 20;

/// The least warm-up time of [`CudaTimer::median_ms`].
pub const WARMUP_MIN: Duration = Duration::from_millis(100);

/// Rounds per timed number, in the benchmark and the measured preflight: the fastest round's
/// median counts ([`CudaTimer::fastest_median_ms`]).
pub const TIMING_ROUNDS: usize = 3;

/// Times GPU work on the legacy default stream (the one libtorch and the kernels launch on) with
/// CUDA events.
#[derive(Debug)]
pub struct CudaTimer {
    dev: Arc<Gpu>,
}

impl CudaTimer {
    /// A timer on the device with this ordinal; fails when the driver or the device is missing.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Self {
            dev: Gpu::get(ordinal)?,
        })
    }

    /// Median over `iters` event-timed calls of `f`, after `warmup` untimed calls (and more of
    /// them, each waited for, until [`WARMUP_MIN`] has passed: a GPU coming out of idle clocks
    /// would otherwise slow the first calls of a short shape), in ms; `f` must launch its work on
    /// the legacy default stream. Errors from `f` and from the driver are returned at once.
    ///
    /// Each timed call is queued behind a write of [`FLUSH_BYTES`], as `do_bench` does: the call
    /// finds none of its inputs in L2, and the GPU is still busy with the write when the host
    /// records the start event and launches the call, so the time is the GPU's, not the host's
    /// latency to the first kernel (in training the host runs ahead of the GPU too). The calls
    /// are not waited for one by one.
    ///
    /// # Panics
    ///
    /// If `iters` is 0 (there is no median of nothing).
    pub fn median_ms<E: From<CudaError>>(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f64, E> {
        assert!(iters > 0, "CudaTimer::median_ms: iters must be at least 1");
        self.dev.bind()?;
        let ctx = self.dev.context();
        let stream = self.dev.stream();
        let started = Instant::now();
        let mut calls = 0;
        while calls < warmup || started.elapsed() < WARMUP_MIN {
            f()?;
            stream
                .synchronize()
                .map_err(|e| CudaError::driver("cuStreamSynchronize", e))?;
            calls += 1;
        }
        let mut flush = stream
            .alloc_zeros::<u8>(FLUSH_BYTES)
            .map_err(|e| CudaError::driver("cuMemAlloc", e))?;
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let event = || {
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| CudaError::driver("cuEventCreate", e))
            };
            let (start, end) = (event()?, event()?);
            stream
                .memset_zeros(&mut flush)
                .map_err(|e| CudaError::driver("cuMemsetD8Async", e))?;
            start
                .record(stream)
                .map_err(|e| CudaError::driver("cuEventRecord", e))?;
            f()?;
            end.record(stream)
                .map_err(|e| CudaError::driver("cuEventRecord", e))?;
            events.push((start, end));
        }
        let mut times = events
            .iter()
            .map(|(start, end)| {
                start
                    .elapsed_ms(end)
                    .map(f64::from)
                    .map_err(|e| CudaError::driver("cuEventElapsedTime", e))
            })
            .collect::<Result<Vec<f64>, CudaError>>()?;
        Ok(median(&mut times))
    }

    /// The fastest of `rounds` [`median_ms`](Self::median_ms) rounds of `f` (each warmed up), in
    /// ms. The H100 hosts have slow phases in which a whole round comes out 1.3x to 2x the others
    /// (SDPA's as well as GLA's); with rounds, one costs a round, not the number.
    pub fn fastest_median_ms<E: From<CudaError>>(
        &self,
        rounds: usize,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<(), E>,
    ) -> Result<f64, E> {
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            best = best.min(self.median_ms(warmup, iters, &mut f)?);
        }
        Ok(best)
    }
}

/// The upper median of a non-empty slice (sorted in place).
fn median(times: &mut [f64]) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_median() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(&mut [5.0]), 5.0);
    }
}
