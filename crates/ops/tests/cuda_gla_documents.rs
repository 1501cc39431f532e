//! GLA over packed documents on CUDA (`gla_documents`: the kernels over the padded layout with a
//! restart gate before each document) against each document run apart through the f64 reference:
//! outputs and the gradients of q, k, v and the gates, in every kernel mode and dtype, with
//! documents of one token, of exactly one chunk, across chunk edges and filling a whole row.
//!
//! Tolerances as crates/ops/tests/cuda_gla.rs: fp32 within 1e-4 relative RMS, bf16/fp16 within 2x
//! the error of the reference run in that precision. Skips on machines without CUDA.

mod common;

use common::cuda;
use glatrain_ops::gla::{gla_documents, GlaDocuments};
use glatrain_ops::{Documents, GlaMode};
use glatrain_testing::{assert_all_passed, compare, normal_f64_on, Compared};
use tch::{Device, Kind, Tensor};

struct Case {
    b: i64,
    t: i64,
    h: i64,
    k: i64,
    v: i64,
    /// Each row's document starts after position 0.
    starts: Vec<Vec<usize>>,
    /// Mean log gate per token.
    gate: f64,
}

type Results = Vec<(&'static str, Tensor)>;

/// o, dq, dk, dv, dg of `gla_documents` in `mode` on leaves of `kind` (gates in f32, f64 for f64).
fn evaluate(c: &Case, x: &[Tensor; 5], laid: &GlaDocuments, kind: Kind, mode: GlaMode) -> Results {
    let gate_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let leaf = |t: &Tensor, kind: Kind| t.to_kind(kind).detach().set_requires_grad(true);
    let (q, k, v, g) = (
        leaf(&x[0], kind),
        leaf(&x[1], kind),
        leaf(&x[2], kind),
        leaf(&x[3], gate_kind),
    );
    let scale = (c.k as f64).powf(-0.5);
    let o = gla_documents(&q, &k, &v, &g, laid, Some(scale), mode).unwrap();
    let loss = (o.to_kind(Kind::Double) * &x[4]).sum(Kind::Double);
    let grads = Tensor::run_backward(&[&loss], &[&q, &k, &v, &g], false, false);
    let f64 = |t: &Tensor| t.to_kind(Kind::Double);
    vec![
        ("o", f64(&o)),
        ("dq", f64(&grads[0])),
        ("dk", f64(&grads[1])),
        ("dv", f64(&grads[2])),
        ("dg", f64(&grads[3])),
    ]
}

fn check(c: &Case, seed: u64, dev: Device, modes: &[GlaMode], kinds: &[Kind]) -> Vec<Compared> {
    let mut r = normal_f64_on(seed, dev);
    let qk = [c.b, c.t, c.h, c.k];
    let vs = [c.b, c.t, c.h, c.v];
    let x = [
        r(&qk),
        r(&qk),
        r(&vs),
        (r(&qk) + 2.0).log_sigmoid() * (c.gate / -0.127),
        r(&vs),
    ];
    let docs = Documents::new(c.t as usize, c.starts.clone()).unwrap();
    let laid = GlaDocuments::new(&docs, dev).unwrap();
    let exact = evaluate(c, &x, &laid, Kind::Double, GlaMode::Reference);
    let mut compared = Vec::new();
    for &mode in modes {
        for &kind in kinds {
            let got = evaluate(c, &x, &laid, kind, mode);
            let naive =
                (kind != Kind::Float).then(|| evaluate(c, &x, &laid, kind, GlaMode::Reference));
            let label = format!(
                "{mode:?} {kind:?} {}x{}x{}x{}x{} starts {:?}",
                c.b, c.t, c.h, c.k, c.v, c.starts
            );
            compared.extend(compare(&label, &got, &exact, naive.as_deref(), 1e-4));
        }
    }
    compared
}

const MODES: [GlaMode; 3] = [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent];
const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

#[test]
fn every_mode_and_dtype_equals_the_documents_run_apart() {
    let Some(dev) = cuda() else { return };
    let cases = [
        // Starts around the 64-token chunk edges; a whole row as one document.
        Case {
            b: 2,
            t: 200,
            h: 2,
            k: 64,
            v: 64,
            starts: vec![vec![1, 63, 64, 65, 130], vec![]],
            gate: -0.1,
        },
        // GLA-340M's head dims; a last document of one token.
        Case {
            b: 1,
            t: 300,
            h: 1,
            k: 128,
            v: 256,
            starts: vec![vec![64, 128, 129, 299]],
            gate: -0.1,
        },
        // One-token documents and odd head dims; strong gates.
        Case {
            b: 3,
            t: 17,
            h: 1,
            k: 7,
            v: 9,
            starts: vec![(1..17).collect(), vec![5], vec![16]],
            gate: -2.0,
        },
    ];
    let mut compared = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        compared.extend(check(c, 10 + i as u64, dev, &MODES, &KINDS));
    }
    assert_all_passed(&compared);
}

#[test]
fn long_rows_of_many_documents() {
    let Some(dev) = cuda() else { return };
    // 8192 tokens in documents of 1 to ~900 tokens.
    let mut starts = Vec::new();
    let mut p = 0usize;
    for i in 0.. {
        p += 1 + (i * 397) % 900;
        if p >= 8192 {
            break;
        }
        starts.push(p);
    }
    let c = Case {
        b: 1,
        t: 8192,
        h: 2,
        k: 128,
        v: 128,
        starts: vec![starts],
        gate: -0.1,
    };
    let compared = check(
        &c,
        7,
        dev,
        &[GlaMode::Chunk, GlaMode::FusedChunk],
        &[Kind::BFloat16],
    );
    assert_all_passed(&compared);
}

#[test]
fn repeated_calls_give_the_same_bits() {
    let Some(dev) = cuda() else { return };
    let c = Case {
        b: 2,
        t: 130,
        h: 2,
        k: 64,
        v: 128,
        starts: vec![vec![3, 70], vec![64]],
        gate: -0.1,
    };
    let mut r = normal_f64_on(3, dev);
    let x = [
        r(&[2, 130, 2, 64]),
        r(&[2, 130, 2, 64]),
        r(&[2, 130, 2, 128]),
        (r(&[2, 130, 2, 64]) + 2.0).log_sigmoid(),
        r(&[2, 130, 2, 128]),
    ];
    let laid = GlaDocuments::new(&Documents::new(130, c.starts.clone()).unwrap(), dev).unwrap();
    for mode in MODES {
        let first = evaluate(&c, &x, &laid, Kind::BFloat16, mode);
        let second = evaluate(&c, &x, &laid, Kind::BFloat16, mode);
        for ((name, a), (_, b)) in first.iter().zip(&second) {
            assert!(a.equal(b), "{mode:?}: {name} differs between calls");
        }
    }
}
