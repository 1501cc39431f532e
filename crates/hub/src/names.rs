//! Parameter names: glatrain's VarStore paths against the names the Hugging Face class uses.
//!
//! | model type | Hugging Face class | renamed path segments (glatrain -> Hugging Face) |
//! |---|---|---|
//! | `gla` | fla's `GLAForCausalLM` | none |
//! | `transformer` | `LlamaForCausalLM` | `embeddings` -> `embed_tokens`, `attn_norm` -> `input_layernorm`, `attn` -> `self_attn`, `mlp_norm` -> `post_attention_layernorm` |
//! | `mamba` | `MambaForCausalLM` | none |
//!
//! A tied output head has no `lm_head.weight` on either side, as `save_pretrained` writes tied
//! models.

use glatrain_config::ModelConfig;

/// Transformer++ -> `LlamaForCausalLM`. Each renamed segment occurs nowhere else in the
/// model's names, so renaming whole segments is one to one.
pub const LLAMA_SEGMENTS: &[(&str, &str)] = &[
    ("embeddings", "embed_tokens"),
    ("attn_norm", "input_layernorm"),
    ("attn", "self_attn"),
    ("mlp_norm", "post_attention_layernorm"),
];

/// fla's GLA layer with an output gate names its norm `g_norm` instead of `g_norm_swish_gate`
/// when `fuse_norm` is off (the same function, computed unfused). Exports set `fuse_norm`;
/// imports of such directories use this map.
pub const GLA_UNFUSED_NORM_SEGMENTS: &[(&str, &str)] = &[("g_norm_swish_gate", "g_norm")];

/// Buffers some Hugging Face files carry that are not parameters (older `transformers` saved
/// the rotary frequencies); imports skip them as `from_pretrained` does.
const IGNORED_HF_SUFFIXES: &[&str] = &[".rotary_emb.inv_freq"];

/// The renaming between glatrain's names and one Hugging Face class's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameMap {
    /// (glatrain segment, Hugging Face segment) pairs.
    segments: &'static [(&'static str, &'static str)],
}

impl NameMap {
    /// The map of the class `model` is exported as.
    pub fn for_model(model: &ModelConfig) -> Self {
        let segments = match model {
            ModelConfig::Transformer(_) => LLAMA_SEGMENTS,
            ModelConfig::Gla(_) | ModelConfig::Mamba(_) => &[],
        };
        Self { segments }
    }

    /// A map renaming these segments.
    pub fn with_segments(segments: &'static [(&'static str, &'static str)]) -> Self {
        Self { segments }
    }

    /// The Hugging Face name of glatrain's parameter `name`.
    pub fn to_hf(&self, name: &str) -> String {
        self.rename(name, |(ours, hf)| (ours, hf))
    }

    /// The glatrain name of the Hugging Face parameter `name`.
    pub fn from_hf(&self, name: &str) -> String {
        self.rename(name, |(ours, hf)| (hf, ours))
    }

    /// Whether the Hugging Face tensor `name` is a buffer that imports skip.
    pub fn is_ignored_hf(name: &str) -> bool {
        IGNORED_HF_SUFFIXES.iter().any(|s| name.ends_with(s))
    }

    fn rename(
        &self,
        name: &str,
        direction: impl Fn((&'static str, &'static str)) -> (&'static str, &'static str),
    ) -> String {
        name.split('.')
            .map(|segment| {
                self.segments
                    .iter()
                    .map(|&pair| direction(pair))
                    .find(|(from, _)| *from == segment)
                    .map_or(segment, |(_, to)| to)
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_config::{GlaConfig, MambaConfig, TransformerConfig};

    #[test]
    fn transformer_names_become_llamas_and_back() {
        let map = NameMap::for_model(&ModelConfig::Transformer(TransformerConfig::default()));
        for (ours, hf) in [
            ("model.embeddings.weight", "model.embed_tokens.weight"),
            (
                "model.layers.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "model.layers.3.attn.q_proj.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "model.layers.3.mlp_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "model.layers.3.mlp.down_proj.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            ("model.norm.weight", "model.norm.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(map.to_hf(ours), hf);
            assert_eq!(map.from_hf(hf), ours);
        }
    }

    #[test]
    fn gla_and_mamba_keep_their_names() {
        for model in [
            ModelConfig::Gla(GlaConfig::default()),
            ModelConfig::Mamba(MambaConfig::default()),
        ] {
            let map = NameMap::for_model(&model);
            for name in [
                "model.layers.0.attn.g_norm_swish_gate.weight",
                "backbone.layers.0.mixer.A_log",
                "model.embeddings.weight",
            ] {
                assert_eq!(map.to_hf(name), name);
                assert_eq!(map.from_hf(name), name);
            }
        }
        let unfused = NameMap::with_segments(GLA_UNFUSED_NORM_SEGMENTS);
        assert_eq!(
            unfused.from_hf("model.layers.1.attn.g_norm.weight"),
            "model.layers.1.attn.g_norm_swish_gate.weight"
        );
    }

    #[test]
    fn rotary_buffers_are_skipped() {
        assert!(NameMap::is_ignored_hf(
            "model.layers.0.self_attn.rotary_emb.inv_freq"
        ));
        assert!(!NameMap::is_ignored_hf(
            "model.layers.0.self_attn.q_proj.weight"
        ));
    }
}
