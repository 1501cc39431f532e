//! The residual block of GLA and Transformer++ (`attn_norm`, `attn`, `mlp_norm`, `mlp`): each
//! family implements [`crate::language_model::Block`] for it with its own attention.

use crate::linear::autocast_input;
use crate::mlp::SwiGlu;
use crate::norm::RmsNorm;
use tch::{nn, Tensor};

/// `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`.
#[derive(Debug)]
pub struct AttentionBlock<A> {
    attn_norm: RmsNorm,
    attn: A,
    mlp_norm: RmsNorm,
    mlp: SwiGlu,
}

impl<A> AttentionBlock<A> {
    /// The block's variables under `p`: the attention's made by `attn` under `p / "attn"`, the
    /// MLP's weights `N(0, std)`.
    pub(crate) fn new(
        p: &nn::Path,
        hidden: i64,
        norm_eps: f64,
        intermediate: i64,
        std: f64,
        attn: impl FnOnce(&nn::Path) -> A,
    ) -> Self {
        Self {
            attn_norm: RmsNorm::new(&(p / "attn_norm"), hidden, norm_eps),
            attn: attn(&(p / "attn")),
            mlp_norm: RmsNorm::new(&(p / "mlp_norm"), hidden, norm_eps),
            mlp: SwiGlu::new(&(p / "mlp"), hidden, intermediate, std),
        }
    }

    /// The block on `x`, `attend` running the attention on the normed input.
    pub(crate) fn forward_with(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&A, &Tensor) -> Tensor,
    ) -> Tensor {
        let h = autocast_input(&self.attn_norm.forward(x));
        let x = x + attend(&self.attn, &h);
        &x + self
            .mlp
            .forward(&autocast_input(&self.mlp_norm.forward(&x)))
    }
}
