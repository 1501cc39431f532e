//! A causal language model as every family builds it: token embeddings, residual blocks (run
//! through activation checkpointing for whole sequences, or one by one against a decoding
//! cache), the final norm and the output head. A family supplies only its [`Block`].

use std::fmt;

use glatrain_config::{ActivationCheckpointing, ModelConfig};
use tch::Tensor;

use crate::cache::{DecodeCache, LayerCaches};
use crate::checkpoint::{self, Shared};
use crate::linear::{Embedding, LmHead};
use crate::norm::RmsNorm;
use crate::{CausalLm, Documents};

/// What every block of one forward shares (the Transformer's rotary table and position;
/// nothing for the recurrent families), made from what the model keeps.
pub trait ContextSettings: fmt::Debug + Send {
    /// The shared part of one forward.
    type Context: Send + 'static;

    /// The context of a forward over `tokens` (`[B, T]`) whose first position is `past`, made
    /// of the `documents` in its rows when given.
    fn context(&self, tokens: &Tensor, past: i64, documents: Option<&Documents>) -> Self::Context;

    /// Another handle on `context` (tensors shallow-cloned) for a checkpointed block, which
    /// runs again in the backward.
    fn share(context: &Self::Context) -> Self::Context;
}

/// A forward's shared context for blocks `B`.
pub type Context<B> = <<B as Block>::Settings as ContextSettings>::Context;

/// A residual block of one model family, as [`LanguageModel`] runs it.
pub trait Block: fmt::Debug + Send + 'static {
    /// The family's name in messages ("gla", "transformer", "mamba").
    const FAMILY: &'static str;
    /// What the block carries from one decoding call to the next.
    type Cache: Default + Send + 'static;
    /// What the model keeps to make a forward's [`Context`].
    type Settings: ContextSettings;

    /// The block on `x`; `cache` is given when decoding.
    fn forward(
        &self,
        x: &Tensor,
        context: &Context<Self>,
        cache: Option<&mut Self::Cache>,
    ) -> Tensor;
}

/// The causal language model of blocks `B` ([`crate::gla::GlaModel`], ...).
#[derive(Debug)]
pub struct LanguageModel<B: Block> {
    config: ModelConfig,
    embeddings: Embedding,
    layers: Vec<Shared<B>>,
    norm: RmsNorm,
    lm_head: LmHead,
    settings: B::Settings,
    checkpointing: ActivationCheckpointing,
}

/// The parts of a [`LanguageModel`], as a family's constructor makes them.
pub(crate) struct Parts<B: Block> {
    pub config: ModelConfig,
    pub embeddings: Embedding,
    pub layers: Vec<B>,
    pub norm: RmsNorm,
    pub lm_head: LmHead,
    pub settings: B::Settings,
}

impl<B: Block> LanguageModel<B> {
    /// The model of `parts`, without checkpointing until set.
    pub(crate) fn assemble(parts: Parts<B>) -> Self {
        Self {
            config: parts.config,
            embeddings: parts.embeddings,
            layers: parts.layers.into_iter().map(Shared::new).collect(),
            norm: parts.norm,
            lm_head: parts.lm_head,
            settings: parts.settings,
            checkpointing: ActivationCheckpointing::None,
        }
    }

    /// The final hidden states of `tokens` at positions from `past` on, continuing from (and
    /// updating) `caches` when given, or made of `documents`.
    fn hidden(
        &self,
        tokens: &Tensor,
        past: i64,
        caches: Option<&mut [B::Cache]>,
        documents: Option<&Documents>,
    ) -> Tensor {
        let context = self.settings.context(tokens, past, documents);
        let mut x = self.embeddings.forward(tokens);
        match caches {
            Some(caches) => {
                for (layer, cache) in self.layers.iter().zip(caches) {
                    x = layer.lock().forward(&x, &context, Some(cache));
                }
            }
            None => {
                for layer in &self.layers {
                    let (layer, context) = (layer.clone(), B::Settings::share(&context));
                    x = checkpoint::forward(self.checkpointing, &x, move |x| {
                        layer.lock().forward(x, &context, None)
                    });
                }
            }
        }
        self.norm.forward(&x)
    }
}

impl<B: Block> CausalLm for LanguageModel<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn hidden_states(&self, tokens: &Tensor, documents: Option<&Documents>) -> Tensor {
        self.hidden(tokens, 0, None, documents)
    }

    fn output_weight(&self) -> &Tensor {
        self.lm_head.weight(&self.embeddings)
    }

    fn set_activation_checkpointing(&mut self, mode: ActivationCheckpointing) {
        self.checkpointing = mode;
    }

    fn new_cache(&self, batch: i64) -> DecodeCache {
        let caches = self.layers.iter().map(|_| B::Cache::default()).collect();
        DecodeCache::new(batch, LayerCaches::new(B::FAMILY, caches))
    }

    fn forward_cached(&self, tokens: &Tensor, cache: &mut DecodeCache) -> Tensor {
        let past = cache.advance(tokens);
        let caches = match cache.layers.get::<B::Cache>() {
            Some(caches) => caches,
            None => panic!("{}", cache.wrong_family(B::FAMILY)),
        };
        let hidden = self.hidden(tokens, past, Some(caches), None);
        self.lm_head.forward(&hidden, &self.embeddings)
    }
}
