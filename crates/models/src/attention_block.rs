//! The residual block of GLA and Transformer++ (`attn_norm`, `attn`, `mlp_norm`, `mlp`): each
//! family implements [`crate::language_model::Block`] for it with its own attention. Each norm
//! runs with the projections that read its output as one op, which keeps no normed copy.

use crate::linear::ProjectedInput;
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

    /// The block on `x`, `attend` running the attention on the outputs of its input
    /// projections (each computed with the norm, [`RmsNorm::forward_into`]).
    pub(crate) fn forward_with(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&A, &[Tensor]) -> Tensor,
    ) -> Tensor
    where
        A: ProjectedInput,
    {
        let x = x + attend(&self.attn, &self.attn_norm.forward_into(x, &self.attn));
        let inputs = self.mlp_norm.forward_into(&x, &self.mlp);
        &x + self.mlp.forward(&inputs[0], &inputs[1])
    }
}
