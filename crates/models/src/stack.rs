//! What every model family shares around its blocks: the token embeddings, the residual blocks
//! (run through activation checkpointing for whole sequences, or one by one against a decoding
//! cache), the final norm and the output head.

use glatrain_config::ActivationCheckpointing;
use tch::Tensor;

use crate::checkpoint::{self, Shared};
use crate::linear::{Embedding, LmHead};
use crate::norm::RmsNorm;

/// A residual block of one model family, as the stack runs it.
pub trait Block: Send + 'static {
    /// What the block carries from one decoding call to the next.
    type Cache: Default;
    /// What every block of one forward shares (the Transformer's rotary table and position;
    /// nothing for the recurrent families).
    type Context: Send + 'static;

    /// `x + mixing(x)` and the MLP where the family has one; `cache` given when decoding.
    fn forward(
        &self,
        x: &Tensor,
        context: &Self::Context,
        cache: Option<&mut Self::Cache>,
    ) -> Tensor;

    /// Another handle on `context` (tensors shallow-cloned) for a checkpointed block, which
    /// runs again in the backward.
    fn share(context: &Self::Context) -> Self::Context;
}

/// Embeddings, blocks, final norm and output head of a causal language model.
#[derive(Debug)]
pub struct Stack<B> {
    embeddings: Embedding,
    layers: Vec<Shared<B>>,
    norm: RmsNorm,
    lm_head: LmHead,
    checkpointing: ActivationCheckpointing,
}

impl<B: Block> Stack<B> {
    /// The stack of `layers`, without checkpointing until [`Stack::set_checkpointing`].
    pub fn new(embeddings: Embedding, layers: Vec<B>, norm: RmsNorm, lm_head: LmHead) -> Self {
        Self {
            embeddings,
            layers: layers.into_iter().map(Shared::new).collect(),
            norm,
            lm_head,
            checkpointing: ActivationCheckpointing::None,
        }
    }

    /// The final hidden states of `tokens`, continuing from (and updating) `caches` when given.
    pub fn hidden(
        &self,
        tokens: &Tensor,
        context: &B::Context,
        caches: Option<&mut [B::Cache]>,
    ) -> Tensor {
        let mut x = self.embeddings.forward(tokens);
        match caches {
            Some(caches) => {
                for (layer, cache) in self.layers.iter().zip(caches) {
                    x = layer.lock().forward(&x, context, Some(cache));
                }
            }
            None => {
                for layer in &self.layers {
                    let (layer, context) = (layer.clone(), B::share(context));
                    x = checkpoint::forward(self.checkpointing, &x, move |x| {
                        layer.lock().forward(x, &context, None)
                    });
                }
            }
        }
        self.norm.forward(&x)
    }

    /// Logits (fp32) of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden, &self.embeddings)
    }

    /// `lm_head.weight`, or the embedding table when tied.
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.weight(&self.embeddings)
    }

    /// What [`Stack::hidden`] keeps for the backward from now on.
    pub fn set_checkpointing(&mut self, mode: ActivationCheckpointing) {
        self.checkpointing = mode;
    }

    /// An empty decoding cache per block.
    pub fn new_caches(&self) -> Vec<B::Cache> {
        self.layers.iter().map(|_| B::Cache::default()).collect()
    }
}
