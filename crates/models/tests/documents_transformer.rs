//! Transformer++ over packed documents: each document of a window gets the hidden states and
//! parameter gradients it has when run alone (block-causal attention, positions restarting at
//! each document), on a tiny CPU config.

mod common;

use common::take_gradients;
use glatrain_config::{GlaMode, ModelConfig, TransformerConfig};
use glatrain_models::{build, CausalLm, Documents};
use glatrain_testing::{rel_rms, Rng};
use tch::{nn, Device, Kind, Tensor};

const VOCAB: usize = 37;
const WINDOW: i64 = 61;
/// Row 0 holds a document of this many tokens, then one of the rest; row 1 is one document.
const FIRST: i64 = 23;
/// Relative RMS bound: the packed and the separate runs compute the same function in fp32 and
/// differ only in rounding (attention sums over differently shaped tensors). Measured: 3e-8 for
/// the hidden states, at most 3.3e-7 for a gradient; 1e-5 (the ops' fp32 floor) leaves a wide
/// margin, while a document that sees another is off by over 1e-2.
const TOLERANCE: f64 = 1e-5;

fn model() -> (nn::VarStore, Box<dyn CausalLm>) {
    tch::manual_seed(7);
    let cfg = ModelConfig::Transformer(TransformerConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: Some(2),
        ..TransformerConfig::default()
    });
    let vs = nn::VarStore::new(Device::Cpu);
    let model = build(&vs.root(), &cfg, GlaMode::Chunk).unwrap();
    (vs, model)
}

#[test]
fn each_document_of_a_window_computes_as_if_alone() {
    let (vs, model) = model();
    let tokens = Tensor::randint(VOCAB as i64, [2, WINDOW], (Kind::Int64, Device::Cpu));
    // Fixed random weights of the hidden states make the loss whose gradients are compared.
    let weights = Rng::new(3).randn(&[2, WINDOW, 32], Kind::Float);
    let documents = Documents::new(WINDOW as usize, vec![vec![FIRST as usize], vec![]]).unwrap();

    let packed = model.hidden_states(&tokens, Some(&documents));
    (&packed * &weights).sum(Kind::Float).backward();
    let packed_grads = take_gradients(&vs);

    // The same documents as separate sequences: (row, first token, length).
    let spans = [(0, 0, FIRST), (0, FIRST, WINDOW - FIRST), (1, 0, WINDOW)];
    let piece =
        |x: &Tensor, (row, begin, len): (i64, i64, i64)| x.narrow(0, row, 1).narrow(1, begin, len);
    let alone: Vec<Tensor> = spans
        .iter()
        .map(|&span| {
            let hidden = model.hidden_states(&piece(&tokens, span), None);
            (&hidden * piece(&weights, span))
                .sum(Kind::Float)
                .backward();
            hidden
        })
        .collect();
    let alone_grads = take_gradients(&vs);
    let alone = Tensor::cat(&[Tensor::cat(&alone[..2], 1), alone[2].shallow_clone()], 0);

    let err = rel_rms(&packed, &alone);
    println!("hidden states: rel RMS {err:.2e}");
    assert!(err <= TOLERANCE, "hidden states: rel RMS {err:.2e}");
    for ((name, got), (_, want)) in packed_grads.iter().zip(&alone_grads) {
        assert!(
            want.abs().max().double_value(&[]) > 0.0,
            "{name} has no gradient"
        );
        let err = rel_rms(got, want);
        println!("{name}: rel RMS {err:.2e}");
        assert!(err <= TOLERANCE, "{name}: rel RMS {err:.2e}");
    }

    // The check can fail: without the boundary, the second document sees the first.
    let plain = tch::no_grad(|| model.hidden_states(&tokens, None));
    let second = (0, FIRST, WINDOW - FIRST);
    let leak = rel_rms(&piece(&plain, second), &piece(&alone, second));
    assert!(
        leak > 1e-2,
        "the first document barely matters ({leak:.2e})"
    );
}
