//! GLA as one autograd op: [`gla`] checks its inputs and dispatches by [`GlaMode`] to the CUDA
//! kernels (through the C++ autograd shim, so `loss.backward()` reaches the CUDA backward) or to
//! the tensor-op reference (CPU tensors, or [`GlaMode::Reference`]).

use std::ffi::{c_char, c_int};
use std::mem::ManuallyDrop;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::cuda::gla::{self as kernels, Schedule};
use crate::cuda::CudaError;
use crate::reference::gla::{gla_chunked, DEFAULT_CHUNK};

/// Which schedule computes GLA. All compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GlaMode {
    /// Chunk states materialised, parallel over chunks (the training default).
    #[default]
    Chunk,
    /// One block per (batch, head, state tile) walks all chunks with the state on chip.
    FusedChunk,
    /// Token by token: short sequences and decoding.
    FusedRecurrent,
    /// The tensor-op reference (`reference::gla::gla_chunked`), on any device.
    Reference,
}

impl GlaMode {
    /// The CUDA kernels' schedule this mode runs (None: the reference, tensor ops).
    pub fn schedule(self) -> Option<Schedule> {
        match self {
            GlaMode::Chunk => Some(Schedule::Chunk),
            GlaMode::FusedChunk => Some(Schedule::FusedChunk),
            GlaMode::FusedRecurrent => Some(Schedule::FusedRecurrent),
            GlaMode::Reference => None,
        }
    }

    fn code(self) -> i64 {
        match self {
            GlaMode::Chunk => 0,
            GlaMode::FusedChunk => 1,
            GlaMode::FusedRecurrent => 2,
            GlaMode::Reference => 3,
        }
    }

    fn from_code(code: i64) -> Option<Schedule> {
        match code {
            0 => Some(Schedule::Chunk),
            1 => Some(Schedule::FusedChunk),
            2 => Some(Schedule::FusedRecurrent),
            _ => None,
        }
    }
}

/// Why [`gla`] refused its inputs or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A tensor has the wrong shape.
    #[error("gla: {tensor} must be {expected}, got shape {actual:?}")]
    Shape {
        /// The argument name.
        tensor: &'static str,
        /// The expected shape, in words.
        expected: String,
        /// The actual shape.
        actual: Vec<i64>,
    },
    /// A tensor has an unsupported dtype.
    #[error("gla: {tensor} has dtype {actual:?}; {expected}")]
    Dtype {
        /// The argument name.
        tensor: &'static str,
        /// What is accepted.
        expected: String,
        /// The actual dtype.
        actual: Kind,
    },
    /// A tensor is on another device than q.
    #[error("gla: {tensor} is on {actual:?} but q is on {expected:?}")]
    Device {
        /// The argument name.
        tensor: &'static str,
        /// q's device.
        expected: Device,
        /// The tensor's device.
        actual: Device,
    },
    /// The scale is not a finite number.
    #[error("gla: scale = {0} must be finite")]
    Scale(f64),
    /// A CUDA kernel could not be compiled, loaded or launched.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// libtorch failed inside the autograd op.
    #[error("gla: {0}")]
    Torch(String),
}

impl OpError {
    /// True for inputs that are wrong (shapes, dtypes, devices, scale): the user's to fix.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            OpError::Shape { .. }
                | OpError::Dtype { .. }
                | OpError::Device { .. }
                | OpError::Scale(_)
        ) || matches!(self, OpError::Cuda(e) if e.is_bad_input())
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// Checks shapes, dtypes and devices; returns the sizes (B, T, H, K, V).
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
) -> Result<(), OpError> {
    let qs = q.size();
    if qs.len() != 4 || qs[3] < 1 {
        return Err(OpError::Shape {
            tensor: "q",
            expected: "[B, T, H, K] with K >= 1".into(),
            actual: qs,
        });
    }
    let qk = format!("q's shape {qs:?}");
    for (name, t) in [("k", k), ("gk", gk)] {
        if t.size() != qs {
            return Err(OpError::Shape {
                tensor: name,
                expected: qk.clone(),
                actual: t.size(),
            });
        }
    }
    let vs = v.size();
    if vs.len() != 4 || vs[..3] != qs[..3] || vs[3] < 1 {
        return Err(OpError::Shape {
            tensor: "v",
            expected: format!("[{}, {}, {}, V] with V >= 1", qs[0], qs[1], qs[2]),
            actual: vs,
        });
    }
    if let Some(h0) = initial_state {
        let want = vec![qs[0], qs[2], qs[3], vs[3]];
        if h0.size() != want {
            return Err(OpError::Shape {
                tensor: "initial_state",
                expected: format!("[B, H, K, V] = {want:?}"),
                actual: h0.size(),
            });
        }
    }
    if !is_float(q.kind()) {
        return Err(OpError::Dtype {
            tensor: "q",
            expected: "expected a floating-point dtype".into(),
            actual: q.kind(),
        });
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.kind() != q.kind() {
            return Err(OpError::Dtype {
                tensor: name,
                expected: format!("expected q's dtype {:?}", q.kind()),
                actual: t.kind(),
            });
        }
    }
    for (name, t) in [("gk", Some(gk)), ("initial_state", initial_state)] {
        if let Some(t) = t.filter(|t| !is_float(t.kind())) {
            return Err(OpError::Dtype {
                tensor: name,
                expected: "expected a floating-point dtype".into(),
                actual: t.kind(),
            });
        }
    }
    for (name, t) in [
        ("k", Some(k)),
        ("v", Some(v)),
        ("gk", Some(gk)),
        ("initial_state", initial_state),
    ] {
        if let Some(t) = t.filter(|t| t.device() != q.device()) {
            return Err(OpError::Device {
                tensor: name,
                expected: q.device(),
                actual: t.device(),
            });
        }
    }
    if !scale.is_finite() {
        return Err(OpError::Scale(scale));
    }
    Ok(())
}

/// Compiles (or reads from the disk cache) and loads the CUDA kernels that `mode` runs for
/// q/k/v of `kind` on CUDA device `ordinal`, so that the first [`gla`] call does not wait for
/// them; safe to call from another thread while the caller goes on (training does, while it
/// builds the model). Nothing to do for [`GlaMode::Reference`].
pub fn prepare(ordinal: usize, kind: Kind, mode: GlaMode) -> Result<(), OpError> {
    match mode.schedule() {
        Some(schedule) => Ok(crate::cuda::gla::prepare(ordinal, kind, schedule, false)?),
        None => Ok(()),
    }
}

/// Like [`prepare`], then waits until the optimised (Full tier) kernels are loaded, as every
/// timing of the op must: a first use without them in the disk cache runs quickly compiled,
/// slower kernels until then (see `glatrain_ops::cuda::TierPolicy`).
pub fn prepare_optimised(ordinal: usize, kind: Kind, mode: GlaMode) -> Result<(), OpError> {
    match mode.schedule() {
        Some(schedule) => Ok(crate::cuda::gla::prepare(ordinal, kind, schedule, true)?),
        None => Ok(()),
    }
}

/// Gated linear attention, differentiable in every input.
///
/// `S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`, `S_0 = initial_state`
/// (or zeros). `gk` is the log forget gate (<= 0). `scale` defaults to `K^-0.5`.
///
/// CUDA tensors run the kernels of `mode` (any K, V >= 1 and any T: tiles are padded inside);
/// CPU tensors, and [`GlaMode::Reference`], run the tensor-op reference. On CUDA, q, k, v must
/// share one dtype among f32, bf16 and f16; gk and the initial state are used in f32 (their
/// gradients come back in their own dtype through autograd). Non-contiguous inputs are copied.
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state: `[B, H, K, V]`.
/// Returns o `[B, T, H, V]` (v's dtype) and, when `output_final_state`, the final state
/// `[B, H, K, V]` (f32; f64 for f64 reference inputs).
#[allow(clippy::too_many_arguments)]
pub fn gla(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: Option<f64>,
    mode: GlaMode,
    output_final_state: bool,
) -> Result<(Tensor, Option<Tensor>), OpError> {
    let scale =
        scale.unwrap_or_else(|| (q.size().last().copied().unwrap_or(1).max(1) as f64).powf(-0.5));
    check(q, k, v, gk, initial_state, scale)?;
    let (o, ht) = match (q.device(), mode.schedule()) {
        (Device::Cuda(_), Some(_)) => {
            if crate::cuda::KernelDtype::of(q.kind()).is_none() {
                return Err(OpError::Dtype {
                    tensor: "q",
                    expected:
                        "the CUDA kernels take f32, bf16 or f16 (GlaMode::Reference takes any)"
                            .into(),
                    actual: q.kind(),
                });
            }
            apply(q, k, v, gk, initial_state, scale, mode)?
        }
        _ => gla_chunked(q, k, v, gk, initial_state, scale, DEFAULT_CHUNK),
    };
    Ok((o, output_final_state.then_some(ht)))
}

type ForwardFn = extern "C" fn(
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    f64,
    i64,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut c_char,
    usize,
) -> c_int;

type BackwardFn = extern "C" fn(
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    *const C_tensor,
    f64,
    i64,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut *mut C_tensor,
    *mut c_char,
    usize,
) -> c_int;

extern "C" {
    fn glatrain_gla_apply(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        g: *const C_tensor,
        h0: *const C_tensor,
        scale: f64,
        mode: i64,
        fwd: ForwardFn,
        bwd: BackwardFn,
        o: *mut *mut C_tensor,
        ht: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs the CUDA op through the shim's autograd function.
fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
    mode: GlaMode,
) -> Result<(Tensor, Tensor), OpError> {
    let (mut q_copy, mut k_copy, mut v_copy, mut g_copy) = (None, None, None, None);
    let q = contiguous(q, q.kind(), &mut q_copy);
    let k = contiguous(k, k.kind(), &mut k_copy);
    let v = contiguous(v, v.kind(), &mut v_copy);
    let g = contiguous(gk, Kind::Float, &mut g_copy);
    let mut h0_copy = None;
    let h0 = initial_state.map(|h| contiguous(h, Kind::Float, &mut h0_copy));
    let mut o: *mut C_tensor = std::ptr::null_mut();
    let mut ht: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: every tensor pointer is a live tch tensor for the call; the callbacks match the
    // shim's signatures; on success the shim hands over two new tensors, taken below.
    crate::shim::checked(|err, len| unsafe {
        glatrain_gla_apply(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            g.as_ptr(),
            h0.map_or(std::ptr::null(), |h| h.as_ptr()),
            scale,
            mode.code(),
            forward_cb,
            backward_cb,
            &mut o,
            &mut ht,
            err,
            len,
        )
    })
    .map_err(OpError::Torch)?;
    // SAFETY: the shim returned two `new at::Tensor`s whose ownership passes to us.
    Ok(unsafe { (Tensor::from_ptr(o), Tensor::from_ptr(ht)) })
}

/// `t` as a contiguous tensor of `kind`: `t` itself where it is one (no new tensor handle on the
/// way to the forward's first kernel), else a converted copy, held in `copy`.
fn contiguous<'a>(t: &'a Tensor, kind: Kind, copy: &'a mut Option<Tensor>) -> &'a Tensor {
    if t.kind() == kind && t.is_contiguous() {
        t
    } else {
        copy.insert(t.to_kind(kind).contiguous())
    }
}

/// A tensor the shim lends for the duration of a callback: never freed here.
///
/// # Safety
/// `p` must point to a live `at::Tensor` for as long as the result is used.
unsafe fn borrow(p: *const C_tensor) -> Option<ManuallyDrop<Tensor>> {
    // SAFETY: per the contract; ManuallyDrop keeps tch from freeing the shim's tensor.
    (!p.is_null()).then(|| ManuallyDrop::new(unsafe { Tensor::from_ptr(p as *mut C_tensor) }))
}

/// Gives a tensor to the shim, which takes ownership (and deletes it).
fn hand_over(t: Tensor) -> *mut C_tensor {
    let mut t = ManuallyDrop::new(t);
    t.as_mut_ptr()
}

/// Writes `msg` NUL-terminated into the shim's buffer.
fn report(msg: &str, err: *mut c_char, len: usize) -> c_int {
    if !err.is_null() && len > 0 {
        let n = msg.len().min(len - 1);
        // SAFETY: the shim's buffer holds `len` bytes; n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
            *err.add(n) = 0;
        }
    }
    1
}

/// Runs a callback body, turning errors and panics (which must not unwind into C++) into a
/// message for the shim.
fn guarded(err: *mut c_char, len: usize, body: impl FnOnce() -> Result<(), CudaError>) -> c_int {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => report(&e.to_string(), err, len),
        Err(_) => report("gla: panic inside a CUDA launcher", err, len),
    }
}

extern "C" fn forward_cb(
    q: *const C_tensor,
    k: *const C_tensor,
    v: *const C_tensor,
    g: *const C_tensor,
    h0: *const C_tensor,
    scale: f64,
    mode: i64,
    o: *mut *mut C_tensor,
    ht: *mut *mut C_tensor,
    saved: *mut *mut C_tensor,
    err: *mut c_char,
    len: usize,
) -> c_int {
    guarded(err, len, || {
        // SAFETY: the shim passes live tensors (h0 may be null) for the duration of this call.
        let (q, k, v, g, h0) = unsafe { (borrow(q), borrow(k), borrow(v), borrow(g), borrow(h0)) };
        let (q, k, v, g) = (q.expect("q"), k.expect("k"), v.expect("v"), g.expect("g"));
        let schedule = GlaMode::from_code(mode).expect("the shim passes a kernel mode");
        let out = kernels::forward(&q, &k, &v, &g, h0.as_deref(), scale, schedule)?;
        // SAFETY: `o`, `ht` and `saved` are valid out-pointers from the shim, which takes
        // ownership of what is written.
        unsafe {
            *o = hand_over(out.o);
            *ht = hand_over(out.final_state);
            if let Some(t) = out.saved {
                *saved = hand_over(t);
            }
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
extern "C" fn backward_cb(
    q: *const C_tensor,
    k: *const C_tensor,
    v: *const C_tensor,
    g: *const C_tensor,
    h0: *const C_tensor,
    ht: *const C_tensor,
    saved: *const C_tensor,
    d_o: *const C_tensor,
    dht: *const C_tensor,
    scale: f64,
    mode: i64,
    dq: *mut *mut C_tensor,
    dk: *mut *mut C_tensor,
    dv: *mut *mut C_tensor,
    dg: *mut *mut C_tensor,
    dh0: *mut *mut C_tensor,
    err: *mut c_char,
    len: usize,
) -> c_int {
    guarded(err, len, || {
        // SAFETY: the shim passes live tensors (h0, saved and dht may be null) for this call.
        let (q, k, v, g, h0, ht, saved, d_o, dht) = unsafe {
            (
                borrow(q),
                borrow(k),
                borrow(v),
                borrow(g),
                borrow(h0),
                borrow(ht),
                borrow(saved),
                borrow(d_o),
                borrow(dht),
            )
        };
        let (q, k, v, g) = (q.expect("q"), k.expect("k"), v.expect("v"), g.expect("g"));
        let (ht, d_o) = (ht.expect("final state"), d_o.expect("d_o"));
        let schedule = GlaMode::from_code(mode).expect("the shim passes a kernel mode");
        let d_o = d_o.to_kind(v.kind()).contiguous();
        let dht = dht.map(|t| t.to_kind(Kind::Float).contiguous());
        let grads = kernels::backward(
            &q,
            &k,
            &v,
            &g,
            h0.as_deref(),
            &ht,
            saved.as_deref(),
            &d_o,
            dht.as_ref(),
            scale,
            schedule,
        )?;
        // SAFETY: valid out-pointers from the shim, which takes ownership of what is written.
        unsafe {
            *dq = hand_over(grads.dq);
            *dk = hand_over(grads.dk);
            *dv = hand_over(grads.dv);
            *dg = hand_over(grads.dg);
            if let Some(t) = grads.dh0 {
                *dh0 = hand_over(t);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preparing_nothing_touches_no_gpu() {
        // The reference mode and dtypes without kernels need no compilation (and no device:
        // this runs on machines without CUDA).
        prepare(0, Kind::BFloat16, GlaMode::Reference).unwrap();
        prepare(0, Kind::Int64, GlaMode::Chunk).unwrap();
    }

    fn inputs(b: i64, t: i64, h: i64, k: i64, v: i64) -> (Tensor, Tensor, Tensor, Tensor) {
        let opts = (Kind::Double, Device::Cpu);
        (
            Tensor::randn([b, t, h, k], opts),
            Tensor::randn([b, t, h, k], opts),
            Tensor::randn([b, t, h, v], opts),
            -Tensor::rand([b, t, h, k], opts),
        )
    }

    #[test]
    fn cpu_dispatches_to_the_reference() {
        let (q, k, v, g) = inputs(1, 5, 2, 3, 4);
        let (o, ht) = gla(&q, &k, &v, &g, None, None, GlaMode::Chunk, true).unwrap();
        let (ro, rht) = gla_chunked(&q, &k, &v, &g, None, 3f64.powf(-0.5), DEFAULT_CHUNK);
        assert!(o.allclose(&ro, 1e-12, 1e-12, false));
        assert!(ht.unwrap().allclose(&rht, 1e-12, 1e-12, false));
    }

    #[test]
    fn final_state_only_when_asked() {
        let (q, k, v, g) = inputs(1, 3, 1, 2, 2);
        let (_, ht) = gla(
            &q,
            &k,
            &v,
            &g,
            None,
            Some(1.0),
            GlaMode::FusedRecurrent,
            false,
        )
        .unwrap();
        assert!(ht.is_none());
    }

    #[test]
    fn errors_name_the_tensor_and_value() {
        let (q, k, v, g) = inputs(2, 4, 3, 5, 6);
        let bad_v = v.narrow(1, 0, 3);
        let err = gla(&q, &k, &bad_v, &g, None, None, GlaMode::Chunk, false).unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(
            msg.contains("v must be") && msg.contains("[2, 3, 3, 6]"),
            "{msg}"
        );

        let h0 = Tensor::zeros([2, 3, 5, 7], (Kind::Double, Device::Cpu));
        let msg = gla(&q, &k, &v, &g, Some(&h0), None, GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("initial_state") && msg.contains("[2, 3, 5, 7]"),
            "{msg}"
        );

        let k32 = k.to_kind(Kind::Float);
        let msg = gla(&q, &k32, &v, &g, None, None, GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("k has dtype Float"), "{msg}");

        let msg = gla(&q, &k, &v, &g, None, Some(f64::NAN), GlaMode::Chunk, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("scale = NaN"), "{msg}");

        let q0 = Tensor::zeros([2, 4, 3, 0], (Kind::Double, Device::Cpu));
        let err = gla(&q0, &q0, &v, &q0, None, None, GlaMode::Chunk, false).unwrap_err();
        assert!(err.to_string().contains("K >= 1"), "{err}");
    }
}
