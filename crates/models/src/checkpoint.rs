//! Activation checkpointing (`train.activation_checkpointing`): a residual block keeps less for
//! the backward and runs (part of) its forward again there.
//!
//! - `full` keeps the block's input only. The backward runs the block's forward again with
//!   gradients on, then that graph's backward (a reentrant backward from inside the op's own, as
//!   PyTorch's `checkpoint(use_reentrant=True)`): parameter gradients accumulate into `.grad`
//!   as usual and the input's gradient goes on down the model. The recomputation is the same
//!   computation, so the gradients are the plain ones bit for bit (deterministic kernels).
//! - `selective` also keeps the outputs of the block's matrix products (its [`Linear`] layers):
//!   the forward records them on a [`tape`], and the recomputation takes them from it instead of
//!   multiplying again, recomputing only the norms, the sequence mixer (GLA, attention, the
//!   scan) and the elementwise work. A taped product's backward is the matmul's backward.
//!
//! Autocast is per thread and libtorch's backward threads run outside any region, so the
//! recomputation enters one when the forward ran in one.
//!
//! [`Linear`]: crate::linear::Linear

use std::sync::{Arc, Mutex, MutexGuard};

use glatrain_config::ActivationCheckpointing;
use glatrain_shim::autocast::{autocast, autocast_enabled};
use glatrain_shim::autograd::{apply, backward, CustomOp, Forward, MAX_TENSORS};
use tch::Tensor;

pub mod tape;

/// A residual block owned jointly by its model and by the autograd graphs of checkpointed
/// forwards, which run it again in the backward (on libtorch's threads).
#[derive(Debug)]
pub struct Shared<B>(Arc<Mutex<B>>);

impl<B> Shared<B> {
    /// Shares `block`.
    pub fn new(block: B) -> Self {
        Self(Arc::new(Mutex::new(block)))
    }

    /// The block. Never contended: the forward and the backward of a step take turns.
    pub fn lock(&self) -> MutexGuard<'_, B> {
        // A panic while the block was in use leaves nothing half-updated (a forward only reads).
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

/// `block(x)` under `mode`. Outside training (`x` without gradient) nothing is kept anyway, and
/// the block runs plainly.
///
/// # Panics
/// When the block's forward fails, or (selective) when it has more matrix products than an op
/// can keep (15).
pub fn forward(
    mode: ActivationCheckpointing,
    x: &Tensor,
    block: impl Fn(&Tensor) -> Tensor + Send + 'static,
) -> Tensor {
    if mode == ActivationCheckpointing::None || !x.requires_grad() {
        return block(x);
    }
    let op = Recompute {
        block: Mutex::new(Box::new(block)),
        mode,
        autocast: autocast_enabled(),
    };
    apply(Box::new(op), &[Some(x)])
        .map(|mut outputs| outputs.remove(0))
        .unwrap_or_else(|e| panic!("a checkpointed block failed: {e}"))
}

/// A block's forward over whole sequences, as a checkpointed op keeps it for the backward.
type BlockFn = Box<dyn Fn(&Tensor) -> Tensor + Send>;

/// The op a checkpointed block runs as: its forward keeps the input (and, selective, the tape),
/// its backward recomputes and back-propagates.
struct Recompute {
    block: Mutex<BlockFn>,
    mode: ActivationCheckpointing,
    /// Whether the forward ran in an autocast region.
    autocast: bool,
}

impl Recompute {
    fn run(&self, x: &Tensor) -> Tensor {
        let block = self.block.lock().unwrap_or_else(|p| p.into_inner());
        if self.autocast {
            autocast(|| block(x))
        } else {
            block(x)
        }
    }
}

impl CustomOp for Recompute {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let x = inputs[0].ok_or("a checkpointed block needs its input")?;
        // Autograd's Function runs this without gradients: nothing inside keeps activations.
        let (y, products) = match self.mode {
            ActivationCheckpointing::Selective => tape::record(|| self.run(x)),
            _ => (self.run(x), Vec::new()),
        };
        if products.len() >= MAX_TENSORS {
            return Err(format!(
                "a block with {} matrix products cannot be checkpointed selectively (at most {})",
                products.len(),
                MAX_TENSORS - 1
            ));
        }
        let saved = std::iter::once(x.shallow_clone())
            .chain(products)
            .map(Some)
            .collect();
        Ok(Forward {
            outputs: vec![y],
            saved,
        })
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grad_outputs: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let Some(grad) = grad_outputs[0] else {
            return Ok(vec![None]);
        };
        let x = saved[0]
            .ok_or("a checkpointed block lost its input")?
            .detach()
            .set_requires_grad(true);
        let products: Vec<Tensor> = saved[1..]
            .iter()
            .map(|t| {
                t.map(Tensor::shallow_clone)
                    .ok_or("a taped product is missing")
            })
            .collect::<Result<_, _>>()?;
        let y = tch::with_grad(|| match self.mode {
            ActivationCheckpointing::Selective => tape::replay(products, || self.run(&x)),
            _ => Ok(self.run(&x)),
        })?;
        backward(&y, grad)?;
        Ok(vec![Some(x.grad())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Linear;
    use glatrain_testing::Rng;
    use tch::{nn, Device, Kind};

    /// `x + w2(relu(w1(x)))`: a residual block with two products.
    struct Tiny {
        w1: Linear,
        w2: Linear,
    }

    impl Tiny {
        fn forward(&self, x: &Tensor) -> Tensor {
            x + self.w2.forward(&self.w1.forward(x).relu())
        }
    }

    fn grads(mode: ActivationCheckpointing) -> (Vec<Tensor>, Tensor) {
        let mut rng = Rng::new(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut var = |name: &str, shape: &[i64]| {
            let init = rng.randn(shape, Kind::Float) * 0.3;
            vs.root().var_copy(name, &init)
        };
        let block = Shared::new(Tiny {
            w1: Linear {
                weight: var("w1", &[10, 6]),
                bias: Some(var("b1", &[10])),
            },
            w2: Linear {
                weight: var("w2", &[6, 10]),
                bias: None,
            },
        });
        let x0 = rng.randn(&[2, 5, 6], Kind::Float).set_requires_grad(true);
        let mut x = &x0 * 1.5;
        for _ in 0..3 {
            let b = block.clone();
            x = forward(mode, &x, move |x| b.lock().forward(x));
        }
        x.square().sum(Kind::Float).backward();
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        (v.into_iter().map(|(_, t)| t.grad()).collect(), x0.grad())
    }

    #[test]
    fn full_and_selective_gradients_equal_the_plain_ones_bit_for_bit() {
        let (plain, plain_x) = grads(ActivationCheckpointing::None);
        for mode in [
            ActivationCheckpointing::Full,
            ActivationCheckpointing::Selective,
        ] {
            let (got, got_x) = grads(mode);
            assert!(got_x.equal(&plain_x), "{mode:?}: input gradient");
            for (g, p) in got.iter().zip(&plain) {
                assert!(g.defined() && g.equal(p), "{mode:?}: parameter gradient");
            }
        }
    }

    #[test]
    fn without_gradients_the_block_runs_plainly() {
        let x = Tensor::randn([3], (Kind::Float, Device::Cpu));
        let y = forward(ActivationCheckpointing::Full, &x, |x| x * 2.0);
        assert!(y.equal(&(&x * 2.0)));
    }
}
