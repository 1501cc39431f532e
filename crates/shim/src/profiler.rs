//! libtorch's profiler (Kineto, as `torch.profiler` runs it): what ran on the CPU and on the
//! GPU between [`start`] and [`stop`], as a Chrome/Perfetto trace file and as events.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use crate::checked::checked;

type EventFn = unsafe extern "C" fn(*mut c_void, *const c_char, c_int, u64, u64);

extern "C" {
    fn glatrain_profiler_start(cuda: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn glatrain_profiler_stop(
        trace_path: *const c_char,
        each: EventFn,
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// One recorded event: a CPU op (`aten::mm`, ...) or a GPU kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    /// Ran on a GPU (a kernel, a copy, a memset).
    pub on_gpu: bool,
    /// Start, ns on the profiler's clock.
    pub start_ns: u64,
    pub duration_ns: u64,
}

/// Starts recording this thread's CPU ops and, with `cuda`, the GPU's kernels.
///
/// # Errors
/// libtorch's message (a profiler already running, no CUPTI for CUDA).
pub fn start(cuda: bool) -> Result<(), String> {
    // SAFETY: the message buffer is the checked helper's.
    checked(|err, len| unsafe { glatrain_profiler_start(c_int::from(cuda), err, len) })
}

unsafe extern "C" fn collect(
    ctx: *mut c_void,
    name: *const c_char,
    on_gpu: c_int,
    start_ns: u64,
    duration_ns: u64,
) {
    // SAFETY: `ctx` is the Vec that `stop` passed; `name` is a NUL-terminated string the shim
    // keeps alive for the call.
    let (events, name) = unsafe { (&mut *(ctx as *mut Vec<Event>), CStr::from_ptr(name)) };
    events.push(Event {
        name: name.to_string_lossy().into_owned(),
        on_gpu: on_gpu != 0,
        start_ns,
        duration_ns,
    });
}

/// Stops recording; writes the Chrome/Perfetto trace to `trace` when given and returns every
/// event.
///
/// # Errors
/// libtorch's message (no profiler running, the trace not writable).
pub fn stop(trace: Option<&Path>) -> Result<Vec<Event>, String> {
    let path = trace
        .map(|p| CString::new(p.to_string_lossy().as_bytes()))
        .transpose()
        .map_err(|_| "the trace path contains a NUL byte".to_string())?;
    let mut events: Vec<Event> = Vec::new();
    let ctx = &mut events as *mut Vec<Event> as *mut c_void;
    // SAFETY: `collect` matches the shim's callback type and only runs during this call, while
    // `events` lives; the path is NUL-terminated or null.
    checked(|err, len| unsafe {
        glatrain_profiler_stop(
            path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            collect,
            ctx,
            err,
            len,
        )
    })?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn records_ops_and_writes_a_chrome_trace() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let cuda = tch::Cuda::is_available();
        start(cuda).unwrap();
        let device = if cuda { Device::Cuda(0) } else { Device::Cpu };
        let a = Tensor::randn([64, 64], (Kind::Float, device));
        let _ = a.matmul(&a).sum(Kind::Float).double_value(&[]);
        let events = stop(Some(&trace)).unwrap();
        assert!(
            events.iter().any(|e| e.name.contains("mm") && !e.on_gpu),
            "{events:?}"
        );
        if cuda {
            assert!(events.iter().any(|e| e.on_gpu), "no GPU event");
        }
        let text = std::fs::read_to_string(&trace).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(json["traceEvents"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
        assert!(stop(None).is_err(), "a second stop has no profiler to stop");
    }
}
