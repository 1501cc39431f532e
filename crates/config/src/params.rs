//! Parameter counts from the config alone, so the size of a 1.3B model (and the weights share
//! of the preflight's memory estimate) is known without libtorch or allocating anything. The
//! models crate's tests pin these formulas to the VarStores it builds.

use crate::schema::{GlaConfig, MambaConfig, ModelConfig, TransformerConfig};

impl ModelConfig {
    /// Trainable parameters of the model this config describes (a tied embedding counts
    /// once). Assumes the config passed validation, which bounds it far below `u64::MAX`.
    pub fn parameter_count(&self) -> u64 {
        u64::try_from(self.parameter_count_wide()).unwrap_or(u64::MAX)
    }

    /// [`ModelConfig::parameter_count`] in 128-bit arithmetic: once validation has bounded every
    /// weight tensor (at most 2^61 elements each), the sum cannot overflow, and validation uses
    /// it to bound the total.
    pub(crate) fn parameter_count_wide(&self) -> u128 {
        match self {
            ModelConfig::Gla(c) => gla(c),
            ModelConfig::Transformer(c) => transformer(c),
            ModelConfig::Mamba(c) => mamba(c),
        }
    }
}

fn wide(n: usize) -> u128 {
    n as u128
}

/// Embedding table, final norm and (untied) output head.
fn shell(vocab: usize, hidden: usize, tied: bool) -> u128 {
    let (v, h) = (wide(vocab), wide(hidden));
    v * h + h + if tied { 0 } else { v * h }
}

/// Gate, up and down projections of a SwiGLU block, no biases.
fn swiglu(hidden: u128, intermediate: u128) -> u128 {
    3 * hidden * intermediate
}

fn gla(c: &GlaConfig) -> u128 {
    let h = wide(c.hidden_size);
    let (kd, vd) = (wide(c.key_dim()), wide(c.value_dim()));
    let rank = wide(c.gate_low_rank_dim);
    let qkv = h * (2 * kd + vd);
    let g = if c.use_output_gate { h * vd } else { 0 };
    let gk = h * rank + rank * kd + kd;
    let conv = if c.use_short_conv {
        (2 * kd + vd) * wide(c.conv_size)
    } else {
        0
    };
    // The per-head output norm's weight is head_v_dim wide, shared by the heads.
    let attn = qkv + g + gk + conv + wide(c.head_v_dim()) + vd * h;
    let layer = 2 * h + attn + swiglu(h, wide(c.mlp_size()));
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + wide(c.num_layers) * layer
}

fn transformer(c: &TransformerConfig) -> u128 {
    let h = wide(c.hidden_size);
    let d = wide(c.head_dim());
    let (heads, kv) = (wide(c.num_heads), wide(c.kv_heads()));
    let attn = 2 * h * heads * d + 2 * h * kv * d;
    let layer = 2 * h + attn + swiglu(h, wide(c.mlp_size()));
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + wide(c.num_layers) * layer
}

fn mamba(c: &MambaConfig) -> u128 {
    let h = wide(c.hidden_size);
    // d_inner in 128 bits: expand * hidden_size may not fit a usize before validation.
    let e = wide(c.expand) * h;
    let (n, r, k) = (wide(c.d_state), wide(c.dt_rank()), wide(c.conv_size));
    let mixer = h * 2 * e // in_proj
        + e * k + e // conv1d
        + e * (r + 2 * n) // x_proj
        + r * e + e // dt_proj
        + e * n + e // A_log, D
        + e * h; // out_proj
    shell(c.vocab_size, c.hidden_size, c.tie_embeddings) + wide(c.num_layers) * (h + mixer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_model_sizes() {
        // The shapes of configs/gla-340m, gla-1.3b, transformer-340m and mamba-370m (GPT-NeoX's
        // 50280-token vocabulary); Mamba's default 32000-token vocabulary gives 352.8M.
        let cases = [
            (
                "GLA-340M",
                ModelConfig::Gla(GlaConfig::default()),
                341_707_776,
            ),
            (
                "GLA-1.3B",
                ModelConfig::Gla(GlaConfig {
                    hidden_size: 2048,
                    ..GlaConfig::default()
                }),
                1_299_978_240,
            ),
            (
                "Transformer++-340M",
                ModelConfig::Transformer(TransformerConfig::default()),
                341_099_520,
            ),
            (
                "Mamba-370M",
                ModelConfig::Mamba(MambaConfig {
                    vocab_size: 50280,
                    ..MambaConfig::default()
                }),
                371_516_416,
            ),
            (
                "Mamba-370M, vocab 32000",
                ModelConfig::Mamba(MambaConfig::default()),
                352_797_696,
            ),
        ];
        for (name, cfg, expected) in cases {
            assert_eq!(cfg.parameter_count(), expected, "{name}");
        }
    }

    /// Tiny shapes counted by hand, through the branches the published sizes skip: untied
    /// head, GLA's short convolution without output gate, grouped-query attention.
    #[test]
    fn tiny_models_counted_by_hand() {
        // Shell: embedding 10 x 8, final norm 8, head 10 x 8 = 168.
        let gla = ModelConfig::Gla(GlaConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_layers: 1,
            num_heads: 2,
            intermediate_size: Some(16),
            gate_low_rank_dim: 2,
            use_short_conv: true,
            conv_size: 2,
            use_output_gate: false,
            tie_embeddings: false,
            ..GlaConfig::default()
        });
        // q, k, v 128 + gk 28 + convs 32 + g_norm 4 + o 64 + two norms 16 + SwiGLU 384.
        assert_eq!(gla.parameter_count(), 168 + 656);
        let transformer = ModelConfig::Transformer(TransformerConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: Some(1),
            intermediate_size: Some(16),
            tie_embeddings: false,
            ..TransformerConfig::default()
        });
        // q, o 128 + k, v 64 + two norms 16 + SwiGLU 384.
        assert_eq!(transformer.parameter_count(), 168 + 592);
        let mamba = ModelConfig::Mamba(MambaConfig {
            vocab_size: 10,
            hidden_size: 8,
            num_layers: 1,
            d_state: 2,
            conv_size: 2,
            tie_embeddings: false,
            ..MambaConfig::default()
        });
        // d_inner 16, dt_rank 1: in_proj 256 + conv 48 + x_proj 80 + dt_proj 32 + A_log, D 48
        // + out_proj 128 + norm 8.
        assert_eq!(mamba.parameter_count(), 168 + 600);
    }
}
