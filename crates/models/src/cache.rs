//! The decoding cache shared by every model: per-layer recurrent / convolution / key-value
//! states plus the number of tokens already consumed.

use crate::gla::GlaLayerCache;
use crate::mamba::MambaLayerCache;
use crate::transformer::KvCache;
use tch::Tensor;

/// What a model remembers between decoding calls. Made by [`crate::CausalLm::new_cache`] and
/// only usable with the model that made it. States are allocated on the first call, in the
/// dtype and on the device of the activations.
#[derive(Debug)]
pub struct DecodeCache {
    batch: i64,
    len: i64,
    pub(crate) layers: LayerCaches,
}

/// One entry per layer, by model family.
#[derive(Debug)]
pub enum LayerCaches {
    Gla(Vec<GlaLayerCache>),
    Transformer(Vec<KvCache>),
    Mamba(Vec<MambaLayerCache>),
}

impl LayerCaches {
    fn family(&self) -> &'static str {
        match self {
            LayerCaches::Gla(_) => "gla",
            LayerCaches::Transformer(_) => "transformer",
            LayerCaches::Mamba(_) => "mamba",
        }
    }
}

impl DecodeCache {
    pub(crate) fn new(batch: i64, layers: LayerCaches) -> Self {
        Self {
            batch,
            len: 0,
            layers,
        }
    }

    /// Sequences decoded side by side.
    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// Tokens consumed so far (the position of the next token).
    pub fn len(&self) -> i64 {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `tokens` (`[B, T]`) fit this cache, advances the length by `T`, and returns
    /// the position of the first of them.
    ///
    /// # Panics
    /// When `tokens` is not `[batch, T]`.
    pub(crate) fn advance(&mut self, tokens: &Tensor) -> i64 {
        let size = tokens.size();
        assert!(
            size.len() == 2 && size[0] == self.batch,
            "tokens of shape {size:?} given to a decode cache for batch {}",
            self.batch
        );
        let start = self.len;
        self.len += size[1];
        start
    }

    /// Describes a family mismatch (a cache passed to another model).
    pub(crate) fn wrong_family(&self, model: &str) -> String {
        format!(
            "a {} decode cache was passed to a {model} model",
            self.layers.family()
        )
    }
}
