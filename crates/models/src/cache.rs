//! The decoding cache shared by every model: per-layer recurrent / convolution / key-value
//! states plus the number of tokens already consumed.

use std::any::Any;
use std::fmt;

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

/// One entry per layer, of the type its family's blocks carry
/// ([`crate::language_model::Block::Cache`]).
pub struct LayerCaches {
    family: &'static str,
    caches: Box<dyn Any + Send>,
}

impl LayerCaches {
    /// The entries of a `family` model.
    pub(crate) fn new<C: Send + 'static>(family: &'static str, caches: Vec<C>) -> Self {
        Self {
            family,
            caches: Box::new(caches),
        }
    }

    /// The entries, if they are `C`s (the cache was made by a model of that family).
    pub(crate) fn get<C: 'static>(&mut self) -> Option<&mut Vec<C>> {
        self.caches.downcast_mut()
    }
}

impl fmt::Debug for LayerCaches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerCaches({})", self.family)
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
            self.layers.family
        )
    }
}
