//! The tape of selective checkpointing: the outputs of a block's matrix products, recorded in
//! the forward and handed back, in the same order, when the backward runs the block again.
//!
//! It lives in a thread-local: the forward records on the thread that runs the model, the
//! recomputation replays on the libtorch backward thread that runs the checkpointed op's
//! backward. [`products`] is where the layers meet it; [`linear`], for a plain product.

use std::cell::RefCell;
use std::sync::Mutex;

use crate::linear::autocast_input;
use glatrain_shim::autograd::{apply, CustomOp, Forward};
use tch::Tensor;

enum Tape {
    Recording(Vec<Tensor>),
    Replaying(std::vec::IntoIter<Tensor>),
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Puts `tape` in place for the current thread and takes it back (also on a panic).
struct Installed;

impl Installed {
    fn new(tape: Tape) -> Self {
        TAPE.with(|t| *t.borrow_mut() = Some(tape));
        Self
    }

    fn take(self) -> Option<Tape> {
        TAPE.with(|t| t.borrow_mut().take())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        TAPE.with(|t| t.borrow_mut().take());
    }
}

/// Runs `f`, recording the output of every [`linear`] it calls; returns them in call order.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<Tensor>) {
    let installed = Installed::new(Tape::Recording(Vec::new()));
    let out = f();
    match installed.take() {
        Some(Tape::Recording(products)) => (out, products),
        _ => (out, Vec::new()),
    }
}

/// Runs `f`, which must make the calls to [`linear`] that [`record`] saw, in the same order, and
/// gives each its recorded output back.
///
/// # Errors
/// When `f` leaves recorded products unused (it ran differently from the recorded forward).
pub fn replay<T>(products: Vec<Tensor>, f: impl FnOnce() -> T) -> Result<T, String> {
    let installed = Installed::new(Tape::Replaying(products.into_iter()));
    let out = f();
    match installed.take() {
        Some(Tape::Replaying(rest)) if rest.len() > 0 => {
            Err("the recomputed block made fewer matrix products than its forward recorded".into())
        }
        _ => Ok(out),
    }
}

/// The `count` matrix products made by `compute`, recorded or replayed when a tape is in place:
/// recording (and outside a tape) `compute(None)` multiplies, and its outputs are recorded;
/// replaying, `compute(Some(recorded))` must return the recorded outputs as its own, with the
/// products' backward.
///
/// # Panics
/// When replaying and the tape has fewer than `count` products left (the recomputation
/// diverged).
pub fn products(
    count: usize,
    compute: impl FnOnce(Option<Vec<Tensor>>) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let replayed = TAPE.with(|t| match t.borrow_mut().as_mut() {
        Some(Tape::Replaying(products)) => Some(products.by_ref().take(count).collect::<Vec<_>>()),
        _ => None,
    });
    match replayed {
        None => {
            let outputs = compute(None);
            TAPE.with(|t| {
                if let Some(Tape::Recording(products)) = t.borrow_mut().as_mut() {
                    products.extend(outputs.iter().map(Tensor::shallow_clone));
                }
            });
            outputs
        }
        Some(recorded) if recorded.len() == count => compute(Some(recorded)),
        Some(_) => {
            panic!("the recomputed block made more matrix products than its forward recorded")
        }
    }
}

/// `x W^T (+ b)` through the tape ([`products`]). Under autocast the operands of a replayed
/// product are cast as autocast casts them, so it has the recorded one's dtype and its gradients
/// flow back through the same casts.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let mut outputs = products(1, |recorded| match recorded.and_then(|mut r| r.pop()) {
        None => vec![x.linear(w, b)],
        Some(y) => {
            let (x, w, b) = (autocast_input(x), autocast_input(w), b.map(autocast_input));
            let op = Replayed {
                product: Mutex::new(y),
                has_bias: b.is_some(),
            };
            apply(Box::new(op), &[Some(&x), Some(&w), b.as_ref()])
                .unwrap_or_else(|e| panic!("a replayed matrix product failed: {e}"))
        }
    });
    outputs.remove(0)
}

/// A recorded product `y = x W^T (+ b)` in the recomputed graph: its forward hands `y` back,
/// its backward is the matmul's (the same products libtorch's `mm` backward computes).
struct Replayed {
    product: Mutex<Tensor>,
    has_bias: bool,
}

impl CustomOp for Replayed {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let (x, w) = (inputs[0].ok_or("no input")?, inputs[1].ok_or("no weight")?);
        Ok(Forward {
            outputs: vec![self
                .product
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .detach()],
            saved: vec![Some(x.shallow_clone()), Some(w.shallow_clone())],
        })
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grad_outputs: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let (x, w) = (saved[0].ok_or("no input")?, saved[1].ok_or("no weight")?);
        let Some(g) = grad_outputs[0] else {
            return Ok(vec![None, None, None]);
        };
        let (n_in, n_out) = (w.size()[1], w.size()[0]);
        let g2 = g.reshape([-1, n_out]);
        let x2 = x.reshape([-1, n_in]);
        let grad_x = g2.mm(w).reshape(x.size());
        let grad_w = g2.tr().mm(&x2);
        let grad_b = self
            .has_bias
            .then(|| g2.sum_dim_intlist(0, false, g2.kind()));
        Ok(vec![Some(grad_x), Some(grad_w), grad_b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn replay_hands_back_the_recorded_products_in_order() {
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let block = || linear(&x, &w, None) + linear(&(&x * 2.0), &w, None) * 10.0;
        let (y, products) = record(block);
        assert_eq!(products.len(), 2);
        assert!(y.allclose(&(&products[0] + &products[1] * 10.0), 0.0, 0.0, false));
        // Outside a tape nothing is recorded.
        assert!(linear(&x, &w, None).equal(&products[0]));
        let stand_ins = vec![products[0].ones_like(), products[1].zeros_like()];
        let replayed = replay(stand_ins, block).unwrap();
        assert!(replayed.equal(&y.ones_like()));
        let err = replay(products, || linear(&x, &w, None)).unwrap_err();
        assert!(err.contains("fewer"), "{err}");
    }
}
