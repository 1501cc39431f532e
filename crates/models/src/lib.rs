//! The model zoo: gated linear attention (flash-linear-attention's `GLAForCausalLM` layout),
//! the Transformer++ and Mamba baselines, all behind one trait with full-sequence and
//! step-by-step (cached) forward passes.
//!
//! Variable paths mirror checkpoint keys (`model.layers.0.attn.q_proj.weight`, ...), so a
//! VarStore saved as safetensors exchanges weights with the Python implementations.
//!
//! Precision: build in fp32 and run under autocast, or cast the whole VarStore. Norms, gates and
//! the sequence-mixing ops compute in fp32 and cast back to the activation dtype; logits are
//! always returned in fp32.

pub mod attention_block;
pub mod cache;
pub mod checkpoint;
pub mod conv;
pub mod documents;
pub mod error;
pub mod gla;
pub mod language_model;
pub mod linear;
pub mod mamba;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod rope;
pub mod transformer;

pub use cache::DecodeCache;
pub use error::ModelError;
pub use params::{count_parameters, no_weight_decay};

use glatrain_config::{ActivationCheckpointing, GlaMode, ModelConfig};
pub use glatrain_ops::Documents;
use tch::{nn, Tensor};

/// A causal language model.
pub trait CausalLm: Send {
    /// The model's config.
    fn config(&self) -> &ModelConfig;

    /// The final hidden states (after the last norm) of whole sequences: what the output
    /// projection turns into logits. Training computes its loss from them without the full
    /// logits (`glatrain_ops::loss`).
    ///
    /// With `documents`, each document of a row is computed as if it were alone (no state,
    /// attention or convolution crosses a boundary); without, each row is one sequence.
    ///
    /// # Shapes
    /// `tokens: [B, T]` (i64) -> `[B, T, hidden]`; `documents` of `B` rows of `T` tokens.
    fn hidden_states(&self, tokens: &Tensor, documents: Option<&Documents>) -> Tensor;

    /// The output projection's weight, `[vocab, hidden]`: `lm_head.weight`, or the embedding
    /// table when tied.
    fn output_weight(&self) -> &Tensor;

    /// What [`CausalLm::hidden_states`] keeps for the backward from now on ([`checkpoint`]);
    /// `None` (keep everything) until set.
    fn set_activation_checkpointing(&mut self, mode: ActivationCheckpointing);

    /// Logits for every position of whole sequences.
    ///
    /// # Shapes
    /// `tokens: [B, T]` (i64) -> `[B, T, vocab]` fp32.
    fn forward(&self, tokens: &Tensor) -> Tensor {
        logits(&self.hidden_states(tokens, None), self.output_weight())
    }

    /// An empty decoding cache for `batch` sequences.
    fn new_cache(&self, batch: i64) -> DecodeCache;

    /// Logits for `tokens` following what `cache` has consumed; extends the cache with them.
    /// On an empty cache this equals [`CausalLm::forward`] (a prefill).
    ///
    /// # Shapes
    /// `tokens: [B, T]` -> `[B, T, vocab]` fp32.
    ///
    /// # Panics
    /// When `cache` was made by another model family or for another batch size.
    fn forward_cached(&self, tokens: &Tensor, cache: &mut DecodeCache) -> Tensor;

    /// One decoding step.
    ///
    /// # Shapes
    /// `tokens: [B]` -> `[B, vocab]` fp32.
    ///
    /// # Panics
    /// As [`CausalLm::forward_cached`].
    fn step(&self, tokens: &Tensor, cache: &mut DecodeCache) -> Tensor {
        self.forward_cached(&tokens.unsqueeze(1), cache)
            .squeeze_dim(1)
    }
}

/// Logits of hidden states `h` through the output weight `w` (`[vocab, hidden]`), in fp32.
pub fn logits(h: &Tensor, w: &Tensor) -> Tensor {
    h.linear(w, None::<&Tensor>).to_kind(tch::Kind::Float)
}

/// Checks that `cfg` describes a buildable model; errors name the `[model]` key and its value.
pub fn validate(cfg: &ModelConfig) -> Result<(), ModelError> {
    match cfg {
        ModelConfig::Gla(c) => gla::validate(c),
        ModelConfig::Transformer(c) => transformer::validate(c),
        ModelConfig::Mamba(c) => mamba::validate(c),
    }
}

/// Builds the model of `cfg`, creating its variables under `vs` (the VarStore's root for
/// checkpoint-compatible names) with the reference initialisation. `mode` is the GLA layers'
/// mode as the preflight resolved it; the baselines do not use it.
pub fn build(
    vs: &nn::Path,
    cfg: &ModelConfig,
    mode: GlaMode,
) -> Result<Box<dyn CausalLm>, ModelError> {
    Ok(match cfg {
        ModelConfig::Gla(c) => Box::new(gla::GlaModel::new(vs, c, mode)?),
        ModelConfig::Transformer(c) => Box::new(transformer::TransformerModel::new(vs, c)?),
        ModelConfig::Mamba(c) => Box::new(mamba::MambaModel::new(vs, c)?),
    })
}
