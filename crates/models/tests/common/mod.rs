//! What the models' integration tests share: one small model of each family, and the
//! parameters' gradients. Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use glatrain_config::{GlaConfig, GlaMode, MambaConfig, ModelConfig, TransformerConfig};
use glatrain_models::{build, CausalLm, DecodeCache};
use tch::{nn, Device, Tensor};

/// The vocabulary of every test model.
pub const VOCAB: i64 = 37;

/// One small model of each family (GLA with and without short convolutions; Transformer++ with
/// grouped-query attention), named.
pub fn zoo() -> Vec<(&'static str, ModelConfig)> {
    let gla = GlaConfig {
        vocab_size: VOCAB as usize,
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        ..GlaConfig::default()
    };
    vec![
        ("gla", ModelConfig::Gla(gla.clone())),
        (
            "gla+short_conv",
            ModelConfig::Gla(GlaConfig {
                use_short_conv: true,
                ..gla
            }),
        ),
        (
            "transformer-gqa",
            ModelConfig::Transformer(TransformerConfig {
                vocab_size: VOCAB as usize,
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: Some(2),
                ..TransformerConfig::default()
            }),
        ),
        (
            "mamba",
            ModelConfig::Mamba(MambaConfig {
                vocab_size: VOCAB as usize,
                hidden_size: 32,
                num_layers: 2,
                ..MambaConfig::default()
            }),
        ),
    ]
}

/// `cfg` built on `device`, its GLA layers in `mode`, after seeding the global generator with
/// `seed`: its variables and the model.
pub fn seeded_model(
    cfg: &ModelConfig,
    mode: GlaMode,
    device: Device,
    seed: i64,
) -> (nn::VarStore, Box<dyn CausalLm>) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(device);
    let model = build(&vs.root(), cfg, mode).unwrap();
    (vs, model)
}

/// `x` (`[B, T]` tokens) decoded one token per call, carrying `cache`: the logits of each,
/// `[B, T, vocab]`.
pub fn step_through(model: &dyn CausalLm, x: &Tensor, cache: &mut DecodeCache) -> Tensor {
    let steps: Vec<Tensor> = (0..x.size()[1])
        .map(|t| model.step(&x.select(1, t), cache))
        .collect();
    Tensor::stack(&steps, 1)
}

/// Every parameter's gradient (sorted by name), taken out: the parameters' gradients are zero
/// afterwards.
pub fn take_gradients(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut grads: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, mut v)| {
            let g = v.grad().copy();
            v.zero_grad();
            (name, g)
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}
