//! libtorch's multi-tensor kernels for the optimizer step, through the C++ shim: the fused AdamW
//! update, the global norm of many tensors, an in-place scale of many tensors, and dropping
//! gradients. tch binds none of them; done one tensor at a time, a 340M-parameter model's step
//! takes over two thousand small kernel launches and several passes over every parameter.

use std::ffi::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::checked::checked;

extern "C" {
    fn glatrain_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        n: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_global_norm(
        xs: *const *const C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_scale_all(
        xs: *const *const C_tensor,
        n: usize,
        factor: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_clear_grads(xs: *const *const C_tensor, n: usize);
}

/// AdamW's hyper-parameters for one update of one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (`p <- p (1 - lr wd)`).
    pub weight_decay: f64,
}

/// One tensor of an AdamW parameter group: the parameter, its gradient and its moments (all of
/// one dtype and device).
pub struct AdamWTensors<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
}

fn ptrs<'a>(xs: impl Iterator<Item = &'a Tensor>) -> Vec<*const C_tensor> {
    xs.map(|t| t.as_ptr()).collect()
}

/// One AdamW update of every tensor in `group`, in place (`torch.optim.AdamW` with `fused=True`,
/// `amsgrad` off): `p <- p (1 - lr wd)`, `m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`,
/// `p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, in fp32 arithmetic. `step`
/// is `t`, the update count including this one: an fp32 scalar on the tensors' device.
///
/// # Errors
/// libtorch's message (tensors of different dtypes, devices or shapes).
pub fn fused_adamw(group: &[AdamWTensors], step: &Tensor, hp: AdamWStep) -> Result<(), String> {
    let params = ptrs(group.iter().map(|t| t.param));
    let grads = ptrs(group.iter().map(|t| t.grad));
    let exp_avgs = ptrs(group.iter().map(|t| t.exp_avg));
    let exp_avg_sqs = ptrs(group.iter().map(|t| t.exp_avg_sq));
    checked(|err, len| {
        // SAFETY: four arrays of `group.len()` live tch tensors and a live scalar for the call;
        // the shim updates them in place and keeps none.
        unsafe {
            glatrain_fused_adamw(
                params.as_ptr(),
                grads.as_ptr(),
                exp_avgs.as_ptr(),
                exp_avg_sqs.as_ptr(),
                group.len(),
                step.as_ptr(),
                hp.lr,
                hp.beta1,
                hp.beta2,
                hp.weight_decay,
                hp.eps,
                err,
                len,
            )
        }
    })
}

/// The L2 norm of all of `xs` together, an fp32 scalar on their device (the norm of the
/// per-tensor norms, as `torch.nn.utils.clip_grad_norm_`); non-finite if any element is.
///
/// # Errors
/// libtorch's message (an empty list, tensors on different devices).
pub fn global_norm(xs: &[&Tensor]) -> Result<Tensor, String> {
    let ptrs = ptrs(xs.iter().copied());
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `xs.len()` live tch tensors for the call; on success the shim hands over one new
    // tensor, taken below.
    checked(|err, len| unsafe {
        glatrain_global_norm(ptrs.as_ptr(), ptrs.len(), &mut out, err, len)
    })?;
    // SAFETY: a `new at::Tensor` whose ownership passes to us.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Multiplies every tensor of `xs` in place by `factor`.
///
/// # Errors
/// libtorch's message (tensors on different devices).
pub fn scale_all(xs: &[&Tensor], factor: f64) -> Result<(), String> {
    let ptrs = ptrs(xs.iter().copied());
    // SAFETY: `xs.len()` live tch tensors for the call, scaled in place.
    checked(|err, len| unsafe { glatrain_scale_all(ptrs.as_ptr(), ptrs.len(), factor, err, len) })
}

/// Drops the gradients of `params` (`zero_grad(set_to_none=True)`): the next backward writes them
/// afresh instead of adding into zeros.
pub fn clear_grads(params: &[&Tensor]) {
    let ptrs = ptrs(params.iter().copied());
    // SAFETY: `params.len()` live tch tensors; only their gradient slots change.
    unsafe { glatrain_clear_grads(ptrs.as_ptr(), ptrs.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Relative RMS error at most `tol` (fp32 arithmetic: ~1e-7).
    fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
        glatrain_testing::rel_rms(a, b) <= tol
    }

    /// CPU, and the GPU where there is one (libtorch has a kernel for each).
    fn devices() -> Vec<Device> {
        let mut out = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            out.push(Device::Cuda(0));
        } else {
            println!("CUDA part skipped: no CUDA device");
        }
        out
    }

    /// The fused update against the same formulas in f64 tensor ops, over two steps and two odd
    /// shapes, with and without weight decay.
    #[test]
    fn fused_adamw_follows_the_adamw_formulas() {
        for device in devices() {
            adamw_on(device);
        }
    }

    fn adamw_on(device: Device) {
        let hp = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        for wd in [0.1, 0.0] {
            let hp = AdamWStep {
                weight_decay: wd,
                ..hp
            };
            let opts = (Kind::Float, device);
            let params = [Tensor::randn([7, 3], opts), Tensor::randn([5], opts)];
            let (m, v) = (
                params.each_ref().map(|p| p.zeros_like()),
                params.each_ref().map(|p| p.zeros_like()),
            );
            let mut want: Vec<[Tensor; 3]> = params
                .iter()
                .map(|p| {
                    [
                        p.to_kind(Kind::Double),
                        p.zeros_like().to_kind(Kind::Double),
                        p.zeros_like().to_kind(Kind::Double),
                    ]
                })
                .collect();
            for t in 1..=2 {
                let grads = params.each_ref().map(|p| p.randn_like());
                let group: Vec<AdamWTensors> = (0..2)
                    .map(|i| AdamWTensors {
                        param: &params[i],
                        grad: &grads[i],
                        exp_avg: &m[i],
                        exp_avg_sq: &v[i],
                    })
                    .collect();
                let step = Tensor::from(t as f32).to_device(device);
                fused_adamw(&group, &step, hp).unwrap();
                for (w, g) in want.iter_mut().zip(&grads) {
                    let g = g.to_kind(Kind::Double);
                    let [p, m, v] = w;
                    let p_new = &*p * (1.0 - hp.lr * wd);
                    let m_new = &*m * hp.beta1 + &g * (1.0 - hp.beta1);
                    let v_new = &*v * hp.beta2 + &g * &g * (1.0 - hp.beta2);
                    let bias1 = 1.0 - hp.beta1.powi(t);
                    let bias2 = (1.0 - hp.beta2.powi(t)).sqrt();
                    let denom = v_new.sqrt() / bias2 + hp.eps;
                    *p = p_new - &m_new / denom * (hp.lr / bias1);
                    *m = m_new;
                    *v = v_new;
                }
            }
            for i in 0..2 {
                for (got, want) in [&params[i], &m[i], &v[i]].into_iter().zip(&want[i]) {
                    assert!(close(got, want, 1e-6), "{device:?} wd {wd}");
                }
            }
        }
    }

    #[test]
    fn global_norm_is_the_norm_of_everything() {
        let a = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3], (Kind::Float, Device::Cpu));
        let want = Tensor::cat(&[a.flatten(0, -1), b.shallow_clone()], 0).norm();
        assert!(close(&global_norm(&[&a, &b]).unwrap(), &want, 1e-6));
        let _ = b.get(1).fill_(f64::INFINITY);
        assert!(!global_norm(&[&a, &b])
            .unwrap()
            .double_value(&[])
            .is_finite());
        assert!(global_norm(&[]).is_err());
    }

    #[test]
    fn scale_all_scales_in_place() {
        let a = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3], (Kind::Float, Device::Cpu));
        let (a0, b0) = (a.copy(), b.copy());
        scale_all(&[&a, &b], 0.25).unwrap();
        assert!(close(&a, &(a0 * 0.25), 1e-7));
        assert!(close(&b, &(b0 * 0.25), 1e-7));
    }

    #[test]
    fn cleared_gradients_are_written_afresh() {
        let p = Tensor::randn([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&p * 2.0).sum(Kind::Float).backward();
        assert!(p.grad().defined());
        clear_grads(&[&p]);
        assert!(!p.grad().defined());
        (&p * 3.0).sum(Kind::Float).backward();
        assert!(close(
            &p.grad(),
            &Tensor::full([3], 3.0, (Kind::Float, Device::Cpu)),
            0.0
        ));
    }
}
