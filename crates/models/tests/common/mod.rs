//! What the models' integration tests share.

use tch::{nn, Tensor};

/// Every parameter's gradient (sorted by name), taken out: the parameters' gradients are zero
/// afterwards.
pub fn take_gradients(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut grads: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, mut v)| {
            let g = v.grad().copy();
            v.zero_grad();
            (name, g)
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}
