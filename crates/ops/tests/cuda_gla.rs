//! The CUDA GLA kernels against the f64 reference: outputs, final states and every gradient,
//! for each mode and dtype, over head dims 1..1024 and sequence lengths 1..4096.
//!
//! fp32 must be within 1e-4 relative RMS of the f64 reference; bf16/fp16 within 2x the error of
//! the reference op itself run in that precision (both against f64), and never held to less
//! than the fp32 bound (where the naive error happens to be ~0, e.g. a single token). Kernel output buffers are
//! poisoned with NaN first, so an unwritten element fails. Skips on machines without CUDA.

mod common;

use common::cuda;
use glatrain_ops::gla::kernels::{self, BackwardInputs};
use glatrain_ops::reference::gla::{gla_chunked, DEFAULT_CHUNK};
use glatrain_ops::{gla, GlaMode};
use glatrain_testing::{assert_all_passed, compare, normal_f64_on, Compared, Rng};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy)]
struct Case {
    b: i64,
    t: i64,
    h: i64,
    k: i64,
    v: i64,
    initial_state: bool,
    final_state_grad: bool,
    /// Mean log gate per token (strong gates stress the numerics).
    gate: f64,
}

const fn case(b: i64, t: i64, h: i64, k: i64, v: i64, h0: bool, dht: bool) -> Case {
    Case {
        b,
        t,
        h,
        k,
        v,
        initial_state: h0,
        final_state_grad: dht,
        gate: -0.1,
    }
}

/// f64 inputs on the device: q, k, v, gk, h0, do, dht.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    h0: Option<Tensor>,
    d_o: Tensor,
    dht: Option<Tensor>,
}

fn inputs(c: &Case, seed: u64, dev: Device) -> Inputs {
    let mut r = normal_f64_on(seed, dev);
    let qk = [c.b, c.t, c.h, c.k];
    let vs = [c.b, c.t, c.h, c.v];
    let st = [c.b, c.h, c.k, c.v];
    let q = r(&qk);
    let k = r(&qk);
    let v = r(&vs);
    // Log-sigmoid gates scaled so that a typical one is `c.gate` (logsigmoid(2) = -0.127):
    // always <= 0, spread over orders of magnitude.
    let g = (r(&qk) + 2.0).log_sigmoid() * (c.gate / -0.127);
    let h0 = c.initial_state.then(|| r(&st));
    let d_o = r(&vs);
    let dht = c.final_state_grad.then(|| r(&st));
    Inputs {
        q,
        k,
        v,
        g,
        h0,
        d_o,
        dht,
    }
}

/// Outputs and gradients of one evaluation: o, ht, dq, dk, dv, dg, dh0 (as f64 tensors).
type Results = Vec<(&'static str, Tensor)>;

/// Runs `f` on leaves made from the inputs (q, k, v cast to `kind`; g, h0 f32 for kernels), and
/// backpropagates `sum(o * do) + sum(ht * dht)`.
fn evaluate(
    x: &Inputs,
    kind: Kind,
    state_kind: Kind,
    f: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, Option<&Tensor>) -> (Tensor, Tensor),
) -> Results {
    let leaf = |t: &Tensor, kind: Kind| t.to_kind(kind).detach().set_requires_grad(true);
    let (q, k, v) = (leaf(&x.q, kind), leaf(&x.k, kind), leaf(&x.v, kind));
    let g = leaf(&x.g, state_kind);
    let h0 = x.h0.as_ref().map(|h| leaf(h, state_kind));
    let (o, ht) = f(&q, &k, &v, &g, h0.as_ref());
    let mut loss = (o.to_kind(Kind::Double) * &x.d_o).sum(Kind::Double);
    if let Some(dht) = &x.dht {
        loss += (ht.to_kind(Kind::Double) * dht).sum(Kind::Double);
    }
    let mut leaves = vec![&q, &k, &v, &g];
    if let Some(h) = &h0 {
        leaves.push(h);
    }
    let grads = Tensor::run_backward(&[&loss], &leaves, false, false);
    let mut out: Results = vec![
        ("o", o.to_kind(Kind::Double)),
        ("final state", ht.to_kind(Kind::Double)),
        ("dq", grads[0].to_kind(Kind::Double)),
        ("dk", grads[1].to_kind(Kind::Double)),
        ("dv", grads[2].to_kind(Kind::Double)),
        ("dg", grads[3].to_kind(Kind::Double)),
    ];
    if h0.is_some() {
        out.push(("dh0", grads[4].to_kind(Kind::Double)));
    }
    out
}

fn reference(x: &Inputs, kind: Kind, scale: f64) -> Results {
    let state_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    evaluate(x, kind, state_kind, |q, k, v, g, h0| {
        gla_chunked(q, k, v, g, h0, scale, DEFAULT_CHUNK)
    })
}

fn kernel(x: &Inputs, kind: Kind, scale: f64, mode: GlaMode) -> Results {
    evaluate(x, kind, Kind::Float, |q, k, v, g, h0| {
        let (o, ht) = gla(q, k, v, g, h0, Some(scale), mode, true).unwrap();
        (o, ht.unwrap())
    })
}

const FP32_TOLERANCE: f64 = 1e-4;

/// Compares one case's outputs, final state and gradients for one mode and dtype.
fn check(c: &Case, mode: GlaMode, kind: Kind, seed: u64, dev: Device) -> Vec<Compared> {
    let x = inputs(c, seed, dev);
    let scale = (c.k as f64).powf(-0.5);
    let exact = reference(&x, Kind::Double, scale);
    let got = kernel(&x, kind, scale, mode);
    let naive = (kind != Kind::Float).then(|| reference(&x, kind, scale));
    compare(
        &format!("{mode:?} {kind:?} {c:?}"),
        &got,
        &exact,
        naive.as_deref(),
        FP32_TOLERANCE,
    )
}

/// Checks every case in every mode and dtype; fails with every comparison over its tolerance.
fn run(cases: &[Case], modes: &[GlaMode], kinds: &[Kind]) {
    let Some(dev) = cuda() else { return };
    let mut compared = Vec::new();
    let mut seed = 1;
    for c in cases {
        for &mode in modes {
            for &kind in kinds {
                seed += 1;
                compared.extend(check(c, mode, kind, seed, dev));
            }
        }
    }
    assert_all_passed(&compared);
}

const KERNEL_MODES: [GlaMode; 3] = [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent];

#[test]
fn every_mode_and_dtype_on_small_shapes() {
    let cases = [
        case(2, 65, 2, 16, 32, true, true),
        case(1, 1, 1, 8, 8, false, true),
        case(1, 7, 2, 60, 100, true, false),
    ];
    run(
        &cases,
        &KERNEL_MODES,
        &[Kind::Float, Kind::BFloat16, Kind::Half],
    );
}

#[test]
fn head_dims_from_1_to_1024_and_long_sequences_fp32() {
    let cases = [
        case(1, 63, 1, 1, 1, true, true),
        case(2, 64, 3, 64, 64, false, false),
        case(1, 1000, 2, 128, 128, true, true),
        case(1, 4096, 1, 32, 64, true, true),
        case(1, 65, 1, 256, 512, false, true),
        case(1, 64, 1, 1024, 1024, true, true),
        case(1, 63, 1, 100, 1024, false, false),
    ];
    run(&cases, &KERNEL_MODES, &[Kind::Float]);
}

#[test]
fn strong_gates_stay_finite_and_accurate() {
    let mut c = case(1, 200, 2, 32, 32, true, true);
    c.gate = -4.0;
    run(&[c], &KERNEL_MODES, &[Kind::Float, Kind::BFloat16]);
}

#[test]
fn bf16_at_model_head_dims() {
    let cases = [
        case(2, 300, 2, 128, 256, false, false),
        case(1, 129, 4, 8, 16, true, true),
    ];
    run(&cases, &KERNEL_MODES, &[Kind::BFloat16]);
}

#[test]
fn half_precision_chunk_over_head_dims_and_lengths() {
    // The bf16/fp16 `chunk` schedule has its own kernels (kernels/gla_tc.cu): every head dim and
    // length of the fp32 test, in both half precisions.
    let cases = [
        case(1, 1, 1, 1, 1, true, true),
        case(1, 7, 2, 8, 16, false, true),
        case(1, 63, 1, 16, 32, true, false),
        case(2, 64, 2, 32, 60, true, true),
        case(1, 65, 1, 60, 100, false, false),
        case(1, 1000, 2, 64, 128, true, true),
        case(1, 4096, 1, 128, 128, true, true),
        case(1, 65, 1, 256, 512, false, true),
        case(1, 64, 1, 1024, 1024, true, true),
        // 64 (batch, head) pairs at K = V = 128: on an H100 the narrow output walk (128 blocks in
        // one walk; the wide one would need two segments). The shapes above take the wide one.
        case(4, 1024, 16, 128, 128, true, true),
    ];
    run(&cases, &[GlaMode::Chunk], &[Kind::BFloat16, Kind::Half]);
}

#[test]
fn prepared_kernels_serve_the_first_call() {
    // Training compiles the kernels on a background thread while it builds the model; the op's
    // first call then finds them loaded (or waits for the compilation under way).
    let Some(dev) = cuda() else { return };
    let prepare =
        std::thread::spawn(|| glatrain_ops::gla::prepare(0, Kind::Half, GlaMode::Chunk, false));
    let c = case(1, 130, 2, 64, 32, true, false);
    let compared = check(&c, GlaMode::Chunk, Kind::Half, 5, dev);
    prepare.join().unwrap().unwrap();
    assert_all_passed(&compared);
}

#[test]
fn backward_recomputes_what_the_forward_did_not_keep() {
    // The bf16/fp16 chunk schedule keeps its chunk states and A for the backward; given none,
    // the backward computes them again, with the same results bit for bit.
    let Some(dev) = cuda() else { return };
    for kind in [Kind::BFloat16, Kind::Half] {
        let c = case(2, 130, 3, 64, 96, true, true);
        let x = inputs(&c, 11, dev);
        let half = |t: &Tensor| t.to_kind(kind);
        let full = |t: &Tensor| t.to_kind(Kind::Float);
        let (q, k, v, d_o) = (half(&x.q), half(&x.k), half(&x.v), half(&x.d_o));
        let (g, h0, dht) = (
            full(&x.g),
            x.h0.as_ref().map(full),
            x.dht.as_ref().map(full),
        );
        let scale = 0.125;
        let inputs = kernels::Inputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            h0: h0.as_ref(),
        };
        let fwd = kernels::forward(&inputs, scale, GlaMode::Chunk).unwrap();
        let kept = fwd
            .saved
            .as_ref()
            .expect("the chunk schedule keeps its states");
        let backward = |saved: Option<&Tensor>| {
            let inputs = BackwardInputs {
                x: inputs,
                final_state: &fwd.final_state,
                saved,
                d_o: &d_o,
                dht: dht.as_ref(),
            };
            kernels::backward(&inputs, scale, GlaMode::Chunk).unwrap()
        };
        let (with, without) = (backward(Some(kept)), backward(None));
        let pairs = [
            ("dq", &with.dq, &without.dq),
            ("dk", &with.dk, &without.dk),
            ("dv", &with.dv, &without.dv),
            ("dg", &with.dg, &without.dg),
            (
                "dh0",
                with.dh0.as_ref().unwrap(),
                without.dh0.as_ref().unwrap(),
            ),
        ];
        for (name, a, b) in pairs {
            assert!(a.isfinite().all().int64_value(&[]) == 1, "{kind:?} {name}");
            assert!(
                a.equal(b),
                "{kind:?} {name} differs without the kept tensors"
            );
        }
    }
}

#[test]
fn mismatched_devices_are_bad_input() {
    let Some(dev) = cuda() else { return };
    let q = Tensor::randn([1, 4, 1, 8], (Kind::Float, dev));
    let v_cpu = Tensor::randn([1, 4, 1, 8], (Kind::Float, Device::Cpu));
    let err = gla(&q, &q, &v_cpu, &q, None, None, GlaMode::Chunk, false).unwrap_err();
    assert!(err.is_bad_input());
    assert!(err.to_string().contains("v is on Cpu"), "{err}");
}

#[test]
fn unused_output_gradient_is_handled() {
    // Only the final state feeds the loss: the op's output gradient is undefined in backward.
    let Some(dev) = cuda() else { return };
    let mut rng = Rng::new(7);
    let q = rng
        .randn(&[1, 20, 1, 8], Kind::Float)
        .to_device(dev)
        .set_requires_grad(true);
    let g = (rng.randn(&[1, 20, 1, 8], Kind::Float).to_device(dev)).log_sigmoid();
    let (_, ht) = gla(&q, &q, &q, &g, None, None, GlaMode::Chunk, true).unwrap();
    ht.unwrap().sum(Kind::Float).backward();
    let grad = q.grad();
    assert!(grad.isfinite().all().int64_value(&[]) == 1);
}
