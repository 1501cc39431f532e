//! Running a plan on the GPU.

use std::path::Path;

use glatrain_cuda::{CudaTimer, Gpu, GpuSpec, TIMING_ROUNDS};
use glatrain_ops::gla;
use glatrain_ops::sdpa::{causal_sdpa, chosen_backend};
use glatrain_shim::autograd;
use glatrain_shim::sdp::{OnlyBackend, SdpaBackend};
use tch::{Kind, TchError, Tensor};

use crate::anchors::Anchors;
use crate::first_call;
use crate::floor;
use crate::op::{Op, Shape};
use crate::plan::{Plan, RowSpec};
use crate::report::{table_header, today, Report, RowResult};
use crate::BenchError;

/// Log gates in (-inf, 0), mild enough that decays stay well inside f32 over long sequences.
pub(crate) fn log_gates(shape: &[i64], dev: tch::Device) -> Result<Tensor, TchError> {
    Tensor::f_randn(shape, (Kind::Float, dev))?
        .f_log_sigmoid()?
        .f_div_scalar(16.0)
}

/// Random inputs of one attention-like row.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    d_o: Tensor,
}

impl Inputs {
    fn new(s: &Shape, dtype: Kind, dev: tch::Device) -> Result<Self, TchError> {
        let (qk, v) = ([s.b, s.t, s.h, s.k], [s.b, s.t, s.h, s.v]);
        Ok(Inputs {
            q: Tensor::f_randn(qk, (dtype, dev))?,
            k: Tensor::f_randn(qk, (dtype, dev))?,
            v: Tensor::f_randn(v, (dtype, dev))?,
            g: log_gates(&qk, dev)?,
            d_o: Tensor::f_randn(v, (dtype, dev))?,
        })
    }
}

/// The op of a row on q, k, v and the log gates (SDPA ignores them; its backend is set by the
/// caller).
fn forward(op: Op, q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Tensor, BenchError> {
    match op {
        Op::Gla(mode) => Ok(gla(q, k, v, g, None, None, mode, false)?.0),
        Op::Sdpa(_) => Ok(causal_sdpa(q, k, v)?),
    }
}

/// Times `spec` on CUDA device 0.
fn time_row(
    timer: &CudaTimer,
    spec: &RowSpec,
    x: &Inputs,
    anchors: &Anchors,
    copy_bandwidth: Option<f64>,
) -> Result<RowResult, BenchError> {
    let op = spec.op;
    let _only = match op {
        Op::Sdpa(Some(backend)) => Some(OnlyBackend::new(backend)),
        _ => None,
    };
    let sdpa_backend = match op {
        Op::Sdpa(_) => chosen_backend(&x.q, &x.k, &x.v)?.map(SdpaBackend::name),
        Op::Gla(mode) => {
            glatrain_ops::gla::prepare(0, spec.dtype, mode, true)?;
            None
        }
    };
    let s = spec.shape;
    let iters = if s.t * s.b >= 16384 { 10 } else { 20 };
    let fwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 3, iters, || {
        forward(op, &x.q, &x.k, &x.v, &x.g).map(drop)
    })?;
    let leaves = [&x.q, &x.k, &x.v, &x.g]
        .iter()
        .map(|t| t.f_detach()?.f_set_requires_grad(true))
        .collect::<Result<Vec<Tensor>, TchError>>()?;
    let inputs: Vec<&Tensor> = leaves.iter().collect();
    let fwd_bwd_ms = timer.fastest_median_ms(TIMING_ROUNDS, 2, iters, || {
        tch::with_grad(|| -> Result<(), BenchError> {
            let o = forward(op, &leaves[0], &leaves[1], &leaves[2], &leaves[3])?;
            // o.backward(do), the gradients returned instead of accumulated.
            autograd::grad(&o, &x.d_o, &inputs).map_err(BenchError::Backward)?;
            Ok(())
        })
    })?;
    let elem = spec.dtype.elt_size_in_bytes() as f64;
    let floor_ms = copy_bandwidth.map(|bw| {
        let (fwd, all) = floor::attention_bytes(&s, elem);
        (floor::ms(fwd, bw), floor::ms(all, bw))
    });
    let anchor = if spec.dtype == Kind::BFloat16 {
        anchors.for_row(op, &s)
    } else {
        None
    };
    Ok(RowResult {
        spec: *spec,
        sdpa_backend,
        fwd_ms,
        fwd_bwd_ms,
        floor_ms,
        anchor,
    })
}

/// Runs `plan` on CUDA device 0, printing a table as it goes; writes the report as JSON to
/// `json_out` when given. A row the op cannot run (an SDPA backend that does not support the
/// shape, a shape past a kernel's limits) is reported and skipped.
///
/// The first-call time is meaningful only while the GLA kernels are not yet loaded in this
/// process and CUDA is not yet initialised: call this before any other CUDA work. It disables
/// NVRTC's own cache for the process.
///
/// # Errors
///
/// [`BenchError::NoCuda`] without a CUDA device; CUDA or libtorch failures outside a row; a report
/// that cannot be written.
pub fn run(plan: &Plan, json_out: Option<&Path>) -> Result<Report, BenchError> {
    // CUDA 13 keeps NVRTC results in its own cache (~/.nv/ComputeCache), which would make the
    // first-call measurement a cache hit. The driver reads this variable when CUDA initialises,
    // which the next line does.
    std::env::set_var("CUDA_CACHE_DISABLE", "1");
    if !tch::Cuda::is_available() {
        return Err(BenchError::NoCuda);
    }
    let cuda = Gpu::get(0)?;
    let gpu = cuda.properties()?.name;
    let spec = GpuSpec::lookup(&gpu);
    let copy_bandwidth = spec.map(|s| (s.copy_bytes_per_s, s.measured));
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
    let mut inputs: Option<((Shape, Kind), Inputs)> = None;
    println!("{}", table_header());
    for row in &plan.rows {
        let key = (row.shape, row.dtype);
        if inputs.as_ref().is_none_or(|(k, _)| *k != key) {
            // One set of inputs per shape and dtype: the previous one is freed first.
            drop(inputs.take());
            inputs = Some((
                key,
                Inputs::new(&row.shape, row.dtype, tch::Device::Cuda(0))?,
            ));
        }
        let Some((_, x)) = &inputs else {
            continue;
        };
        match time_row(&timer, row, x, &anchors, copy_bandwidth.map(|b| b.0)) {
            Ok(result) => {
                println!("{}", result.table_line());
                rows.push(result);
            }
            Err(e) => println!("{} {}: not run: {e}", row.shape.name(), row.op.name()),
        }
    }
    let report = Report {
        gpu,
        date: today(),
        copy_bandwidth,
        first_call,
        rows,
    };
    if let Some(path) = json_out {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    Ok(report)
}
