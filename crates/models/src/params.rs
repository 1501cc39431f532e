//! Parameter bookkeeping: counts (from a VarStore, and from the config alone so the size of a
//! 1.3B model is known without allocating it) and the weight-decay split.

use crate::mlp::swiglu_parameters;
use glatrain_config::{GlaConfig, MambaConfig, ModelConfig, TransformerConfig};
use tch::nn;

/// Trainable parameters in `vs` (a tied embedding counts once).
pub fn count_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// The parameters [`crate::build`] creates for `cfg`, computed from the shapes alone.
/// Assumes `cfg` passes [`crate::validate`].
pub fn parameter_count(cfg: &ModelConfig) -> i64 {
    match cfg {
        ModelConfig::Gla(c) => gla_parameters(c),
        ModelConfig::Transformer(c) => transformer_parameters(c),
        ModelConfig::Mamba(c) => mamba_parameters(c),
    }
}

/// Embedding table, final norm and (untied) output head.
fn shell(vocab: usize, hidden: usize, tied: bool) -> i64 {
    let (v, h) = (vocab as i64, hidden as i64);
    v * h + h + if tied { 0 } else { v * h }
}

fn gla_parameters(c: &GlaConfig) -> i64 {
    let h = c.hidden_size as i64;
    let (kd, vd) = (c.key_dim() as i64, c.value_dim() as i64);
    let rank = c.gate_low_rank_dim as i64;
    let qkv = h * (2 * kd + vd);
    let g = if c.use_output_gate { h * vd } else { 0 };
    let gk = h * rank + rank * kd + kd;
    let conv = if c.use_short_conv {
        (2 * kd + vd) * c.conv_size as i64
    } else {
        0
    };
    let attn = qkv + g + gk + conv + c.head_v_dim() as i64 + vd * h;
    let layer = 2 * h + attn + swiglu_parameters(h, c.mlp_size() as i64);
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + c.num_layers as i64 * layer
}

fn transformer_parameters(c: &TransformerConfig) -> i64 {
    let h = c.hidden_size as i64;
    let d = c.head_dim() as i64;
    let (heads, kv) = (c.num_heads as i64, c.kv_heads() as i64);
    let attn = 2 * h * heads * d + 2 * h * kv * d;
    let layer = 2 * h + attn + swiglu_parameters(h, c.mlp_size() as i64);
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + c.num_layers as i64 * layer
}

fn mamba_parameters(c: &MambaConfig) -> i64 {
    let h = c.hidden_size as i64;
    let e = c.d_inner() as i64;
    let (n, r, k) = (c.d_state as i64, c.dt_rank() as i64, c.conv_size as i64);
    let mixer = h * 2 * e // in_proj
        + e * k + e // conv1d
        + e * (r + 2 * n) // x_proj
        + r * e + e // dt_proj
        + e * n + e // A_log, D
        + e * h; // out_proj
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + c.num_layers as i64 * (h + mixer)
}

/// Whether the parameter called `name` (a VarStore / checkpoint key) is exempt from weight
/// decay: norm weights, biases, Mamba's `A_log` and `D`. Embeddings, the output head and every
/// other weight matrix (convolutions included) are decayed, as in the reference trainers.
pub fn no_weight_decay(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let leaf = parts.next().unwrap_or_default();
    let module = parts.next().unwrap_or_default();
    let is_norm = module == "norm"
        || module == "norm_f"
        || module.ends_with("_norm")
        || module.starts_with("g_norm");
    matches!(leaf, "bias" | "A_log" | "D") || (is_norm && leaf == "weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_split_by_name() {
        for name in [
            "model.layers.3.attn_norm.weight",
            "model.layers.3.mlp_norm.weight",
            "model.layers.3.attn.g_norm_swish_gate.weight",
            "model.layers.3.attn.g_norm.weight",
            "model.layers.3.attn.gk_proj.1.bias",
            "model.norm.weight",
            "backbone.norm_f.weight",
            "backbone.layers.0.norm.weight",
            "backbone.layers.0.mixer.A_log",
            "backbone.layers.0.mixer.D",
            "backbone.layers.0.mixer.dt_proj.bias",
            "backbone.layers.0.mixer.conv1d.bias",
        ] {
            assert!(no_weight_decay(name), "{name} must not be decayed");
        }
        for name in [
            "model.embeddings.weight",
            "lm_head.weight",
            "model.layers.3.attn.gk_proj.1.weight",
            "model.layers.3.attn.q_conv1d.weight",
            "model.layers.3.mlp.down_proj.weight",
            "backbone.layers.0.mixer.dt_proj.weight",
            "backbone.layers.0.mixer.conv1d.weight",
        ] {
            assert!(!no_weight_decay(name), "{name} must be decayed");
        }
    }
}
