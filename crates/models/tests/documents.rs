//! Packed documents: for every family, a batch whose rows hold several documents gives the same
//! hidden states and parameter gradients as each document run alone, on the CPU (the tensor-op
//! references) and on CUDA (the kernels; skipped without a GPU).

mod common;

use common::{seeded_model, take_gradients, zoo, VOCAB};
use glatrain_config::{GlaMode, ModelConfig};
use glatrain_models::Documents;
use glatrain_testing::rel_rms;
use tch::{Device, Kind, Tensor};

/// Compares the documents packed in rows with the documents run one by one: hidden states
/// within `bound` relative RMS per document, every parameter's gradient within `bound`.
fn check(name: &str, cfg: &ModelConfig, device: Device, bound: f64) {
    let (vs, model) = seeded_model(cfg, GlaMode::Chunk, device, 11);
    // Row 0: documents of 5, 1, 11 and 83 tokens (one reaching past a 64-token chunk); row 1:
    // 70 and 30.
    let t = 100;
    let docs = Documents::new(t, vec![vec![5, 6, 17], vec![70]]).unwrap();
    let tokens = Tensor::randint(VOCAB, [2, t as i64], (Kind::Int64, device));
    let hidden = model.hidden_states(&tokens, Some(&docs));
    let weights = Tensor::randn(hidden.size(), (Kind::Float, device));
    (&hidden * &weights).sum(Kind::Float).backward();
    let packed = take_gradients(&vs);

    let mut apart_loss = Tensor::zeros([], (Kind::Float, device));
    for (row, begin, len) in docs.spans() {
        let piece = |x: &Tensor| {
            x.narrow(0, row as i64, 1)
                .narrow(1, begin as i64, len as i64)
        };
        let alone = model.hidden_states(&piece(&tokens), None);
        let err = rel_rms(&piece(&hidden), &alone);
        assert!(
            err <= bound,
            "{name} on {device:?}: document at row {row}, {begin}..{}: hidden states off by {err:.2e}",
            begin + len
        );
        apart_loss += (&alone * piece(&weights)).sum(Kind::Float);
    }
    apart_loss.backward();
    for ((param, got), (_, want)) in packed.iter().zip(take_gradients(&vs)) {
        let err = rel_rms(got, &want);
        assert!(
            err <= bound,
            "{name} on {device:?}: {param}: gradient off by {err:.2e}"
        );
    }
    // Without boundaries, the documents argument changes nothing.
    let whole = Documents::whole_rows(2, t);
    let plain = model.hidden_states(&tokens, None);
    assert!(model.hidden_states(&tokens, Some(&whole)).equal(&plain));
}

#[test]
fn documents_in_a_row_equal_documents_alone_on_the_cpu() {
    for (name, cfg) in zoo() {
        check(name, &cfg, Device::Cpu, 1e-5);
    }
}

#[test]
fn documents_in_a_row_equal_documents_alone_on_cuda() {
    // fp32 kernels: within their 1e-4 bound of the reference.
    let Some(device) = glatrain_testing::cuda_or_skip() else {
        return;
    };
    for (name, cfg) in zoo() {
        check(name, &cfg, device, 1e-4);
    }
}
