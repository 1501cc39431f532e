//! The CUDA selective-scan kernels against the f64 reference: the output, the final state and
//! every gradient (u, delta, A, B, C, D, z, delta_bias, the initial state; the final state's
//! gradient flowing in), for d_state 1..256 and sequence lengths 1..4096, every option on and
//! off, contiguous and strided (column-sliced) inputs, segmented and unsegmented launches.
//!
//! fp32 must be within 1e-4 relative RMS of the f64 reference; bf16/fp16 within 2x the error of
//! the reference op run in that precision (both against f64), and never held to less than the
//! fp32 bound. Kernel output buffers are poisoned with NaN first, so an unwritten element fails.
//! Skips on machines without CUDA.

mod common;

use common::cuda;
use glatrain_ops::selective_scan::{prepare, Segments};
use glatrain_ops::{selective_scan, ScanInputs, ScanMode, ScanOptions};
use glatrain_testing::{assert_all_passed, compare, normal_f64_on, rel_rms, Compared};
use tch::{Device, Kind, Tensor};

/// Segments forced on every launch: one chunk each (the most segments), or one segment.
const MOST_SEGMENTS: Segments = Segments::ChunksPerSegment {
    forward: 1,
    backward: 1,
};
const ONE_SEGMENT: Segments = Segments::ChunksPerSegment {
    forward: i64::MAX,
    backward: i64::MAX,
};

#[derive(Debug, Clone, Copy)]
struct Case {
    b: i64,
    t: i64,
    d: i64,
    n: i64,
    z: bool,
    skip: bool,
    bias: bool,
    initial_state: bool,
    final_state_grad: bool,
    /// u, delta, z, B and C as column slices of wider tensors (rows neither contiguous nor
    /// 16-byte aligned).
    strided: bool,
    segments: Segments,
    /// Restarts (documents) at steps around the chunk and segment edges, in every row.
    documents: bool,
}

/// A case with every option on, contiguous, segmented by the launchers' rule.
const fn case(b: i64, t: i64, d: i64, n: i64) -> Case {
    Case {
        b,
        t,
        d,
        n,
        z: true,
        skip: true,
        bias: true,
        initial_state: true,
        final_state_grad: true,
        strided: false,
        segments: Segments::Auto,
        documents: false,
    }
}

/// f64 inputs on the device, and the gradients flowing in.
struct Inputs {
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    skip: Option<Tensor>,
    z: Option<Tensor>,
    bias: Option<Tensor>,
    h0: Option<Tensor>,
    dout: Tensor,
    dht: Option<Tensor>,
    resets: Option<Tensor>,
}

/// `[B, T]` restarts: steps 1, 31, 32, 33 and 64 (around the 32-step chunks' edges), a step
/// that moves with the row, and the last step.
fn restarts(c: &Case, dev: Device) -> Tensor {
    let mut flags = vec![false; (c.b * c.t) as usize];
    for row in 0..c.b {
        for step in [1, 31, 32, 33, 64, 100 + 7 * row, c.t - 1] {
            if step > 0 && step < c.t {
                flags[(row * c.t + step) as usize] = true;
            }
        }
    }
    Tensor::from_slice(&flags).view([c.b, c.t]).to_device(dev)
}

fn inputs(c: &Case, seed: u64, dev: Device) -> Inputs {
    let mut r = normal_f64_on(seed, dev);
    let (btd, btn, bdn) = ([c.b, c.t, c.d], [c.b, c.t, c.n], [c.b, c.d, c.n]);
    Inputs {
        u: r(&btd),
        // softplus(delta + bias) around 0.3, as Mamba's steps.
        delta: r(&btd) - 1.0,
        // -exp of a normal: rates from ~0.1 to ~10, as -exp(A_log) spreads them.
        a: -r(&[c.d, c.n]).exp(),
        b: r(&btn),
        c: r(&btn),
        skip: c.skip.then(|| r(&[c.d])),
        z: c.z.then(|| r(&btd)),
        bias: c.bias.then(|| r(&[c.d]) * 0.5),
        h0: c.initial_state.then(|| r(&bdn)),
        dout: r(&btd),
        dht: c.final_state_grad.then(|| r(&bdn)),
        resets: c.documents.then(|| restarts(c, dev)),
    }
}

/// Outputs and gradients of one evaluation (f64 tensors).
type Results = Vec<(&'static str, Tensor)>;

/// A leaf of `kind` holding `x`: `x` itself, or (strided) `x` as the columns `[3, 3 + W)` of a
/// wider leaf `[B, T, W + 8]` whose other columns are random. Returns (leaf, the view of `x`).
fn leaf(x: &Tensor, kind: Kind, strided: bool) -> (Tensor, Tensor) {
    if !strided {
        let l = x.to_kind(kind).detach().set_requires_grad(true);
        return (l.shallow_clone(), l);
    }
    let s = x.size();
    let pad = |w| Tensor::randn([s[0], s[1], w], (Kind::Double, x.device()));
    let wide = Tensor::cat(&[pad(3), x.shallow_clone(), pad(5)], 2)
        .to_kind(kind)
        .detach()
        .set_requires_grad(true);
    let view = wide.narrow(2, 3, s[2]);
    (wide, view)
}

/// Runs the op on leaves made from the inputs (u, delta, z, B, C cast to `kind`; A, D,
/// delta_bias, h0 in `param_kind`) and backpropagates `sum(out * dout) + sum(hT * dht)`.
fn evaluate(x: &Inputs, c: &Case, kind: Kind, param_kind: Kind, mode: ScanMode) -> Results {
    let act = |t: &Tensor| leaf(t, kind, c.strided);
    let param = |t: &Tensor| leaf(t, param_kind, false).0;
    let (u_leaf, u) = act(&x.u);
    let (delta_leaf, delta) = act(&x.delta);
    let (b_leaf, b) = act(&x.b);
    let (c_leaf, cm) = act(&x.c);
    let z = x.z.as_ref().map(act);
    let a = param(&x.a);
    let skip = x.skip.as_ref().map(param);
    let bias = x.bias.as_ref().map(param);
    let h0 = x.h0.as_ref().map(param);
    let inputs = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &b,
        c: &cm,
        d: skip.as_ref(),
        z: z.as_ref().map(|(_, v)| v),
        delta_bias: bias.as_ref(),
        initial_state: h0.as_ref(),
        resets: x.resets.as_ref(),
    };
    let options = ScanOptions {
        output_final_state: true,
        mode,
        segments: c.segments,
        ..ScanOptions::default()
    };
    let (out, ht) = selective_scan(&inputs, &options).unwrap();
    let ht = ht.unwrap();
    assert_eq!(out.kind(), kind);
    let mut loss = (out.to_kind(Kind::Double) * &x.dout).sum(Kind::Double);
    if let Some(dht) = &x.dht {
        loss += (ht.to_kind(Kind::Double) * dht).sum(Kind::Double);
    }
    let mut named: Vec<(&'static str, &Tensor, bool)> = vec![
        ("du", &u_leaf, true),
        ("ddelta", &delta_leaf, true),
        ("dA", &a, false),
        ("dB", &b_leaf, true),
        ("dC", &c_leaf, true),
    ];
    if let Some((z_leaf, _)) = &z {
        named.push(("dz", z_leaf, true));
    }
    for (name, t) in [("dD", &skip), ("ddelta_bias", &bias), ("dh0", &h0)] {
        if let Some(t) = t {
            named.push((name, t, false));
        }
    }
    let leaves: Vec<&Tensor> = named.iter().map(|(_, t, _)| *t).collect();
    let grads = Tensor::run_backward(&[&loss], &leaves, false, false);
    let width = |name: &str| match name {
        "dB" | "dC" => c.n,
        _ => c.d,
    };
    let mut results: Results = vec![
        ("out", out.to_kind(Kind::Double)),
        ("final state", ht.to_kind(Kind::Double)),
    ];
    for ((name, _, activation), g) in named.into_iter().zip(grads) {
        // A strided leaf's gradient: the columns of the slice (the rest is zero).
        let g = if activation && c.strided {
            g.narrow(2, 3, width(name))
        } else {
            g
        };
        results.push((name, g.to_kind(Kind::Double)));
    }
    results
}

const FP32_TOLERANCE: f64 = 1e-4;

/// Compares one case's output, final state and gradients in one dtype.
fn check(c: &Case, kind: Kind, seed: u64, dev: Device) -> Vec<Compared> {
    let x = inputs(c, seed, dev);
    let exact = evaluate(&x, c, Kind::Double, Kind::Double, ScanMode::Reference);
    let got = evaluate(&x, c, kind, Kind::Float, ScanMode::Kernels);
    let naive =
        (kind != Kind::Float).then(|| evaluate(&x, c, kind, Kind::Float, ScanMode::Reference));
    compare(
        &format!("{kind:?} {c:?}"),
        &got,
        &exact,
        naive.as_deref(),
        FP32_TOLERANCE,
    )
}

/// Checks every case in every dtype it lists; fails with every comparison over its tolerance.
fn run(cases: &[(Case, &[Kind])]) {
    let Some(dev) = cuda() else { return };
    let mut compared = Vec::new();
    for (i, (c, kinds)) in cases.iter().enumerate() {
        for (j, &kind) in kinds.iter().enumerate() {
            compared.extend(check(c, kind, 100 * i as u64 + j as u64, dev));
        }
    }
    assert_all_passed(&compared);
}

const ALL_KINDS: &[Kind] = &[Kind::Float, Kind::BFloat16, Kind::Half];

/// The T x N grid: every length and state size, fp32 everywhere and one half precision in
/// turn (all three dtypes up to T = 65); options, strides and segmenting rotate from case to
/// case, so each appears on and off at short and long T and small and large N.
fn grid(ts: &[i64]) -> Vec<(Case, &'static [Kind])> {
    let mut cases = Vec::new();
    let mut i = 0usize;
    for &t in ts {
        for n in [1, 4, 16, 64, 256] {
            let bit = |k: usize| (i >> k) & 1 == 1;
            let d = match n {
                256 => 9,
                64 => 40,
                _ => 70,
            };
            let b = if t * n <= 1000 * 16 { 2 } else { 1 };
            let c = Case {
                z: !bit(0),
                skip: !bit(1),
                bias: !bit(2),
                initial_state: bit(0) ^ bit(3) || t == 1,
                final_state_grad: !bit(4) || t == 1,
                strided: i % 3 == 1,
                segments: [Segments::Auto, MOST_SEGMENTS, ONE_SEGMENT][(i / 2) % 3],
                documents: i % 4 == 3,
                ..case(b, t, d, n)
            };
            let kinds: &'static [Kind] = if t <= 65 {
                ALL_KINDS
            } else {
                [
                    &[Kind::Float, Kind::BFloat16][..],
                    &[Kind::Float, Kind::Half][..],
                ][i % 2]
            };
            cases.push((c, kinds));
            i += 1;
        }
    }
    cases
}

#[test]
fn state_sizes_and_short_lengths_in_every_dtype() {
    run(&grid(&[1, 7, 63, 64, 65]));
}

#[test]
fn long_sequences() {
    run(&grid(&[1000, 2049, 4096]));
}

#[test]
fn every_option_combination() {
    // z, D, delta_bias, an initial state and the final state's gradient, each on and off;
    // contiguous and strided; fp32 and bf16.
    let mut cases = Vec::new();
    for bits in 0..32 {
        let on = |k: u32| (bits >> k) & 1 == 1;
        let c = Case {
            z: on(0),
            skip: on(1),
            bias: on(2),
            initial_state: on(3),
            final_state_grad: on(4),
            strided: bits % 2 == 1,
            segments: [Segments::Auto, ONE_SEGMENT][(bits / 2) as usize % 2],
            ..case(2, 100, 70, 16)
        };
        let kinds: &'static [Kind] = if bits % 4 == 0 {
            &[Kind::Float, Kind::BFloat16]
        } else {
            &[Kind::Float]
        };
        cases.push((c, kinds));
    }
    run(&cases);
}

#[test]
fn segmented_and_unsegmented_launches_agree_with_the_reference() {
    // Channel counts around the block widths (32 forward channels at N = 16, 64 backward), and
    // segment splits that leave a short last segment; with and without restarts, which then
    // fall inside segments and on their edges.
    let mut cases = Vec::new();
    for (i, d) in [1, 31, 64, 65, 129].into_iter().enumerate() {
        for segments in [
            MOST_SEGMENTS,
            ONE_SEGMENT,
            Segments::ChunksPerSegment {
                forward: 3,
                backward: 2,
            },
            Segments::Auto,
        ] {
            for documents in [false, true] {
                let c = Case {
                    segments,
                    strided: i % 2 == 0,
                    documents,
                    ..case(1, 300, d, [16, 4, 64, 1, 32][i])
                };
                cases.push((c, &[Kind::Float][..]));
            }
        }
    }
    run(&cases);
}

#[test]
fn decoding_token_by_token_continues_the_whole_sequence() {
    // A prefix through the op, then one token per call with the carried state: the same outputs
    // and final state as one call over the whole sequence (fp32 kernels, up to rounding).
    let Some(dev) = cuda() else { return };
    let c = case(2, 70, 40, 16);
    let x = inputs(&c, 7, dev);
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let (u, delta, b, cm) = (f(&x.u), f(&x.delta), f(&x.b), f(&x.c));
    let (a, skip, z, bias) = (
        f(&x.a),
        x.skip.as_ref().map(f),
        x.z.as_ref().map(f),
        x.bias.as_ref().map(f),
    );
    let with_state = ScanOptions {
        output_final_state: true,
        ..ScanOptions::default()
    };
    let window = |start: i64, len: i64, h0: Option<&Tensor>| {
        let cut = |t: &Tensor| t.narrow(1, start, len);
        let (u, delta, b, cm) = (cut(&u), cut(&delta), cut(&b), cut(&cm));
        let z = z.as_ref().map(cut);
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &cm,
            d: skip.as_ref(),
            z: z.as_ref(),
            delta_bias: bias.as_ref(),
            initial_state: h0,
            resets: None,
        };
        let (out, h) = selective_scan(&inputs, &with_state).unwrap();
        (out, h.unwrap())
    };
    let (whole, h_whole) = window(0, c.t, None);
    let (mut outs, mut state) = {
        let (out, h) = window(0, 50, None);
        (vec![out], h)
    };
    for t in 50..c.t {
        let (out, h) = window(t, 1, Some(&state));
        outs.push(out);
        state = h;
    }
    let (ey, eh) = (
        rel_rms(&Tensor::cat(&outs, 1), &whole),
        rel_rms(&state, &h_whole),
    );
    assert!(ey < 1e-5 && eh < 1e-5, "out {ey:e}, state {eh:e}");
}

#[test]
fn results_are_deterministic() {
    // Every sum has a fixed order: two runs give the same bits (segmented, bf16).
    let Some(dev) = cuda() else { return };
    let c = Case {
        segments: Segments::ChunksPerSegment {
            forward: 2,
            backward: 3,
        },
        ..case(2, 300, 130, 16)
    };
    let x = inputs(&c, 3, dev);
    let first = evaluate(&x, &c, Kind::BFloat16, Kind::Float, ScanMode::Kernels);
    let second = evaluate(&x, &c, Kind::BFloat16, Kind::Float, ScanMode::Kernels);
    for ((name, a), (_, b)) in first.iter().zip(&second) {
        assert!(a.equal(b), "{name} differs between two runs");
    }
}

#[test]
fn prepared_kernels_serve_the_first_call() {
    // Training compiles the kernels on a background thread while it builds the model; the op's
    // first call then finds them loaded (or waits for the compilation under way).
    let Some(dev) = cuda() else { return };
    let prepare = std::thread::spawn(|| prepare(0, Kind::Half, false));
    let compared = check(&case(1, 130, 33, 16), Kind::Half, 5, dev);
    prepare.join().unwrap().unwrap();
    assert!(compared.iter().all(Compared::passed));
}

#[test]
fn only_the_final_state_used() {
    // The output's gradient is undefined in the backward: the kernels run with a zero one.
    let Some(dev) = cuda() else { return };
    let c = case(1, 40, 8, 4);
    let mut x = inputs(&c, 9, dev);
    x.dout = x.dout.zeros_like();
    let with_output = evaluate(&x, &c, Kind::Float, Kind::Float, ScanMode::Kernels);
    let u = x.u.to_kind(Kind::Float).set_requires_grad(true);
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let (delta, a, b, cm) = (f(&x.delta), f(&x.a), f(&x.b), f(&x.c));
    let (skip, z, bias, h0) = (
        x.skip.as_ref().map(f),
        x.z.as_ref().map(f),
        x.bias.as_ref().map(f),
        x.h0.as_ref().map(f),
    );
    let inputs = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &b,
        c: &cm,
        d: skip.as_ref(),
        z: z.as_ref(),
        delta_bias: bias.as_ref(),
        initial_state: h0.as_ref(),
        resets: None,
    };
    let options = ScanOptions {
        output_final_state: true,
        ..ScanOptions::default()
    };
    let (_, ht) = selective_scan(&inputs, &options).unwrap();
    let loss = (ht.unwrap().to_kind(Kind::Double) * x.dht.as_ref().unwrap()).sum(Kind::Double);
    let du = Tensor::run_backward(&[&loss], &[&u], false, false).remove(0);
    let (_, want) = &with_output[2];
    assert!(rel_rms(&du, want) < 1e-6);
}

#[test]
fn bad_inputs_on_cuda_name_the_tensor() {
    let Some(dev) = cuda() else { return };
    let u = Tensor::randn([1, 4, 8], (Kind::Float, dev));
    let a = -Tensor::ones([8, 300], (Kind::Float, dev));
    let bc = Tensor::randn([1, 4, 300], (Kind::Float, dev));
    let mut inputs = ScanInputs {
        u: &u,
        delta: &u,
        a: &a,
        b: &bc,
        c: &bc,
        d: None,
        z: None,
        delta_bias: None,
        initial_state: None,
        resets: None,
    };
    let err = selective_scan(&inputs, &ScanOptions::default()).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("N <= 256"),
        "{err}"
    );
    let cpu = Tensor::randn([8], (Kind::Float, Device::Cpu));
    let a = -Tensor::ones([8, 16], (Kind::Float, dev));
    let bc = Tensor::randn([1, 4, 16], (Kind::Float, dev));
    inputs.a = &a;
    inputs.b = &bc;
    inputs.c = &bc;
    inputs.d = Some(&cpu);
    let err = selective_scan(&inputs, &ScanOptions::default()).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("D is on Cpu"),
        "{err}"
    );
    let (wide, bc64) = (u.to_kind(Kind::Double), bc.to_kind(Kind::Double));
    let inputs = ScanInputs {
        u: &wide,
        delta: &wide,
        b: &bc64,
        c: &bc64,
        d: None,
        ..inputs
    };
    let err = selective_scan(&inputs, &ScanOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("ScanMode::Reference takes any"),
        "{err}"
    );
}
