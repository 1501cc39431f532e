//! The mixed-precision paths on a GPU: bf16 autocast over fp32 weights (the trainer's default)
//! for every family. Skipped without a CUDA device.

use glatrain_config::{GlaConfig, GlaMode, MambaConfig, ModelConfig, TransformerConfig};
use glatrain_models::build;
use tch::{nn, Device, Kind, Tensor};

const VOCAB: i64 = 37;

fn zoo() -> Vec<(&'static str, ModelConfig)> {
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

#[test]
fn bf16_autocast_on_cuda_stays_close_to_fp32_and_trains() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    glatrain_shim::autocast::set_autocast_dtype(Kind::BFloat16).unwrap();
    let device = Device::Cuda(0);
    for (name, cfg) in zoo() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(device);
        let model = build(&vs.root(), &cfg, GlaMode::Chunk).unwrap();
        let x = Tensor::randint(VOCAB, [2, 100], (Kind::Int64, device));
        let reference = tch::no_grad(|| model.forward(&x));
        let logits = glatrain_shim::autocast::autocast(|| model.forward(&x));
        assert_eq!(logits.kind(), Kind::Float, "{name}: logits must be fp32");
        // Autocast rounds weights and activations at each matmul: the whole-model-cast test's
        // budget (~sqrt(12) * 2^-9 = 7e-3 for independent roundings) with 2x room.
        let err =
            (&logits - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
        println!("{name}: bf16 autocast vs fp32 logits: relative RMS {err:.2e}");
        assert!(err <= 1.5e-2, "{name}: relative RMS {err:.2e}");

        let loss = logits
            .narrow(1, 0, 99)
            .reshape([-1, VOCAB])
            .cross_entropy_for_logits(&x.narrow(1, 1, 99).reshape([-1]));
        loss.backward();
        for (var, value) in vs.variables() {
            let grad = value.grad();
            assert!(grad.defined(), "{name}: {var} has no gradient");
            assert_eq!(grad.kind(), Kind::Float, "{name}: {var} gradient dtype");
            let finite = grad.isfinite().all().int64_value(&[]) == 1;
            assert!(finite, "{name}: {var} has a non-finite gradient");
        }
    }
}
