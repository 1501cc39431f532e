//! Parameter bookkeeping: the count of a built model and the weight-decay split. The count
//! from the config alone is `ModelConfig::parameter_count` (config crate, no libtorch); the
//! tests in `tests/models.rs` pin it to [`count_parameters`].

use tch::nn;

/// Trainable parameters in `vs` (a tied embedding counts once).
pub fn count_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
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
