//! Autograd through the C++ shim: custom ops whose forward and backward are Rust ([`CustomOp`],
//! [`apply`]), and gradients from a given output gradient ([`grad`]).
//!
//! tch has no custom autograd functions, and its backward seeds the graph with ones, while
//! `o.backward(do)` (the way the benchmarks time a forward+backward) needs the output gradient
//! given.

use std::ffi::{c_char, c_int, c_void};
use std::mem::ManuallyDrop;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::checked::checked;

extern "C" {
    fn glatrain_grad(
        out: *const C_tensor,
        grad: *const C_tensor,
        inputs: *const *const C_tensor,
        n: usize,
        grads: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_backward(
        out: *const C_tensor,
        grad: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// An op with a Rust forward and backward that libtorch's autograd records like its own: the
/// backward runs when `loss.backward()` reaches the op's outputs.
///
/// Inputs and saved tensors may be absent (`None`). The forward returns the outputs (at most 16)
/// and what the backward needs (inputs, outputs or extra tensors, at most 16); the backward gets
/// the saved tensors back and one gradient per output (`None` where an output was not used) and
/// returns one gradient per input (`None` where there is none). Errors are messages: they reach
/// the caller of [`apply`] or of `backward()` as libtorch errors.
pub trait CustomOp: Send + Sync {
    /// Forward: outputs and saved tensors from the inputs.
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String>;

    /// Backward: one gradient per input from the saved tensors and the outputs' gradients.
    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grad_outputs: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String>;
}

/// What [`CustomOp::forward`] returns.
#[derive(Debug)]
pub struct Forward {
    /// The op's outputs.
    pub outputs: Vec<Tensor>,
    /// Tensors for the backward, handed back in this order.
    pub saved: Vec<Option<Tensor>>,
}

impl Forward {
    /// `outputs`, saving shallow copies of `kept` (inputs the backward reads again, `None` where
    /// absent) followed by `computed` (tensors the forward made for the backward).
    pub fn saving(
        outputs: Vec<Tensor>,
        kept: &[Option<&Tensor>],
        computed: impl IntoIterator<Item = Option<Tensor>>,
    ) -> Self {
        let saved = kept
            .iter()
            .map(|t| t.map(Tensor::shallow_clone))
            .chain(computed)
            .collect();
        Self { outputs, saved }
    }
}

/// The most outputs, and the most saved tensors, of one op (the shim's fixed arrays).
pub const MAX_TENSORS: usize = 16;

type ForwardCallback = unsafe extern "C" fn(
    *mut c_void,
    *const *const C_tensor,
    usize,
    *mut *mut C_tensor,
    *mut usize,
    *mut *mut C_tensor,
    *mut usize,
    *mut c_char,
    usize,
) -> c_int;

type BackwardCallback = unsafe extern "C" fn(
    *mut c_void,
    *const *const C_tensor,
    usize,
    *const *const C_tensor,
    usize,
    *mut *mut C_tensor,
    usize,
    *mut c_char,
    usize,
) -> c_int;

type DropCallback = unsafe extern "C" fn(*mut c_void);

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn glatrain_custom_op_apply(
        op: *mut c_void,
        forward: ForwardCallback,
        backward: BackwardCallback,
        drop: DropCallback,
        inputs: *const *const C_tensor,
        n: usize,
        outputs: *mut *mut C_tensor,
        n_outputs: *mut usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// The op object as the shim holds it: a thin pointer to the boxed trait object.
type OpBox = Box<dyn CustomOp>;

/// Runs `op` on `inputs` as an autograd function and returns its outputs.
///
/// # Errors
/// The op's forward error, or libtorch's.
pub fn apply(op: Box<dyn CustomOp>, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let ptrs: Vec<*const C_tensor> = inputs
        .iter()
        .map(|t| t.map_or(std::ptr::null(), |t| t.as_ptr()))
        .collect();
    let op = Box::into_raw(Box::new(op)) as *mut c_void;
    let mut outputs = [std::ptr::null_mut::<C_tensor>(); MAX_TENSORS];
    let mut n_outputs = 0usize;
    // SAFETY: every input pointer is a live tch tensor or null; the callbacks match the shim's
    // signatures; the shim owns `op` from here on and frees it through `drop_op` (also when the
    // call fails); on success it hands over `n_outputs` new tensors, taken below.
    checked(|err, len| unsafe {
        glatrain_custom_op_apply(
            op,
            forward_op,
            backward_op,
            drop_op,
            ptrs.as_ptr(),
            ptrs.len(),
            outputs.as_mut_ptr(),
            &mut n_outputs,
            err,
            len,
        )
    })?;
    // SAFETY: the shim returned `n_outputs` `new at::Tensor`s whose ownership passes to us.
    Ok(outputs[..n_outputs]
        .iter()
        .map(|&p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

/// Tensors the shim lends for the duration of a callback, never freed here.
///
/// # Safety
/// Each non-null pointer must point to a live `at::Tensor` while the result is used.
unsafe fn borrow_all(ptrs: *const *const C_tensor, n: usize) -> Vec<Option<ManuallyDrop<Tensor>>> {
    (0..n)
        .map(|i| {
            // SAFETY: the shim passes `n` readable pointers.
            let p = unsafe { *ptrs.add(i) };
            // SAFETY: per the contract; ManuallyDrop keeps tch from freeing the shim's tensor.
            (!p.is_null())
                .then(|| ManuallyDrop::new(unsafe { Tensor::from_ptr(p as *mut C_tensor) }))
        })
        .collect()
}

fn as_refs(ts: &[Option<ManuallyDrop<Tensor>>]) -> Vec<Option<&Tensor>> {
    ts.iter().map(|t| t.as_deref()).collect()
}

/// Gives a tensor to the shim, which takes ownership.
fn hand_over(t: Tensor) -> *mut C_tensor {
    let mut t = ManuallyDrop::new(t);
    t.as_mut_ptr()
}

/// Writes `msg` NUL-terminated into the shim's buffer; returns the failure status.
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
fn guarded(err: *mut c_char, len: usize, body: impl FnOnce() -> Result<(), String>) -> c_int {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => report(&e, err, len),
        Err(payload) => {
            let what = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            report(&format!("panic inside a custom op: {what}"), err, len)
        }
    }
}

/// # Safety
/// Called by the shim with the op object [`apply`] made and arrays of the stated lengths.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn forward_op(
    op: *mut c_void,
    inputs: *const *const C_tensor,
    n_inputs: usize,
    outputs: *mut *mut C_tensor,
    n_outputs: *mut usize,
    saved: *mut *mut C_tensor,
    n_saved: *mut usize,
    err: *mut c_char,
    len: usize,
) -> c_int {
    guarded(err, len, || {
        // SAFETY: `op` is the live OpBox made by `apply`; the inputs are borrowed for this call.
        let (op, inputs) = unsafe { (&*(op as *const OpBox), borrow_all(inputs, n_inputs)) };
        let out = op.forward(&as_refs(&inputs))?;
        if out.outputs.len() > MAX_TENSORS || out.saved.len() > MAX_TENSORS {
            return Err(format!(
                "a custom op returned {} outputs and {} saved tensors; at most {MAX_TENSORS} each",
                out.outputs.len(),
                out.saved.len()
            ));
        }
        // SAFETY: the shim's arrays hold MAX_TENSORS entries; it takes ownership of what is
        // written.
        unsafe {
            *n_outputs = out.outputs.len();
            *n_saved = out.saved.len();
            for (i, t) in out.outputs.into_iter().enumerate() {
                *outputs.add(i) = hand_over(t);
            }
            for (i, t) in out.saved.into_iter().enumerate() {
                if let Some(t) = t {
                    *saved.add(i) = hand_over(t);
                }
            }
        }
        Ok(())
    })
}

/// # Safety
/// As [`forward_op`].
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn backward_op(
    op: *mut c_void,
    saved: *const *const C_tensor,
    n_saved: usize,
    grads: *const *const C_tensor,
    n_grads: usize,
    grad_inputs: *mut *mut C_tensor,
    n_inputs: usize,
    err: *mut c_char,
    len: usize,
) -> c_int {
    guarded(err, len, || {
        // SAFETY: as in forward_op.
        let (op, saved, grads) = unsafe {
            (
                &*(op as *const OpBox),
                borrow_all(saved, n_saved),
                borrow_all(grads, n_grads),
            )
        };
        let out = op.backward(&as_refs(&saved), &as_refs(&grads))?;
        if out.len() != n_inputs {
            return Err(format!(
                "a custom op's backward returned {} gradients for {n_inputs} inputs",
                out.len()
            ));
        }
        for (i, t) in out.into_iter().enumerate() {
            if let Some(t) = t {
                // SAFETY: the shim's array holds `n_inputs` entries and takes ownership.
                unsafe { *grad_inputs.add(i) = hand_over(t) };
            }
        }
        Ok(())
    })
}

/// # Safety
/// Called once by the shim with the op object [`apply`] made.
unsafe extern "C" fn drop_op(op: *mut c_void) {
    // SAFETY: `op` came from Box::into_raw in `apply` and is dropped exactly once.
    drop(unsafe { Box::from_raw(op as *mut OpBox) });
}

/// The gradients of `inputs` from `output` with the output gradient `grad_output` (same shape):
/// what `output.backward(grad_output)` computes, returned instead of accumulated into the inputs'
/// `.grad`. An input `output` does not depend on gets an undefined tensor.
///
/// # Errors
/// libtorch's message (an input without `requires_grad`, a shape mismatch, ...).
pub fn grad(
    output: &Tensor,
    grad_output: &Tensor,
    inputs: &[&Tensor],
) -> Result<Vec<Tensor>, String> {
    let ptrs: Vec<*const C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut grads: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); inputs.len()];
    // SAFETY: every pointer is a live tch tensor for the call; `grads` has room for one result
    // per input; on success the shim hands over that many new tensors, taken below.
    checked(|err, len| unsafe {
        glatrain_grad(
            output.as_ptr(),
            grad_output.as_ptr(),
            ptrs.as_ptr(),
            ptrs.len(),
            grads.as_mut_ptr(),
            err,
            len,
        )
    })?;
    // SAFETY: the shim returned `new at::Tensor`s whose ownership passes to us.
    Ok(grads
        .into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect())
}

/// `output.backward(grad_output)`: accumulates the gradients of the leaves `output` depends on
/// into their `.grad`. May be called from inside a [`CustomOp::backward`] (a reentrant backward:
/// how activation checkpointing runs the backward of a recomputed block).
///
/// # Errors
/// libtorch's message.
pub fn backward(output: &Tensor, grad_output: &Tensor) -> Result<(), String> {
    // SAFETY: both pointers are live tch tensors for the call.
    checked(|err, len| unsafe {
        glatrain_backward(output.as_ptr(), grad_output.as_ptr(), err, len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn backward_accumulates_the_given_output_gradient() {
        let x = Tensor::randn([3, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let dy = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        for _ in 0..2 {
            backward(&(&x * &x * 3.0), &dy).unwrap();
        }
        // Twice d(3 x^2) = 6 x dy, accumulated.
        let want = &x.detach() * 12.0 * &dy;
        assert!(x.grad().allclose(&want, 1e-12, 1e-12, false));
        let err = backward(&(&x * 2.0), &Tensor::ones([5], (Kind::Double, Device::Cpu)));
        assert!(err.is_err());
    }

    #[test]
    fn gradients_follow_the_given_output_gradient() {
        let x = Tensor::randn([3, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let unused = Tensor::randn([2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let y = &x * &x * 3.0;
        let dy = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let grads = grad(&y, &dy, &[&x, &unused]).unwrap();
        // d(3 x^2) = 6 x dy; nothing accumulated into x.grad.
        let want = &x.detach() * 6.0 * &dy;
        assert!(grads[0].allclose(&want, 1e-12, 1e-12, false));
        assert!(!grads[1].defined());
        assert!(!x.grad().defined());
    }

    #[test]
    fn libtorch_errors_come_back_as_messages() {
        let x = Tensor::randn([3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let y = &x * 2.0;
        let err = grad(&y, &Tensor::ones([4], (Kind::Double, Device::Cpu)), &[&x]).unwrap_err();
        assert!(err.contains("shape") || err.contains("size"), "{err}");
    }

    /// y = x * w (+ b), with a second output s = sum(y); the backward by hand.
    struct ScaleOp {
        drops: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        fail_backward: bool,
    }

    impl Drop for ScaleOp {
        fn drop(&mut self) {
            self.drops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl CustomOp for ScaleOp {
        fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
            let (x, w, b) = (inputs[0].unwrap(), inputs[1].unwrap(), inputs[2]);
            let mut y = x * w;
            if let Some(b) = b {
                y += b;
            }
            let s = y.sum(Kind::Double);
            Ok(Forward {
                outputs: vec![y, s],
                saved: vec![Some(x.shallow_clone()), Some(w.shallow_clone()), None],
            })
        }

        fn backward(
            &self,
            saved: &[Option<&Tensor>],
            grads: &[Option<&Tensor>],
        ) -> Result<Vec<Option<Tensor>>, String> {
            if self.fail_backward {
                return Err("backward refused on purpose".into());
            }
            assert!(saved[2].is_none());
            let (x, w) = (saved[0].unwrap(), saved[1].unwrap());
            // dL/dy from both outputs: y's own gradient, plus s's broadcast.
            let mut dy = grads[0].map_or_else(|| x.zeros_like(), |g| g.shallow_clone());
            if let Some(ds) = grads[1] {
                dy += ds;
            }
            Ok(vec![Some(&dy * w), Some(&dy * x), Some(dy)])
        }
    }

    #[test]
    fn custom_ops_take_part_in_autograd() {
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let w = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let b = Tensor::randn([3, 4], opts).set_requires_grad(true);
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let op = ScaleOp {
            drops: drops.clone(),
            fail_backward: false,
        };
        let outs = apply(Box::new(op), &[Some(&x), Some(&w), Some(&b)]).unwrap();
        assert_eq!(outs.len(), 2);
        let dy = Tensor::randn([3, 4], opts);
        let loss = (&outs[0] * &dy).sum(Kind::Double) + &outs[1] * 2.0;
        loss.backward();
        let g = &dy + 2.0;
        assert!(x.grad().allclose(&(&g * &w), 1e-12, 1e-12, false));
        assert!(w.grad().allclose(&(&g * &x), 1e-12, 1e-12, false));
        assert!(b.grad().allclose(&g, 1e-12, 1e-12, false));
        drop(outs);
        drop(loss);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn absent_inputs_and_unused_outputs() {
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([5], opts).set_requires_grad(true);
        let w = Tensor::randn([5], opts);
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let op = ScaleOp {
            drops,
            fail_backward: false,
        };
        let outs = apply(Box::new(op), &[Some(&x), Some(&w), None]).unwrap();
        // Only the second output is used: the first one's gradient comes back as None.
        outs[1].backward();
        assert!(x.grad().allclose(&w, 1e-12, 1e-12, false));
    }

    #[test]
    fn backward_errors_reach_the_caller() {
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([2], opts).set_requires_grad(true);
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let op = ScaleOp {
            drops: drops.clone(),
            fail_backward: true,
        };
        let outs = apply(Box::new(op), &[Some(&x), Some(&x), None]).unwrap();
        let err = outs[1].f_backward().unwrap_err().to_string();
        assert!(err.contains("backward refused on purpose"), "{err}");
        let err = apply(
            Box::new(ScaleOp {
                drops: drops.clone(),
                fail_backward: false,
            }),
            &[None, None, None],
        )
        .unwrap_err();
        assert!(err.contains("panic inside a custom op"), "{err}");
        drop(outs);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
