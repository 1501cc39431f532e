//! Every family on a GPU: bf16 autocast over fp32 weights (the trainer's default), and decoding
//! token by token on the CUDA kernels against the full sequence. Skipped without a CUDA device.

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

#[test]
fn decoding_token_by_token_on_cuda_matches_the_full_sequence() {
    // The CUDA kernels on both paths: the whole sequence at once (GLA chunk, the scan over 100
    // tokens) and one token per call with the carried states (GLA fused_recurrent, the scan with
    // T = 1), in fp32; then a prefill followed by single steps.
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let device = Device::Cuda(0);
    let seq = 100;
    for (name, cfg) in zoo() {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(device);
        let model = build(&vs.root(), &cfg, GlaMode::Chunk).unwrap();
        let x = Tensor::randint(VOCAB, [2, seq], (Kind::Int64, device));
        tch::no_grad(|| {
            let full = model.forward(&x);
            let mut cache = model.new_cache(2);
            let steps: Vec<Tensor> = (0..seq)
                .map(|t| model.step(&x.select(1, t), &mut cache))
                .collect();
            let stepped = Tensor::stack(&steps, 1);
            let err = (&stepped - &full).norm().double_value(&[]) / full.norm().double_value(&[]);
            println!("{name}: token by token vs full sequence on CUDA: relative RMS {err:.2e}");
            assert!(err <= 1e-4, "{name}: relative RMS {err:.2e}");
            // The check can fail: the last token without its history is far off.
            let last = model.forward(&x.narrow(1, seq - 1, 1)).squeeze_dim(1);
            let forgetful = (&last - full.select(1, seq - 1)).norm().double_value(&[])
                / full.select(1, seq - 1).norm().double_value(&[]);
            assert!(
                forgetful > 1e-2,
                "{name}: history barely matters ({forgetful:.2e})"
            );

            let mut cache = model.new_cache(2);
            let mut pieces = vec![model.forward_cached(&x.narrow(1, 0, 70), &mut cache)];
            pieces.extend((70..seq).map(|t| model.step(&x.select(1, t), &mut cache).unsqueeze(1)));
            let pieces = Tensor::cat(&pieces, 1);
            let err = (&pieces - &full).norm().double_value(&[]) / full.norm().double_value(&[]);
            assert!(
                err <= 1e-5,
                "{name}: prefill + steps: relative RMS {err:.2e}"
            );
        });
    }
}
