//! Gradients from a given output gradient.
//!
//! tch's backward seeds the graph with ones; `o.backward(do)`, the way ANCHORS.md times a
//! forward+backward, needs the output gradient given. [`grad`] runs libtorch's
//! `torch::autograd::grad` through the C++ shim.

use std::ffi::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::shim::checked;

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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

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
}
