//! Running a plan on the GPU.

use std::path::Path;

use glatrain_cuda::{CudaTimer, Gpu, GpuSpec, TIMING_ROUNDS};
use glatrain_ops::sdpa::{
    block_causal_sdpa, causal_sdpa, chosen_backend, flash_takes, BlockCausal,
};
use glatrain_ops::{gla, selective_scan, Documents, ScanInputs, ScanOptions};
use glatrain_shim::autograd;
use glatrain_shim::sdp::{OnlyBackend, SdpaBackend};
use tch::{Kind, TchError, Tensor};

use crate::anchors::Anchors;
use crate::article;
use crate::first_call;
use crate::floor::{self, Rates};
use crate::op::{Op, RowShape, ScanShape, Shape, DOCUMENTS_PER_ROW};
use crate::plan::{Plan, Preset, RowSpec};
use crate::report::{table_header, today, Report, RowResult};
use crate::BenchError;

/// Log gates in (-inf, 0), mild enough that decays stay well inside f32 over long sequences.
pub(crate) fn log_gates(shape: &[i64], dev: tch::Device) -> Result<Tensor, TchError> {
    Tensor::f_randn(shape, (Kind::Float, dev))?
        .f_log_sigmoid()?
        .f_div_scalar(16.0)
}

/// Random inputs of one attention-like row, and the documents of its `sdpa_documents` rows.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    d_o: Tensor,
    documents: BlockCausal,
}

impl Inputs {
    fn new(s: &Shape, dtype: Kind, dev: tch::Device) -> Result<Self, BenchError> {
        let (qk, v) = ([s.b, s.t, s.h, s.k], [s.b, s.t, s.h, s.v]);
        let t = s.t as usize;
        let mut starts: Vec<usize> = (1..DOCUMENTS_PER_ROW)
            .map(|i| i * t / DOCUMENTS_PER_ROW)
            .filter(|&p| p > 0)
            .collect();
        starts.dedup();
        let documents = Documents::new(t, vec![starts; s.b as usize])?;
        Ok(Inputs {
            q: Tensor::f_randn(qk, (dtype, dev))?,
            k: Tensor::f_randn(qk, (dtype, dev))?,
            v: Tensor::f_randn(v, (dtype, dev))?,
            g: log_gates(&qk, dev)?,
            d_o: Tensor::f_randn(v, (dtype, dev))?,
            documents: BlockCausal::new(&documents, dev)?,
        })
    }
}

/// Random inputs of one scan row, as a Mamba layer has them: u, delta, z, B, C, dy in the row's
/// dtype, A = -(1..N) per channel (Mamba's initial A), D, and delta_bias the inverse softplus
/// of steps between 0.001 and 0.1 (Mamba's initial dt), all leaves requiring gradients.
struct ScanRowInputs {
    leaves: Vec<Tensor>,
    dy: Tensor,
}

impl ScanRowInputs {
    fn new(s: &ScanShape, dtype: Kind, dev: tch::Device) -> Result<Self, TchError> {
        let f32 = (Kind::Float, dev);
        let (btd, btn) = ([s.b, s.t, s.d], [s.b, s.t, s.n]);
        let a = Tensor::f_arange_start(1, s.n + 1, f32)?
            .f_neg()?
            .f_expand([s.d, s.n], false)?
            .f_contiguous()?;
        let dt = (Tensor::f_rand([s.d], f32)? * (0.1f64.ln() - 0.001f64.ln()) + 0.001f64.ln())
            .f_exp()?;
        let bias = &dt + dt.f_neg()?.f_expm1()?.f_neg()?.f_log()?;
        let leaves = [
            Tensor::f_randn(btd, (dtype, dev))?,                  // u
            (Tensor::f_randn(btd, f32)? * 0.5).f_to_kind(dtype)?, // delta
            a,                                                    // A
            Tensor::f_randn(btn, (dtype, dev))?,                  // B
            Tensor::f_randn(btn, (dtype, dev))?,                  // C
            Tensor::f_ones([s.d], f32)?,                          // D
            Tensor::f_randn(btd, (dtype, dev))?,                  // z
            bias,                                                 // delta_bias
        ]
        .into_iter()
        .map(|t| t.f_set_requires_grad(true))
        .collect::<Result<_, _>>()?;
        Ok(ScanRowInputs {
            leaves,
            dy: Tensor::f_randn(btd, (dtype, dev))?,
        })
    }

    /// The scan's output on the leaves (under autograd: the forward keeps what the backward
    /// needs, as in training).
    fn forward(&self) -> Result<Tensor, BenchError> {
        let l = &self.leaves;
        let inputs = ScanInputs {
            u: &l[0],
            delta: &l[1],
            a: &l[2],
            b: &l[3],
            c: &l[4],
            d: Some(&l[5]),
            z: Some(&l[6]),
            delta_bias: Some(&l[7]),
            initial_state: None,
            resets: None,
        };
        tch::with_grad(|| Ok(selective_scan(&inputs, &ScanOptions::default())?.0))
    }
}

/// The inputs of the rows at one shape and dtype.
enum RowInputs {
    Attention(Inputs),
    Scan(ScanRowInputs),
}

impl RowInputs {
    fn new(shape: &RowShape, dtype: Kind, dev: tch::Device) -> Result<Self, BenchError> {
        Ok(match shape {
            RowShape::Attention(s) => RowInputs::Attention(Inputs::new(s, dtype, dev)?),
            RowShape::Scan(s) => RowInputs::Scan(ScanRowInputs::new(s, dtype, dev)?),
        })
    }
}

/// The op of an attention-like row on q, k, v and the log gates (SDPA ignores them; its backend
/// is set by the caller) or the documents (for block-causal SDPA).
fn attention(
    op: Op,
    [q, k, v, g]: [&Tensor; 4],
    documents: &BlockCausal,
) -> Result<Tensor, BenchError> {
    match op {
        Op::Gla(mode) => Ok(gla(q, k, v, g, None, None, mode, false)?.0),
        Op::Sdpa(_) => Ok(causal_sdpa(q, k, v)?),
        Op::DocumentSdpa => Ok(block_causal_sdpa(q, k, v, documents)?),
        Op::SelectiveScan => Err(BenchError::Arg {
            flag: "--op",
            value: op.name(),
            expected: "selective_scan rows take a scan shape".into(),
        }),
    }
}

/// Iterations per timed round: fewer for the larger rows.
fn iterations(tokens: i64) -> usize {
    if tokens >= 16384 {
        10
    } else {
        20
    }
}

/// Times an attention-like row: (forward, forward + backward) ms, and the SDPA backend that ran
/// (for block-causal SDPA, its path: varlen `flash` or `masked`).
fn time_attention(
    timer: &CudaTimer,
    spec: &RowSpec,
    s: &Shape,
    x: &Inputs,
) -> Result<(f64, f64, Option<&'static str>), BenchError> {
    let op = spec.op;
    let _only = match op {
        Op::Sdpa(Some(backend)) => Some(OnlyBackend::new(backend)),
        _ => None,
    };
    let sdpa_backend = match op {
        Op::Sdpa(_) => chosen_backend(&x.q, &x.k, &x.v)?.map(SdpaBackend::name),
        Op::DocumentSdpa if flash_takes(&x.q, &x.k, &x.v)? => Some("flash"),
        Op::DocumentSdpa => Some("masked"),
        Op::Gla(mode) => {
            glatrain_ops::gla::prepare(0, spec.dtype, mode, true)?;
            None
        }
        Op::SelectiveScan => None,
    };
    let iters = iterations(s.t * s.b);
    let fwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 3, iters, || {
        attention(op, [&x.q, &x.k, &x.v, &x.g], &x.documents).map(drop)
    })?;
    let leaves = [&x.q, &x.k, &x.v, &x.g]
        .iter()
        .map(|t| t.f_detach()?.f_set_requires_grad(true))
        .collect::<Result<Vec<Tensor>, TchError>>()?;
    let inputs: Vec<&Tensor> = leaves.iter().collect();
    let fwd_bwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 2, iters, || {
        tch::with_grad(|| -> Result<(), BenchError> {
            let qkvg = [&leaves[0], &leaves[1], &leaves[2], &leaves[3]];
            let o = attention(op, qkvg, &x.documents)?;
            // o.backward(do), the gradients returned instead of accumulated.
            autograd::grad(&o, &x.d_o, &inputs).map_err(BenchError::Backward)?;
            Ok(())
        })
    })?;
    Ok((fwd_ms, fwd_bwd_ms, sdpa_backend))
}

/// Times a scan row: (forward, forward + backward) ms.
fn time_scan(
    timer: &CudaTimer,
    spec: &RowSpec,
    s: &ScanShape,
    x: &ScanRowInputs,
) -> Result<(f64, f64), BenchError> {
    glatrain_ops::selective_scan::prepare(0, spec.dtype, true)?;
    let iters = iterations(s.tokens());
    let fwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 3, iters, || x.forward().map(drop))?;
    let inputs: Vec<&Tensor> = x.leaves.iter().collect();
    let fwd_bwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 2, iters, || {
        let y = x.forward()?;
        tch::with_grad(|| autograd::grad(&y, &x.dy, &inputs)).map_err(BenchError::Backward)?;
        Ok::<(), BenchError>(())
    })?;
    Ok((fwd_ms, fwd_bwd_ms))
}

/// Times `spec` on CUDA device 0.
fn time_row(
    timer: &CudaTimer,
    spec: &RowSpec,
    x: &RowInputs,
    anchors: &Anchors,
    rates: Option<&Rates>,
) -> Result<RowResult, BenchError> {
    let elem = spec.dtype.elt_size_in_bytes() as f64;
    let ((fwd_ms, fwd_bwd_ms, sdpa_backend), floor) = match (&spec.shape, x) {
        (RowShape::Attention(s), RowInputs::Attention(x)) if !spec.op.is_scan() => (
            time_attention(timer, spec, s, x)?,
            rates.map(|r| floor::attention_floor(s, elem, r)),
        ),
        (RowShape::Scan(s), RowInputs::Scan(x)) if spec.op.is_scan() => {
            let (fwd, all) = time_scan(timer, spec, s, x)?;
            (
                (fwd, all, None),
                rates.map(|r| floor::scan_floor(s, elem, r)),
            )
        }
        _ => {
            return Err(BenchError::Arg {
                flag: "--op",
                value: spec.op.name(),
                expected: format!("an op that takes the shape {}", spec.shape.describe()),
            })
        }
    };
    let anchor = if spec.dtype == Kind::BFloat16 {
        anchors.for_row(spec.op, &spec.shape)
    } else {
        None
    };
    Ok(RowResult {
        spec: *spec,
        sdpa_backend,
        fwd_ms,
        fwd_bwd_ms,
        floor,
        anchor,
    })
}

/// Runs `plan` on CUDA device 0, printing a table as it goes; writes the report as JSON to
/// `json_out` when given. A row the op cannot run (an SDPA backend that does not support the
/// shape, a shape past a kernel's limits) is reported and skipped. A preset also prints its
/// comparison table and draws its chart to `chart_out` (when given).
///
/// The first-call time is meaningful only while the GLA kernels are not yet loaded in this
/// process and CUDA is not yet initialised: call this before any other CUDA work. It disables
/// NVRTC's own cache for the process.
///
/// # Errors
///
/// [`BenchError::NoCuda`] without a CUDA device; CUDA or libtorch failures outside a row; a report
/// or chart that cannot be written.
pub fn run(
    plan: &Plan,
    json_out: Option<&Path>,
    chart_out: Option<&Path>,
) -> Result<Report, BenchError> {
    // CUDA 13 keeps NVRTC results in its own cache (~/.nv/ComputeCache), which would make the
    // first-call measurement a cache hit. The driver reads this variable when CUDA initialises,
    // which the next line does.
    std::env::set_var("CUDA_CACHE_DISABLE", "1");
    if !tch::Cuda::is_available() {
        return Err(BenchError::NoCuda);
    }
    let cuda = Gpu::get(0)?;
    let properties = cuda.properties()?;
    let rates = GpuSpec::lookup(&properties.name)
        .map(|spec| (Rates::of(spec, properties.sm_count), spec.measured));
    let timer = CudaTimer::new(0)?;
    let anchors = Anchors::embedded();
    let _guard = tch::no_grad_guard();

    let first_call = if plan.first_call {
        let first = first_call::measure(&cuda)?;
        println!("{}", first.describe());
        Some(first)
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut inputs: Option<((RowShape, Kind), RowInputs)> = None;
    println!("{}", table_header());
    for row in &plan.rows {
        let key = (row.shape, row.dtype);
        if inputs.as_ref().is_none_or(|(k, _)| *k != key) {
            // One set of inputs per shape and dtype: the previous one is freed first.
            drop(inputs.take());
            inputs = Some((
                key,
                RowInputs::new(&row.shape, row.dtype, tch::Device::Cuda(0))?,
            ));
        }
        let Some((_, x)) = &inputs else {
            continue;
        };
        match time_row(&timer, row, x, &anchors, rates.as_ref().map(|r| &r.0)) {
            Ok(result) => {
                println!("{}", result.table_line());
                rows.push(result);
            }
            Err(e) => println!("{} {}: not run: {e}", row.shape.describe(), row.op.name()),
        }
    }
    let report = Report {
        gpu: properties.name,
        date: today(),
        rates,
        first_call,
        rows,
        preset: plan.preset,
    };
    if let Some(Preset::Article) = plan.preset {
        println!("\n{}", article::table(&report.rows));
        println!("({})", article::choices());
    }
    if let Some(path) = json_out {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    if let (Some(Preset::Article), Some(path)) = (plan.preset, chart_out) {
        article::draw(&report, path)?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}
