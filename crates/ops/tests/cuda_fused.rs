//! The fused CUDA kernels (RMSNorm with and without its swish gate, SwiGLU, the causal
//! convolution with silu over rows and packed documents, SwiGLU and RMSNorm fused with the
//! matrix products after them, the rotary embedding) against the f64 reference: outputs and
//! every gradient, in each dtype, at odd row lengths and counts, with unaligned tensors (the
//! kernels' element-wise path), large and small values, and at the 340M models' shapes.
//!
//! Each result must be within max(1e-5, 2x the error of the same formula run in that dtype by
//! libtorch's ops) relative RMS of the f64 reference: 1e-5 for fp32. One-element rows are tested
//! at eps = 0.5: at 1e-6 their dx = dy w eps rstd^3 is ill-conditioned (the fp32 formula itself
//! is off by percents). Kernel output buffers are poisoned with NaN first, so an unwritten
//! element fails. Skips on machines without CUDA.

mod common;

use common::cuda;
use glatrain_ops::reference::conv::causal_conv as conv_reference;
use glatrain_ops::{causal_conv, rms_norm, rms_norm_linear, rotary, swiglu, swiglu_linear};
use glatrain_shim::autograd::grad;
use glatrain_testing::{assert_all_passed, compare, Rng};
use tch::{Device, Kind, Tensor};

const EPS: f64 = 1e-6;
const FLOOR: f64 = 1e-5;
const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

/// `values` (any dtype) as a contiguous CUDA tensor of `kind` whose data starts `offset`
/// elements past its allocation (offset 1: not 16-byte aligned), a leaf requiring grad.
fn leaf(values: &Tensor, kind: Kind, offset: i64) -> Tensor {
    let numel = values.numel() as i64;
    let base = Tensor::zeros([numel + offset], (kind, Device::Cuda(0)));
    let mut t = base.narrow(0, offset, numel).view(values.size().as_slice());
    t.copy_(&values.to_kind(kind));
    t.set_requires_grad(true)
}

/// The output and gradients of `f` at `inputs`, given the output gradient.
fn run(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], dy: &Tensor) -> Vec<Tensor> {
    let y = f(inputs);
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let mut out = vec![y.detach()];
    out.extend(grad(&y, &dy.to_kind(y.kind()), &refs).unwrap());
    out
}

/// `got` against `exact`, with the bound from `naive` (both against `exact`), the results named
/// `names` in order.
fn assert_close(
    label: &str,
    names: &[&'static str],
    got: &[Tensor],
    naive: &[Tensor],
    exact: &[Tensor],
) {
    let named = |r: &[Tensor]| -> Vec<(&str, Tensor)> {
        names
            .iter()
            .copied()
            .zip(r.iter().map(Tensor::shallow_clone))
            .collect()
    };
    let compared = compare(
        label,
        &named(got),
        &named(exact),
        Some(&named(naive)),
        FLOOR,
    );
    assert_all_passed(&compared);
}

/// The RMSNorm formula in elementwise ops, in the inputs' dtype.
fn norm_formula(t: &[Tensor], eps: f64) -> Tensor {
    let x = &t[0];
    let y = x * (x.square().mean_dim(-1, true, x.kind()) + eps).rsqrt() * &t[1];
    match t.get(2) {
        Some(g) => y * g.silu(),
        None => y,
    }
}

#[derive(Debug, Clone, Copy)]
struct NormCase {
    rows: i64,
    n: i64,
    gated: bool,
    offset: i64,
    scale: f64,
}

impl NormCase {
    fn new(rows: i64, n: i64, gated: bool, offset: i64, scale: f64) -> Self {
        Self {
            rows,
            n,
            gated,
            offset,
            scale,
        }
    }

    /// 1e-6 as the models have it, but 0.5 for one-element rows (see the module docs).
    fn eps(&self) -> f64 {
        if self.n == 1 {
            0.5
        } else {
            1e-6
        }
    }
}

fn cuda_randn(rng: &mut Rng, shape: &[i64], kind: Kind) -> Tensor {
    rng.randn(shape, Kind::Double)
        .to_kind(kind)
        .to_device(Device::Cuda(0))
}

fn norm_case(kind: Kind, c: NormCase, seed: u64) {
    let mut rng = Rng::new(seed);
    let x = rng.randn(&[c.rows, c.n], Kind::Double) * c.scale;
    let w = rng.randn(&[c.n], Kind::Double) * 0.5 + 1.0;
    let g = rng.randn(&[c.rows, c.n], Kind::Double) * 3.0;
    let dy = cuda_randn(&mut rng, &[c.rows, c.n], kind);
    let n_inputs = if c.gated { 3 } else { 2 };
    // The inputs rounded to the dtype (weights fp32, as the models keep them).
    let values = [x.to_kind(kind), w.to_kind(Kind::Float), g.to_kind(kind)];
    let eps = c.eps();
    let op = |t: &[Tensor]| rms_norm(&t[0], &t[1], eps, t.get(2)).unwrap();
    let inputs: Vec<Tensor> = values[..n_inputs]
        .iter()
        .enumerate()
        .map(|(i, v)| leaf(v, v.kind(), if i == 1 { 0 } else { c.offset }))
        .collect();
    let got = run(op, &inputs, &dy);
    let in_kind =
        |k: Kind| -> Vec<Tensor> { values[..n_inputs].iter().map(|v| leaf(v, k, 0)).collect() };
    let exact = run(op, &in_kind(Kind::Double), &dy);
    let naive = run(|t| norm_formula(t, eps), &in_kind(kind), &dy);
    assert_eq!(got[0].kind(), kind);
    let names = ["y", "dx", "dw", "dg"];
    assert_close(
        &format!("rms_norm {kind:?} {c:?}"),
        &names[..n_inputs + 1],
        &got,
        &naive,
        &exact,
    );
}

#[test]
fn rms_norm_matches_the_reference() {
    let Some(_) = cuda() else { return };
    let mut cases = Vec::new();
    for (n, rows) in [
        (1, 37),
        (7, 9),
        (7, 300),
        (256, 1),
        (256, 70),
        (1000, 13),
        (1024, 100),
        (4096, 5),
        (4096, 17),
        (8192, 3),
    ] {
        for gated in [false, true] {
            cases.push(NormCase::new(rows, n, gated, 0, 1.0));
        }
    }
    // Unaligned tensors (the element-wise path), large and small rows, many rows per warp.
    for (rows, n, offset, scale) in [
        (21, 256, 1, 1.0),
        (21, 1000, 3, 1.0),
        (19, 256, 0, 30.0),
        (19, 256, 0, 1e-3),
        (20_000, 7, 0, 1.0),
        (9_000, 256, 1, 1.0),
    ] {
        cases.push(NormCase::new(rows, n, true, offset, scale));
    }
    for kind in KINDS {
        for (i, &c) in cases.iter().enumerate() {
            norm_case(kind, c, i as u64);
        }
    }
}

#[test]
fn rms_norm_at_gla_340m_shapes() {
    let Some(_) = cuda() else { return };
    // The block norms on the fp32 residual stream, and the per-head gated norm in bf16.
    norm_case(Kind::Float, NormCase::new(16384, 1024, false, 0, 1.0), 1);
    norm_case(Kind::BFloat16, NormCase::new(65536, 256, true, 0, 1.0), 2);
}

#[test]
fn rms_norm_backward_is_deterministic() {
    let Some(_) = cuda() else { return };
    let mut rng = Rng::new(9);
    let x = cuda_randn(&mut rng, &[5000, 1000], Kind::BFloat16);
    let w = cuda_randn(&mut rng, &[1000], Kind::Float);
    let g = cuda_randn(&mut rng, &[5000, 1000], Kind::BFloat16);
    let dy = cuda_randn(&mut rng, &[5000, 1000], Kind::BFloat16);
    let op = |t: &[Tensor]| rms_norm(&t[0], &t[1], EPS, t.get(2)).unwrap();
    let inputs = [&x, &w, &g].map(|t| t.detach().set_requires_grad(true));
    let first = run(op, &inputs, &dy);
    let second = run(op, &inputs, &dy);
    for (a, b) in first.iter().zip(&second) {
        assert!(a.equal(b));
    }
}

#[test]
fn rms_norm_names_the_row_length_its_backward_cannot_take() {
    let Some(dev) = cuda() else { return };
    // dw's partial sums need 4 n bytes of shared memory: 400 KB is more than any GPU gives.
    let x = Tensor::ones([2, 100_000], (Kind::Float, dev)).set_requires_grad(true);
    let w = Tensor::ones([100_000], (Kind::Float, dev)).set_requires_grad(true);
    let y = rms_norm(&x, &w, EPS, None).unwrap();
    assert!(y.isfinite().all().int64_value(&[]) == 1);
    let err = grad(&y, &y.ones_like(), &[&x, &w]).unwrap_err();
    assert!(
        err.contains("rows of n = 100000 elements") && err.contains("enough for n <="),
        "{err}"
    );
}

#[test]
fn swiglu_matches_the_reference() {
    let Some(_) = cuda() else { return };
    let formula = |t: &[Tensor]| t[0].silu() * &t[1];
    let op = |t: &[Tensor]| swiglu(&t[0], &t[1]).unwrap();
    for kind in KINDS {
        for (i, (shape, offset, scale)) in [
            (vec![1], 0, 1.0),
            (vec![7], 0, 1.0),
            (vec![3, 5003], 0, 4.0),
            (vec![4096], 1, 1.0),
            (vec![999], 2, 30.0),
            (vec![16384, 2816], 0, 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Rng::new(i as u64);
            let a = rng.randn(&shape, Kind::Double) * scale;
            let b = rng.randn(&shape, Kind::Double);
            let dy = cuda_randn(&mut rng, &shape, kind);
            let inputs = |k: Kind, off: i64| [leaf(&a, k, off), leaf(&b, k, off)];
            let got = run(op, &inputs(kind, offset), &dy);
            let exact = run(op, &inputs(Kind::Double, 0), &dy);
            let naive = run(formula, &inputs(kind, 0), &dy);
            assert_eq!(got[0].kind(), kind);
            let label = format!("swiglu {kind:?} {shape:?} offset {offset} scale {scale}");
            assert_close(&label, &["y", "da", "db"], &got, &naive, &exact);
        }
    }
}

/// `swiglu_linear` and `rms_norm_linear` against the f64 reference and the unfused kernels: the
/// same output bits as the activation's kernel followed by `linear`, and a weight gradient equal
/// bit for bit to the product of the output gradient with the forward's activation (so the
/// backward kernels wrote the activation again exactly).
#[test]
fn projected_ops_match_the_reference_and_the_unfused_kernels() {
    let Some(_) = cuda() else { return };
    type Op = fn(&[Tensor]) -> Tensor;
    let rows = |y: Tensor, w: &Tensor| y.reshape([-1, w.size()[1]]);
    // Inputs (a, b, w) and (x, norm weight, gate, w); each: the op, the activation's kernel, the
    // activation's formula in the inputs' dtype.
    let swiglu_ops: [Op; 3] = [
        |t| swiglu_linear(&t[0], &t[1], &t[2], None).unwrap(),
        |t| swiglu(&t[0], &t[1]).unwrap(),
        |t| t[0].silu() * &t[1],
    ];
    let norm_ops: [Op; 3] = [
        |t| {
            rms_norm_linear(&t[0], &t[1], EPS, Some(&t[2]), &[&t[3]], None).unwrap()[0]
                .shallow_clone()
        },
        |t| rms_norm(&t[0], &t[1], EPS, Some(&t[2])).unwrap(),
        |t| {
            norm_formula(
                &[
                    t[0].shallow_clone(),
                    t[1].to_kind(t[0].kind()),
                    t[2].shallow_clone(),
                ],
                EPS,
            )
        },
    ];
    // (rows, heads, n, out): odd sizes, unaligned rows, GLA-340M's o_proj and down_proj.
    let shapes = [
        (37, 1, 7, 5),
        (21, 3, 10, 9),
        (2048, 4, 256, 1024),
        (2048, 1, 2816, 1024),
    ];
    for kind in KINDS {
        for (i, &(n_rows, heads, n, out)) in shapes.iter().enumerate() {
            let mut rng = Rng::new(40 + i as u64);
            let shape = [n_rows, heads, n];
            let (a, b) = (
                rng.randn(&shape, Kind::Double),
                rng.randn(&shape, Kind::Double),
            );
            let nw = rng.randn(&[n], Kind::Double) * 0.5 + 1.0;
            let w = rng.randn(&[out, heads * n], Kind::Double) / ((heads * n) as f64).sqrt();
            let dout = cuda_randn(&mut rng, &[n_rows, out], kind);
            // Norm weights fp32 beside half-precision activations, as the models keep them.
            let norm_kind = |k: Kind| if k == Kind::Double { k } else { Kind::Float };
            let cases = [
                (
                    "swiglu_linear",
                    swiglu_ops,
                    vec![(&a, kind), (&b, kind), (&w, kind)],
                    &["y", "da", "db", "dw"][..],
                ),
                (
                    "rms_norm_linear",
                    norm_ops,
                    vec![(&a, kind), (&nw, norm_kind(kind)), (&b, kind), (&w, kind)],
                    &["y", "dx", "dnorm_weight", "dgate", "dw"][..],
                ),
            ];
            for (name, [op, kernel, formula], values, names) in cases {
                let leaves = |as_kind: &dyn Fn(Kind) -> Kind| -> Vec<Tensor> {
                    values
                        .iter()
                        .map(|&(v, k)| leaf(v, as_kind(k), 0))
                        .collect()
                };
                let inputs = leaves(&|k| k);
                let label = format!("{name} {kind:?} rows {n_rows} heads {heads} n {n} out {out}");
                let got = run(op, &inputs, &dout);
                let exact = run(op, &leaves(&|_| Kind::Double), &dout);
                let naive = run(
                    |t| {
                        rows(formula(t), t.last().unwrap())
                            .linear::<Tensor>(t.last().unwrap(), None)
                    },
                    &leaves(&|_| kind),
                    &dout,
                );
                assert_close(&label, names, &got, &naive, &exact);
                let w_in = inputs.last().unwrap();
                let activation = kernel(&inputs).detach();
                let unfused = rows(activation.shallow_clone(), w_in).linear::<Tensor>(w_in, None);
                assert!(
                    got[0].equal(&unfused),
                    "{label}: output differs from the unfused kernels'"
                );
                let dw = dout.tr().mm(&rows(activation, w_in));
                assert!(
                    got.last().unwrap().equal(&dw),
                    "{label}: the activation written again differs"
                );
            }
        }
    }
}

/// A block's norm on the fp32 residual stream and the bf16 projections that read it, as one
/// `rms_norm_linear` (the models' attention and MLP inputs): outputs bit for bit the unfused
/// kernels' (norm, one cast, a product per weight), gradients within twice the unfused path's
/// error against f64.
#[test]
fn a_norm_and_its_projections_match_the_unfused_path() {
    let Some(_) = cuda() else { return };
    // (rows, hidden, outs): odd sizes, GLA-340M's attention (q, k, v, gk_down, g) and MLP.
    let cases = [
        (37, 24, vec![8, 3, 16]),
        (2048, 1024, vec![512, 512, 1024, 16, 1024]),
        (2048, 1024, vec![2816, 2816]),
    ];
    for (i, (rows, hidden, outs)) in cases.into_iter().enumerate() {
        let mut rng = Rng::new(60 + i as u64);
        let x = rng.randn(&[rows, hidden], Kind::Double);
        let nw = rng.randn(&[hidden], Kind::Double) * 0.5 + 1.0;
        let ws: Vec<Tensor> = outs
            .iter()
            .map(|&o| rng.randn(&[o, hidden], Kind::Double) / (hidden as f64).sqrt())
            .collect();
        let douts: Vec<Tensor> = outs
            .iter()
            .map(|&o| cuda_randn(&mut rng, &[rows, o], Kind::BFloat16))
            .collect();
        // x and the norm weight fp32, the projections' weights bf16 (autocast's copies).
        let leaves = |act: Kind, proj: Kind| -> Vec<Tensor> {
            [leaf(&x, act, 0), leaf(&nw, act, 0)]
                .into_iter()
                .chain(ws.iter().map(|w| leaf(w, proj, 0)))
                .collect()
        };
        let fused = |t: &[Tensor]| {
            let w: Vec<&Tensor> = t[2..].iter().collect();
            rms_norm_linear(&t[0], &t[1], EPS, None, &w, None).unwrap()
        };
        let unfused = |t: &[Tensor]| -> Vec<Tensor> {
            let y = rms_norm(&t[0], &t[1], EPS, None).unwrap();
            let y = y.to_kind(t[2].kind());
            t[2..].iter().map(|w| y.linear::<Tensor>(w, None)).collect()
        };
        let run_all = |f: &dyn Fn(&[Tensor]) -> Vec<Tensor>, inputs: &[Tensor]| -> Vec<Tensor> {
            let outs = f(inputs);
            let loss = outs
                .iter()
                .zip(&douts)
                .map(|(o, d)| (o.to_kind(Kind::Double) * d.to_kind(Kind::Double)).sum(Kind::Double))
                .fold(Tensor::from(0.0).to_device(Device::Cuda(0)), |a, b| a + b);
            let refs: Vec<&Tensor> = inputs.iter().collect();
            let one = Tensor::from(1.0).to_device(Device::Cuda(0));
            let mut all: Vec<Tensor> = outs.iter().map(Tensor::detach).collect();
            all.extend(grad(&loss, &one, &refs).unwrap());
            all
        };
        let inputs = leaves(Kind::Float, Kind::BFloat16);
        let got = run_all(&fused, &inputs);
        let naive = run_all(&unfused, &inputs);
        let exact = run_all(&fused, &leaves(Kind::Double, Kind::Double));
        let label = format!("rms_norm_linear rows {rows} hidden {hidden} outs {outs:?}");
        for (o, (g, n)) in got.iter().zip(&naive).take(outs.len()).enumerate() {
            assert!(
                g.equal(n),
                "{label}: output {o} differs from the unfused kernels'"
            );
        }
        let names: Vec<&str> = ["y"; 5][..outs.len()]
            .iter()
            .copied()
            .chain(["dx", "dnorm_weight"])
            .chain(["dw"; 5][..outs.len()].iter().copied())
            .collect();
        assert_close(&label, &names, &got, &naive, &exact);
    }
}

/// The rotary embedding against the f64 reference: shared and per-row tables, one pair, odd
/// halves (the pair-by-pair path), unaligned x, and Transformer++-340M's heads.
#[test]
fn rotary_matches_the_reference() {
    let Some(_) = cuda() else { return };
    let formula = |t: &[Tensor], cos: &Tensor, sin: &Tensor| {
        let half = t[0].size()[3] / 2;
        let table = |x: &Tensor| x.unsqueeze(-2).to_kind(t[0].kind());
        let (c, s) = (table(cos), table(sin));
        let (x1, x2) = (t[0].narrow(3, 0, half), t[0].narrow(3, half, half));
        Tensor::cat(&[&x1 * &c - &x2 * &s, &x2 * &c + &x1 * &s], 3)
    };
    for kind in KINDS {
        for (i, (shape, per_row, offset)) in [
            ([1, 3, 1, 2], false, 0),
            ([2, 5, 3, 6], true, 0),
            ([2, 17, 4, 64], false, 0),
            ([2, 9, 2, 128], true, 0),
            ([1, 7, 3, 64], true, 1),
            ([8, 2048, 16, 64], false, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut rng = Rng::new(70 + i as u64);
            let x = rng.randn(&shape, Kind::Double);
            let [b, t, _, d] = shape;
            let table_shape = if per_row {
                vec![b, t, d / 2]
            } else {
                vec![t, d / 2]
            };
            let angles = cuda_randn(&mut rng, &table_shape, Kind::Double) * 3.0;
            let (cos, sin) = (angles.cos(), angles.sin());
            let dy = cuda_randn(&mut rng, &shape, kind);
            let (c32, s32) = (cos.to_kind(Kind::Float), sin.to_kind(Kind::Float));
            let op = |t: &[Tensor], c: &Tensor, s: &Tensor| rotary(&t[0], c, s).unwrap();
            let got = run(|t| op(t, &c32, &s32), &[leaf(&x, kind, offset)], &dy);
            let exact = run(|t| op(t, &cos, &sin), &[leaf(&x, Kind::Double, 0)], &dy);
            let naive = run(|t| formula(t, &c32, &s32), &[leaf(&x, kind, 0)], &dy);
            assert_eq!(got[0].kind(), kind);
            let label = format!("rotary {kind:?} {shape:?} per_row {per_row} offset {offset}");
            assert_close(&label, &["y", "dx"], &got, &naive, &exact);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ConvCase {
    b: i64,
    t: i64,
    d: i64,
    k: i64,
    bias: bool,
    documents: bool,
    /// x as columns 3.. of a wider tensor (rows neither contiguous nor 16-byte aligned), or
    /// columns 0.. of one twice as wide (Mamba's x and z halves: aligned rows).
    slice: Option<i64>,
}

/// Restarts at steps 1 and 2 (a one-step document), 17, one that moves with the row, and the
/// last step.
fn conv_restarts(c: &ConvCase) -> Tensor {
    let mut flags = vec![false; (c.b * c.t) as usize];
    for row in 0..c.b {
        for step in [1, 2, 17, 5 + 16 * row, c.t - 1] {
            if step > 0 && step < c.t {
                flags[(row * c.t + step) as usize] = true;
            }
        }
    }
    Tensor::from_slice(&flags)
        .view([c.b, c.t])
        .to_device(Device::Cuda(0))
}

fn conv_case(kind: Kind, c: ConvCase, seed: u64) {
    let mut rng = Rng::new(seed);
    let (start, width) = match c.slice {
        Some(start) => (start, c.d + start.max(c.d)),
        None => (0, c.d),
    };
    let x = rng.randn(&[c.b, c.t, width], Kind::Double);
    let w = rng.randn(&[c.d, c.k], Kind::Double) * 0.5;
    let bias = rng.randn(&[c.d], Kind::Double);
    let dy = cuda_randn(&mut rng, &[c.b, c.t, c.d], kind);
    let resets = c.documents.then(|| conv_restarts(&c));
    let columns = |x: &Tensor| x.narrow(2, start, c.d);
    let op = |t: &[Tensor]| causal_conv(&columns(&t[0]), &t[1], t.get(2), resets.as_ref()).unwrap();
    let reference =
        |t: &[Tensor]| conv_reference(&columns(&t[0]), &t[1], t.get(2), resets.as_ref()).unwrap();
    // The weights in fp32 next to activations of any dtype but f64, as the models keep them.
    let inputs = |k: Kind| -> Vec<Tensor> {
        let wk = if k == Kind::Double { k } else { Kind::Float };
        let mut v = vec![leaf(&x, k, 0), leaf(&w, wk, 0)];
        if c.bias {
            v.push(leaf(&bias, wk, 0));
        }
        v
    };
    let got = run(op, &inputs(kind), &dy);
    let exact = run(op, &inputs(Kind::Double), &dy);
    let naive = run(reference, &inputs(kind), &dy);
    assert_eq!(got[0].kind(), kind);
    let names = ["y", "dx", "dw", "dbias"];
    let n = if c.bias { 4 } else { 3 };
    assert_close(
        &format!("causal_conv {kind:?} {c:?}"),
        &names[..n],
        &got,
        &naive,
        &exact,
    );
}

#[test]
fn causal_conv_matches_the_reference() {
    let Some(_) = cuda() else { return };
    let case = |b, t, d, k, bias, documents, slice| ConvCase {
        b,
        t,
        d,
        k,
        bias,
        documents,
        slice,
    };
    let cases = [
        case(1, 1, 8, 4, true, false, None),
        case(2, 5, 3, 4, false, true, None),
        case(3, 100, 64, 4, true, true, None),
        case(2, 257, 136, 3, true, true, None),
        case(2, 77, 40, 2, false, true, Some(3)),
        case(2, 50, 24, 1, true, true, None),
        // Wider than the kernels take: the reference runs.
        case(1, 30, 16, 5, true, true, None),
        // Mamba-370M's convolution: x the first half of the input projection's rows.
        case(1, 1000, 2048, 4, true, true, Some(0)),
        case(8, 2048, 2048, 4, true, false, Some(0)),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        for kind in KINDS {
            conv_case(kind, c, 40 + i as u64);
        }
    }
}
