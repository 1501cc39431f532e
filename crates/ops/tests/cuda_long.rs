//! The GLA kernels at long sequences (T up to 262144 at small B and H) against the chunked f64
//! reference run on the GPU: every mode and dtype, two forward+backward calls in a row (a step
//! after the first one runs on reused memory), and a sequence split in two with the state carried
//! across the split. Skips on machines without CUDA.

mod common;

use common::cuda;
use glatrain_ops::reference::gla::{gla_chunked, DEFAULT_CHUNK};
use glatrain_ops::{gla, GlaMode};
use glatrain_testing::{assert_all_passed, compare, normal_f64_on, Compared};
use tch::{Device, Kind, Tensor};

/// f64 inputs on the device and the output gradient.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    d_o: Tensor,
}

fn inputs(shape: [i64; 5], seed: u64, dev: Device) -> Inputs {
    let [b, t, h, k, v] = shape;
    let mut r = normal_f64_on(seed, dev);
    Inputs {
        q: r(&[b, t, h, k]),
        k: r(&[b, t, h, k]),
        v: r(&[b, t, h, v]),
        // Typical gates near -0.1: a state remembers ~10 tokens, so every chunk matters.
        g: (r(&[b, t, h, k]) + 2.0).log_sigmoid() * (0.1 / 0.127),
        d_o: r(&[b, t, h, v]),
    }
}

/// o, the final state and dq, dk, dv, dg (as f64) of `f` on the inputs cast to `kind`.
fn run(
    x: &Inputs,
    kind: Kind,
    f: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> (Tensor, Tensor),
) -> Vec<Tensor> {
    let leaf = |t: &Tensor, kind| t.to_kind(kind).detach().set_requires_grad(true);
    let state_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let (q, k, v, g) = (
        leaf(&x.q, kind),
        leaf(&x.k, kind),
        leaf(&x.v, kind),
        leaf(&x.g, state_kind),
    );
    let (o, ht) = f(&q, &k, &v, &g);
    let loss = (o.to_kind(Kind::Double) * &x.d_o).sum(Kind::Double)
        + ht.to_kind(Kind::Double).sum(Kind::Double);
    let grads = Tensor::run_backward(&[&loss], &[&q, &k, &v, &g], false, false);
    let mut out = vec![o.to_kind(Kind::Double), ht.to_kind(Kind::Double)];
    out.extend(grads.iter().map(|t| t.to_kind(Kind::Double)));
    out
}

const NAMES: [&str; 6] = ["o", "final state", "dq", "dk", "dv", "dg"];

/// A GLA forward on q, k, v and the log gates: (o, final state).
type GlaFn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> (Tensor, Tensor);

fn reference(x: &Inputs, kind: Kind, scale: f64) -> Vec<Tensor> {
    run(x, kind, |q, k, v, g| {
        gla_chunked(q, k, v, g, None, scale, DEFAULT_CHUNK)
    })
}

/// Results named in order, from the first of `names`.
fn named(names: &[&'static str], r: &[Tensor]) -> Vec<(&'static str, Tensor)> {
    names
        .iter()
        .copied()
        .zip(r.iter().map(Tensor::shallow_clone))
        .collect()
}

/// `got` against `exact` (fp32: within 1e-4 relative RMS; bf16/fp16: twice the error of `naive`,
/// the reference run in that precision).
fn compared(
    label: &str,
    got: &[Tensor],
    exact: &[Tensor],
    naive: Option<&[Tensor]>,
) -> Vec<Compared> {
    let naive = naive.map(|n| named(&NAMES, n));
    compare(
        label,
        &named(&NAMES, got),
        &named(&NAMES, exact),
        naive.as_deref(),
        1e-4,
    )
}

#[test]
fn every_mode_and_dtype_up_to_262144_tokens_twice_in_a_row() {
    let Some(dev) = cuda() else { return };
    let mut all = Vec::new();
    for (t, seed) in [(32_768, 1), (262_144, 2)] {
        let shape = [1, t, 1, 32, 32];
        let x = inputs(shape, seed, dev);
        let scale = 32f64.powf(-0.5);
        let exact = reference(&x, Kind::Double, scale);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let naive = (kind != Kind::Float).then(|| reference(&x, kind, scale));
            for mode in [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent] {
                for call in 1..=2 {
                    let got = run(&x, kind, |q, k, v, g| {
                        let (o, ht) = gla(q, k, v, g, None, Some(scale), mode, true).unwrap();
                        (o, ht.unwrap())
                    });
                    let label = format!("T {t} {mode:?} {kind:?} call {call}");
                    all.extend(compared(&label, &got, &exact, naive.as_deref()));
                }
            }
        }
    }
    assert_all_passed(&all);
}

#[test]
fn model_head_dims_at_32768_tokens_twice_in_a_row() {
    // GLA-340M's layer: 4 heads, K = 128, V = 256, bf16, the chunk mode.
    let Some(dev) = cuda() else { return };
    let x = inputs([1, 32_768, 4, 128, 256], 3, dev);
    let scale = 128f64.powf(-0.5);
    let exact = reference(&x, Kind::Double, scale);
    let naive = reference(&x, Kind::BFloat16, scale);
    let mut all = Vec::new();
    for call in 1..=2 {
        let got = run(&x, Kind::BFloat16, |q, k, v, g| {
            let (o, ht) = gla(q, k, v, g, None, Some(scale), GlaMode::Chunk, true).unwrap();
            (o, ht.unwrap())
        });
        let label = format!("GLA-340M layer T 32768 call {call}");
        all.extend(compared(&label, &got, &exact, Some(&naive)));
    }
    assert_all_passed(&all);
}

#[test]
fn a_split_sequence_carries_its_state() {
    // The second half starts from the first half's final state: its outputs and final state are
    // as accurate as the whole sequence's (against the f64 reference, within twice the naive bf16
    // error), in every mode.
    let Some(dev) = cuda() else { return };
    let (t, half) = (65_536, 32_768);
    let x = inputs([1, t, 2, 64, 64], 4, dev);
    let scale = 64f64.powf(-0.5);
    let _guard = tch::no_grad_guard();
    let forward = |kind: Kind, f: GlaFn| {
        let state_kind = if kind == Kind::Double {
            kind
        } else {
            Kind::Float
        };
        let (o, ht) = f(
            &x.q.to_kind(kind),
            &x.k.to_kind(kind),
            &x.v.to_kind(kind),
            &x.g.to_kind(state_kind),
        );
        vec![o.to_kind(Kind::Double), ht.to_kind(Kind::Double)]
    };
    let reference = |q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor| {
        gla_chunked(q, k, v, g, None, scale, DEFAULT_CHUNK)
    };
    let exact = forward(Kind::Double, &reference);
    let naive = forward(Kind::BFloat16, &reference);
    let part = |t: &Tensor, i: i64| t.narrow(1, i * half, half);
    let outputs = ["o", "final state"];
    let (exact, naive) = (named(&outputs, &exact), named(&outputs, &naive));
    let mut all = Vec::new();
    for mode in [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent] {
        let split = |q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor| {
            let run = |i, h0: Option<&Tensor>| {
                let (o, ht) = gla(
                    &part(q, i),
                    &part(k, i),
                    &part(v, i),
                    &part(g, i),
                    h0,
                    Some(scale),
                    mode,
                    true,
                )
                .unwrap();
                (o, ht.unwrap())
            };
            let (first, mid) = run(0, None);
            let (second, ht) = run(1, Some(&mid));
            (Tensor::cat(&[first, second], 1), ht)
        };
        let got = named(&outputs, &forward(Kind::BFloat16, &split));
        let label = format!("{mode:?} split at {half}");
        all.extend(compare(&label, &got, &exact, Some(&naive), 1e-4));
    }
    assert_all_passed(&all);
}
