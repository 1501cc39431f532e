//! Training FLOPs per token and model FLOPs utilisation (MFU).
//!
//! Convention: FLOPs of one forward + backward pass per token, a multiply-add counted as 2
//! FLOPs, backward = 2x forward, so every term is 3x its forward cost:
//!
//! - **Dense weights**: `6 * N`, with `N` the weights used as matmuls per token: every linear
//!   layer of the blocks, the short/depthwise convolutions (tiny, counted like weights), and the
//!   LM head `vocab * hidden` (counted once even when tied to the embedding). The embedding
//!   lookup, norms and biases are not counted.
//! - **Softmax attention** (Transformer++), causal, counting the lower triangle only (what a
//!   FlashAttention kernel executes): per layer `3 * (2*T*H*Dh)` = `6*T*H*Dh`, i.e. PaLM's
//!   `12*L*H*Dh*T` halved for causality.
//! - **GLA, chunked form** (chunk `C = min(64, T)`; the kernels compute full `C x C` tiles):
//!   per layer and token, forward = intra-chunk `2*C*(key_dim + value_dim)` (scores and scores @
//!   V over the chunk, summed over heads) + `2*H*K*V` (q @ S) + `2*H*K*V` (the state update
//!   k^T v), times 3 for forward + backward. Gates and decays are element-wise and not counted.
//! - **Mamba's selective scan**: `9 * d_inner * d_state` per layer and token forward (mamba_ssm's
//!   `flops_selective_scan_fn`: discretisation, state update, output), times 3.
//!
//! MFU divides achieved FLOP/s by the GPU's dense peak from [`peak_flops`] for the precision;
//! on an unknown GPU or on CPU it is not reported.

use glatrain_config::{ModelConfig, Precision};
use glatrain_cuda::GpuSpec;

/// Chunk length used for the GLA FLOP count (the chunked kernels' tile).
pub const GLA_FLOP_CHUNK: usize = 64;

/// Parameters used as matmul weights per token (see the module docs).
pub fn dense_matmul_params(model: &ModelConfig) -> u64 {
    match model {
        ModelConfig::Gla(c) => {
            let (d, kd, vd) = (c.hidden_size, c.key_dim(), c.value_dim());
            let gate = if c.use_output_gate { d * vd } else { 0 };
            let gk = d * c.gate_low_rank_dim + c.gate_low_rank_dim * kd;
            let conv = if c.use_short_conv {
                c.conv_size * (2 * kd + vd)
            } else {
                0
            };
            let attn = 2 * d * kd + d * vd + gate + gk + vd * d + conv;
            let mlp = 3 * d * c.mlp_size();
            (c.num_layers * (attn + mlp) + c.vocab_size * d) as u64
        }
        ModelConfig::Transformer(c) => {
            let d = c.hidden_size;
            let kv = c.kv_heads() * c.head_dim();
            let attn = d * d + 2 * d * kv + d * d;
            let mlp = 3 * d * c.mlp_size();
            (c.num_layers * (attn + mlp) + c.vocab_size * d) as u64
        }
        ModelConfig::Mamba(c) => {
            let (d, di, n, r) = (c.hidden_size, c.d_inner(), c.d_state, c.dt_rank());
            let layer = d * 2 * di + c.conv_size * di + di * (r + 2 * n) + r * di + di * d;
            (c.num_layers * layer + c.vocab_size * d) as u64
        }
    }
}

/// Sequence-mixing FLOPs per token (forward + backward) at context length `seq_len`.
pub fn mixing_flops_per_token(model: &ModelConfig, seq_len: usize) -> u64 {
    let t = seq_len as u64;
    match model {
        ModelConfig::Gla(c) => {
            let chunk = GLA_FLOP_CHUNK.min(seq_len) as u64;
            let (kd, vd) = (c.key_dim() as u64, c.value_dim() as u64);
            let h = c.num_heads as u64;
            let (k, v) = (c.head_k_dim() as u64, c.head_v_dim() as u64);
            let fwd = 2 * chunk * (kd + vd) + 4 * h * k * v;
            3 * fwd * c.num_layers as u64
        }
        ModelConfig::Transformer(c) => {
            let (h, dh) = (c.num_heads as u64, c.head_dim() as u64);
            6 * t * h * dh * c.num_layers as u64
        }
        ModelConfig::Mamba(c) => 3 * 9 * (c.d_inner() * c.d_state * c.num_layers) as u64,
    }
}

/// Training FLOPs per token: `6 * N` + the mixing term.
pub fn flops_per_token(model: &ModelConfig, seq_len: usize) -> u64 {
    6 * dense_matmul_params(model) + mixing_flops_per_token(model, seq_len)
}

/// Dense peak FLOP/s of a GPU (by its driver name) for a training precision, from the vendors'
/// data sheets ([`GpuSpec`], dense, no sparsity): tensor-core bf16/fp16, or plain fp32 (libtorch
/// does not use TF32 for fp32 matmuls by default). `None` for a GPU not in the table.
pub fn peak_flops(gpu_name: &str, precision: Precision) -> Option<f64> {
    GpuSpec::lookup(gpu_name).map(|spec| match precision {
        Precision::Fp32 => spec.datasheet_fp32_flops,
        Precision::Bf16 | Precision::Fp16 => spec.datasheet_half_flops,
    })
}

/// The FLOP count the MFU uses, in words, printed once at the start of a run: the dense term,
/// the model's sequence-mixing term and the peak it divides by (`peak`: the GPU's name and its
/// dense FLOP/s for the precision; `None`: no MFU on this device).
pub fn describe(model: &ModelConfig, seq_len: usize, peak: Option<(String, f64)>) -> String {
    let dense = dense_matmul_params(model);
    let mixing = mixing_flops_per_token(model, seq_len);
    let what = match model {
        ModelConfig::Gla(_) => format!(
            "GLA, chunked form with chunk {}: intra-chunk products and the state's read and update",
            GLA_FLOP_CHUNK.min(seq_len)
        ),
        ModelConfig::Transformer(_) => {
            format!("causal softmax attention at T = {seq_len}, the lower triangle")
        }
        ModelConfig::Mamba(_) => "the selective scan, 9 FLOPs per state and token".to_string(),
    };
    let mfu = match peak {
        Some((name, flops)) => format!(
            "MFU against {name}'s {:.0} TFLOP/s (dense, datasheet)",
            flops / 1e12
        ),
        None => "no MFU (no dense peak for this device)".to_string(),
    };
    format!(
        "FLOPs per token (forward + backward): 6 x {dense} weights = {:.3e}, sequence mixing \
         ({what}) {:.3e}, total {:.3e}; {mfu}",
        6.0 * dense as f64,
        mixing as f64,
        flops_per_token(model, seq_len) as f64
    )
}

/// MFU as a fraction: `flops_per_token * tokens_per_sec / peak`.
pub fn mfu(flops_per_token: u64, tokens_per_sec: f64, peak: f64) -> f64 {
    flops_per_token as f64 * tokens_per_sec / peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_config::{GlaConfig, MambaConfig, TransformerConfig};

    #[test]
    fn gla_340m_counts() {
        let cfg = ModelConfig::Gla(GlaConfig::default());
        // Per layer: q,k 2*1024*512, v,g 2*1024*1024, gk 1024*16 + 16*512, o 1024*1024,
        // mlp 3*1024*2816; plus the head 32000*1024.
        let layer =
            2 * 1024 * 512 + 2 * 1024 * 1024 + 1024 * 16 + 16 * 512 + 1024 * 1024 + 3 * 1024 * 2816;
        let n = 24 * layer + 32000 * 1024;
        assert_eq!(dense_matmul_params(&cfg), n as u64);
        // Mixing at T = 2048: 3 * (2*64*(512+1024) + 4*4*128*256) per layer.
        let mix = 3 * (2 * 64 * (512 + 1024) + 4 * 4 * 128 * 256) * 24;
        assert_eq!(mixing_flops_per_token(&cfg, 2048), mix as u64);
        assert_eq!(flops_per_token(&cfg, 2048), 6 * n as u64 + mix as u64);
    }

    #[test]
    fn transformer_attention_term_is_half_of_palm() {
        let cfg = ModelConfig::Transformer(TransformerConfig::default());
        let t = 2048u64;
        let palm = 12 * 24 * 16 * 64 * t;
        assert_eq!(mixing_flops_per_token(&cfg, 2048), palm / 2);
        let layer = 4 * 1024 * 1024 + 3 * 1024 * 2816;
        assert_eq!(
            dense_matmul_params(&cfg),
            (24 * layer + 32000 * 1024) as u64
        );
    }

    #[test]
    fn gla_chunk_is_capped_by_context() {
        let cfg = ModelConfig::Gla(GlaConfig {
            hidden_size: 32,
            num_heads: 4,
            num_layers: 1,
            ..GlaConfig::default()
        });
        // T = 16 < 64: the chunk is the whole sequence.
        let mix = 3 * (2 * 16 * (16 + 32) + 4 * 4 * 4 * 8);
        assert_eq!(mixing_flops_per_token(&cfg, 16), mix);
    }

    #[test]
    fn mamba_scan_term() {
        let cfg = ModelConfig::Mamba(MambaConfig::default());
        assert_eq!(mixing_flops_per_token(&cfg, 2048), 3 * 9 * 2048 * 16 * 48);
        let (d, di, r) = (1024, 2048, 64);
        let layer = d * 2 * di + 4 * di + di * (r + 32) + r * di + di * d;
        assert_eq!(
            dense_matmul_params(&cfg),
            (48 * layer + 32000 * 1024) as u64
        );
    }

    #[test]
    fn the_count_is_written_out_per_model() {
        let gla = describe(&ModelConfig::Gla(GlaConfig::default()), 2048, None);
        assert!(
            gla.contains("GLA, chunked form with chunk 64") && gla.contains("no MFU"),
            "{gla}"
        );
        assert!(!gla.contains("softmax"), "{gla}");
        let t = describe(
            &ModelConfig::Transformer(TransformerConfig::default()),
            2048,
            Some(("NVIDIA H100 80GB HBM3".into(), 989e12)),
        );
        assert!(t.contains("causal softmax attention at T = 2048"), "{t}");
        assert!(t.contains("989 TFLOP/s"), "{t}");
        let m = describe(&ModelConfig::Mamba(MambaConfig::default()), 2048, None);
        assert!(m.contains("selective scan"), "{m}");
    }

    #[test]
    fn peak_table() {
        for (gpu, precision, peak) in [
            ("NVIDIA H100 80GB HBM3", Precision::Bf16, Some(989e12)),
            ("NVIDIA H100 PCIe", Precision::Bf16, Some(756e12)),
            ("NVIDIA H200", Precision::Fp16, Some(989e12)),
            ("NVIDIA A100-SXM4-80GB", Precision::Bf16, Some(312e12)),
            ("NVIDIA A100-SXM4-80GB", Precision::Fp32, Some(19.5e12)),
            ("NVIDIA GeForce RTX 4090", Precision::Bf16, None),
        ] {
            assert_eq!(peak_flops(gpu, precision), peak, "{gpu} {precision:?}");
        }
        let m = mfu(1_000_000_000, 100_000.0, 989e12);
        assert!((m - 1e14 / 989e12).abs() < 1e-12);
    }
}
