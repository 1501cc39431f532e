//! The shape of a layer as the kernels see it, derived from a resolved config.

use glatrain_config::{ModelConfig, Precision, ResolvedConfig};
use serde::{Deserialize, Serialize};

use crate::device::DeviceProfile;

/// Which model the layer belongs to (its sequence mixer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Gla,
    Transformer,
    Mamba,
}

impl ModelType {
    /// "gla", "transformer" or "mamba" (as `model.type`).
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Gla => "gla",
            ModelType::Transformer => "transformer",
            ModelType::Mamba => "mamba",
        }
    }
}

/// One distinct layer shape of a model, per micro-batch.
///
/// GLA: `num_heads` heads with state `head_k_dim x head_v_dim`. Transformer: attention heads of
/// `head_k_dim = head_v_dim = head_dim`, `num_kv_heads` of them for k and v. Mamba: each of the
/// `d_inner` channels is an independent scan with a `d_state x 1` state, so `num_heads =
/// num_kv_heads = d_inner`, `head_k_dim = d_state`, `head_v_dim = 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    pub model_type: ModelType,
    /// How many layers of the model share this shape.
    pub num_layers: usize,
    /// Sequences per micro-batch (`train.micro_batch_size`).
    pub batch: usize,
    /// Tokens per sequence (`data.seq_len`).
    pub seq_len: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    /// Model width, for the activation memory of the whole block.
    pub hidden_size: usize,
    /// SwiGLU width (0 for Mamba, which has no MLP).
    pub mlp_size: usize,
    /// GLA's short causal convolution on q, k, v (its inputs are kept for backward).
    pub short_conv: bool,
    /// Precision of the forward/backward pass (`train.precision`).
    pub dtype: Precision,
    /// `run.device`, with "auto" replaced by the kind of the device profile.
    pub device: String,
    /// Token-by-token generation (one token per call) rather than training on whole sequences.
    pub decoding: bool,
}

impl LayerShape {
    /// Tokens per micro-batch, `batch * seq_len`.
    pub fn tokens(&self) -> u64 {
        self.batch as u64 * self.seq_len as u64
    }

    /// `batch * num_heads`: the independent sequences a kernel can run in parallel.
    pub fn batch_heads(&self) -> u64 {
        self.batch as u64 * self.num_heads as u64
    }

    /// Bytes per element of the activations (2 for bf16/fp16, 4 for fp32).
    pub fn act_bytes(&self) -> u64 {
        match self.dtype {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
        }
    }

    /// The table's dtype spelling ("bf16", "fp16", "fp32").
    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The distinct layer shapes of `cfg` trained on `device`, one entry per shape with the number
/// of layers sharing it (every model type has one shape today: all its layers are alike).
pub fn layer_shapes(cfg: &ResolvedConfig, device: &DeviceProfile) -> Vec<LayerShape> {
    let c = &cfg.config;
    let device_name = if c.run.device == "auto" {
        device.kind.name().to_owned()
    } else {
        c.run.device.clone()
    };
    let base = |model_type, num_layers, hidden_size| LayerShape {
        model_type,
        num_layers,
        batch: c.train.micro_batch_size,
        seq_len: c.data.seq_len,
        num_heads: 1,
        num_kv_heads: 1,
        head_k_dim: 1,
        head_v_dim: 1,
        hidden_size,
        mlp_size: 0,
        short_conv: false,
        dtype: c.train.precision,
        device: device_name.clone(),
        decoding: false,
    };
    let shape = match &c.model {
        ModelConfig::Gla(m) => LayerShape {
            num_heads: m.num_heads,
            num_kv_heads: m.num_heads,
            head_k_dim: m.head_k_dim(),
            head_v_dim: m.head_v_dim(),
            mlp_size: m.mlp_size(),
            short_conv: m.use_short_conv,
            ..base(ModelType::Gla, m.num_layers, m.hidden_size)
        },
        ModelConfig::Transformer(m) => LayerShape {
            num_heads: m.num_heads,
            num_kv_heads: m.kv_heads(),
            head_k_dim: m.head_dim(),
            head_v_dim: m.head_dim(),
            mlp_size: m.mlp_size(),
            ..base(ModelType::Transformer, m.num_layers, m.hidden_size)
        },
        ModelConfig::Mamba(m) => LayerShape {
            num_heads: m.d_inner(),
            num_kv_heads: m.d_inner(),
            head_k_dim: m.d_state,
            head_v_dim: 1,
            ..base(ModelType::Mamba, m.num_layers, m.hidden_size)
        },
    };
    vec![shape]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(text: &str) -> ResolvedConfig {
        glatrain_config::from_str(text, "test.toml", &[]).unwrap()
    }

    #[test]
    fn gla_shape_follows_the_config() {
        let cfg = resolved(
            "[model]\ntype = \"gla\"\nhidden_size = 1024\nnum_heads = 4\nnum_layers = 24\n\
             [data]\nseq_len = 2048\n[train]\nmicro_batch_size = 8\nprecision = \"bf16\"\n",
        );
        let shapes = layer_shapes(&cfg, &DeviceProfile::h100_sxm());
        assert_eq!(shapes.len(), 1);
        let s = &shapes[0];
        assert_eq!(
            (s.model_type, s.num_layers, s.batch, s.seq_len),
            (ModelType::Gla, 24, 8, 2048)
        );
        assert_eq!((s.num_heads, s.head_k_dim, s.head_v_dim), (4, 128, 256));
        assert_eq!(
            (s.hidden_size, s.mlp_size, s.dtype_name()),
            (1024, 2816, "bf16")
        );
        assert_eq!(s.device, "cuda", "auto resolves to the profile's kind");
        assert_eq!((s.tokens(), s.batch_heads(), s.act_bytes()), (16384, 32, 2));
    }

    #[test]
    fn transformer_and_mamba_shapes() {
        let cfg = resolved(
            "[run]\ndevice = \"cpu\"\n[model]\ntype = \"transformer\"\nhidden_size = 256\n\
             num_heads = 4\nnum_kv_heads = 2\n[train]\nprecision = \"fp32\"\n",
        );
        let s = &layer_shapes(&cfg, &DeviceProfile::cpu())[0];
        assert_eq!(
            (s.num_heads, s.num_kv_heads, s.head_k_dim, s.head_v_dim),
            (4, 2, 64, 64)
        );
        assert_eq!((s.device.as_str(), s.act_bytes()), ("cpu", 4));

        let cfg = resolved("[model]\ntype = \"mamba\"\nhidden_size = 128\nnum_layers = 3\n");
        let s = &layer_shapes(&cfg, &DeviceProfile::h100_sxm())[0];
        assert_eq!(s.model_type, ModelType::Mamba);
        assert_eq!(
            (
                s.num_layers,
                s.num_heads,
                s.head_k_dim,
                s.head_v_dim,
                s.mlp_size
            ),
            (3, 256, 16, 1, 0)
        );
    }
}
