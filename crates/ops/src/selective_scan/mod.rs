//! Mamba's selective scan as one differentiable op, mamba_ssm's `selective_scan_fn` in the
//! sequence-first layout: [`selective_scan`] checks its inputs and runs, on CUDA, the kernels of
//! `kernels/selective_scan.cu` (through the autograd bridge, so `loss.backward()` reaches the
//! CUDA backward), and on the CPU or for [`ScanMode::Reference`] the tensor-op reference.
//!
//! ```text
//! delta'_t = softplus(delta_t + delta_bias)      (or delta_t + delta_bias without softplus)
//! h_t      = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t      per channel d and state n
//! y_t      = C_t . h_t + D u_t,     out_t = y_t silu(z_t)    (D, z optional)
//! ```

pub mod kernels;

pub use kernels::{Dims, Segments};

use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Device, Kind, Tensor};

use crate::bridge::{self, bridged, bridged_list};
use crate::error::{is_float, require_device};
use crate::launch::kernel_dtype;
use crate::reference::selective_scan::{
    selective_scan_chunked, selective_scan_sequential, DEFAULT_CHUNK,
};
use crate::OpError;

const OP: &str = "selective_scan";

/// Where the scan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// The CUDA kernels on CUDA tensors (the reference on the CPU).
    Kernels,
    /// The tensor-op reference on any device (token by token on the CPU and for one token,
    /// chunked otherwise).
    Reference,
}

/// The inputs of one scan, sequence-first. u, delta, z, B and C share one dtype; A, D,
/// delta_bias and the initial state are used in fp32 (f64 in the reference for f64 inputs).
/// u, delta, z, B and C may be column slices of larger tensors (strided rows): the kernels read
/// them in place.
///
/// # Shapes
/// u, delta, z: `[B, T, D]`; a: `[D, N]`; b, c: `[B, T, N]`; d, delta_bias: `[D]`;
/// initial_state: `[B, D, N]`; resets: `[B, T]`.
#[derive(Debug, Clone, Copy)]
pub struct ScanInputs<'a> {
    pub u: &'a Tensor,
    pub delta: &'a Tensor,
    /// The state matrix, `-exp(A_log)` in Mamba (negative: every step decays the state).
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub c: &'a Tensor,
    /// The skip connection `D u`.
    pub d: Option<&'a Tensor>,
    /// The gate: `out = y silu(z)`.
    pub z: Option<&'a Tensor>,
    /// Added to delta before the softplus.
    pub delta_bias: Option<&'a Tensor>,
    pub initial_state: Option<&'a Tensor>,
    /// `[B, T]` bool: where the state restarts from zero (a document begins), as if the steps
    /// before were another sequence ([`crate::Documents::resets`]).
    pub resets: Option<&'a Tensor>,
}

/// How to run one scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// `delta' = softplus(delta + delta_bias)` (Mamba's setting), else `delta + delta_bias`.
    pub delta_softplus: bool,
    /// Return the final state.
    pub output_final_state: bool,
    pub mode: ScanMode,
    /// The kernels' split of the sequence into segments walked in parallel (the launchers' rule
    /// by default; fixed for tests and tuning).
    pub segments: Segments,
}

impl Default for ScanOptions {
    /// Mamba's settings: softplus on, no final state, the kernels where there are any.
    fn default() -> Self {
        ScanOptions {
            delta_softplus: true,
            output_final_state: false,
            mode: ScanMode::Kernels,
            segments: Segments::Auto,
        }
    }
}

impl ScanInputs<'_> {
    /// Every present tensor with its name, u first.
    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let optional = [
            ("D", self.d),
            ("z", self.z),
            ("delta_bias", self.delta_bias),
            ("initial_state", self.initial_state),
        ];
        [
            ("u", self.u),
            ("delta", self.delta),
            ("A", self.a),
            ("B", self.b),
            ("C", self.c),
        ]
        .into_iter()
        .chain(optional.into_iter().filter_map(|(n, t)| t.map(|t| (n, t))))
        .collect()
    }

    /// Checks shapes, dtypes and devices; returns the sizes.
    fn check(&self) -> Result<Dims, OpError> {
        let us = self.u.size();
        if us.len() != 3 {
            return Err(OpError::shape(OP, "u", "[B, T, D]".into(), us));
        }
        let a = self.a.size();
        if a.len() != 2 || a[0] != us[2] || a[1] < 1 {
            let expected = format!("[D, N] with D = {} and N >= 1", us[2]);
            return Err(OpError::shape(OP, "A", expected, a));
        }
        let (b, t, d, n) = (us[0], us[1], us[2], a[1]);
        let want = |name, tensor: Option<&Tensor>, shape: Vec<i64>, words: &str| match tensor
            .filter(|x| x.size() != shape)
        {
            Some(x) => Err(OpError::shape(
                OP,
                name,
                format!("{words} = {shape:?}"),
                x.size(),
            )),
            None => Ok(()),
        };
        want("delta", Some(self.delta), us.clone(), "u's shape [B, T, D]")?;
        want("z", self.z, us.clone(), "u's shape [B, T, D]")?;
        want("B", Some(self.b), vec![b, t, n], "[B, T, N]")?;
        want("C", Some(self.c), vec![b, t, n], "[B, T, N]")?;
        want("D", self.d, vec![d], "[D]")?;
        want("delta_bias", self.delta_bias, vec![d], "[D]")?;
        want(
            "initial_state",
            self.initial_state,
            vec![b, d, n],
            "[B, D, N]",
        )?;
        if let Some(r) = self.resets {
            if r.size() != [b, t] {
                let expected = format!("[B, T] = {:?}", [b, t]);
                return Err(OpError::shape(OP, "resets", expected, r.size()));
            }
            if r.kind() != Kind::Bool {
                let expected = "expected Bool".into();
                return Err(OpError::dtype(OP, "resets", expected, r.kind()));
            }
            require_device("resets", r, self.u)?;
        }
        for (name, x) in self.named() {
            if !is_float(x.kind()) {
                let expected = "expected a floating-point dtype".into();
                return Err(OpError::dtype(OP, name, expected, x.kind()));
            }
            require_device(name, x, self.u)?;
        }
        let same_dtype = [
            ("delta", Some(self.delta)),
            ("B", Some(self.b)),
            ("C", Some(self.c)),
            ("z", self.z),
        ];
        for (name, x) in same_dtype {
            if let Some(x) = x.filter(|x| x.kind() != self.u.kind()) {
                let expected = format!("expected u's dtype {:?}", self.u.kind());
                return Err(OpError::dtype(OP, name, expected, x.kind()));
            }
        }
        Ok(Dims { b, t, d, n })
    }
}

/// The mode that runs on `device`: the reference on the CPU and for [`ScanMode::Reference`],
/// else the kernels.
fn effective_mode(mode: ScanMode, device: Device) -> ScanMode {
    match device {
        Device::Cuda(_) => mode,
        _ => ScanMode::Reference,
    }
}

/// Compiles (or reads from the disk cache) and loads the scan kernels for inputs of `kind` on
/// CUDA device `ordinal`, so that the first [`selective_scan`] call does not wait for them; safe
/// to call from another thread while the caller goes on. With `optimised`, also waits until the
/// optimised (Full tier) kernels are loaded, as every timing of the op must. Nothing to do for
/// dtypes without kernels.
pub fn prepare(ordinal: usize, kind: Kind, optimised: bool) -> Result<(), OpError> {
    match kernel_dtype(kind) {
        Some(dtype) => Ok(kernels::prepare(ordinal, dtype, optimised)?),
        None => Ok(()),
    }
}

/// Mamba's selective scan, differentiable in every input (see the module docs for the
/// formulas). Returns `out` `[B, T, D]` in u's dtype and, with
/// [`ScanOptions::output_final_state`], the final state `[B, D, N]` (f32; f64 for f64 inputs to
/// the reference). Decoding is the same call with T = 1 and the carried state as
/// `initial_state`; T = 0 returns the initial state (or zeros).
///
/// CUDA tensors run the kernels (u in f32, bf16 or f16; N from 1 to 256; any T), unless
/// [`ScanMode::Reference`]; CPU tensors run the reference.
pub fn selective_scan(
    x: &ScanInputs,
    options: &ScanOptions,
) -> Result<(Tensor, Option<Tensor>), OpError> {
    let dims = x.check()?;
    let (out, state) = match effective_mode(options.mode, x.u.device()) {
        ScanMode::Reference => reference(x, options.delta_softplus)?,
        ScanMode::Kernels => {
            if kernel_dtype(x.u.kind()).is_none() {
                let expected =
                    "the CUDA kernels take f32, bf16 or f16 (ScanMode::Reference takes any)".into();
                return Err(OpError::dtype(OP, "u", expected, x.u.kind()));
            }
            if dims.n > kernels::geometry::MAX_STATES {
                let expected = format!(
                    "[D, N] with N <= {} for the CUDA kernels (ScanMode::Reference takes any)",
                    kernels::geometry::MAX_STATES
                );
                return Err(OpError::shape(OP, "A", expected, x.a.size()));
            }
            apply(x, options)?
        }
    };
    Ok((out, options.output_final_state.then_some(state)))
}

/// The reference: delta' in the compute dtype (f64 for f64 inputs, else f32), the sequential scan
/// on the CPU, for one token and with restarts, the chunked one otherwise, the gate in the compute dtype; out
/// cast to u's dtype once.
fn reference(x: &ScanInputs, softplus: bool) -> Result<(Tensor, Tensor), OpError> {
    let kind = if x.named().iter().any(|(_, t)| t.kind() == Kind::Double) {
        Kind::Double
    } else {
        Kind::Float
    };
    let mut delta = x.delta.f_to_kind(kind)?;
    if let Some(bias) = x.delta_bias {
        delta = delta.f_add(&bias.f_to_kind(kind)?)?;
    }
    if softplus {
        delta = delta.f_softplus()?;
    }
    let [u, a, b, c] = [x.u, x.a, x.b, x.c].map(|t| t.f_to_kind(kind));
    let (u, a, b, c) = (u?, a?, b?, c?);
    let d = x.d.map(|d| d.f_to_kind(kind)).transpose()?;
    let h0 = x.initial_state.map(|h| h.f_to_kind(kind)).transpose()?;
    let sequential = x.u.device() == Device::Cpu || x.u.size()[1] == 1 || x.resets.is_some();
    let (y, state) = if sequential {
        selective_scan_sequential(&u, &delta, &a, &b, &c, d.as_ref(), h0.as_ref(), x.resets)
    } else {
        selective_scan_chunked(
            &u,
            &delta,
            &a,
            &b,
            &c,
            d.as_ref(),
            h0.as_ref(),
            DEFAULT_CHUNK,
        )
    };
    let out = match x.z {
        Some(z) => y.f_mul(&z.f_to_kind(kind)?.f_silu()?)?,
        None => y,
    };
    Ok((out.f_to_kind(x.u.kind())?, state))
}

/// The kernels as an autograd op: inputs (u, delta, A, B, C, D, z, delta_bias, h0, resets), outputs
/// (out, final state), saved (the inputs, the chunk-start states, the pre-gate output).
struct ScanOp {
    softplus: bool,
    segments: Segments,
}

/// The kernels' inputs from the bridge's list (u, delta, A, B, C, D, z, delta_bias, h0, resets).
fn kernel_inputs<'a>(list: &[Option<&'a Tensor>]) -> Result<ScanInputs<'a>, String> {
    let [u, delta, a, b, c, d, z, bias, h0, resets] = bridged_list(OP, "inputs", list)?;
    Ok(ScanInputs {
        u: bridged(OP, *u, "u")?,
        delta: bridged(OP, *delta, "delta")?,
        a: bridged(OP, *a, "A")?,
        b: bridged(OP, *b, "B")?,
        c: bridged(OP, *c, "C")?,
        d: *d,
        z: *z,
        delta_bias: *bias,
        initial_state: *h0,
        resets: *resets,
    })
}

impl CustomOp for ScanOp {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let x = kernel_inputs(inputs)?;
        let out =
            kernels::forward(&x, self.softplus, self.segments, true).map_err(|e| e.to_string())?;
        Ok(Forward::saving(
            vec![out.out, out.final_state],
            inputs,
            [out.checkpoints, out.ypre],
        ))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [inputs @ .., checkpoints, ypre] = saved else {
            return Err("selective_scan: no saved tensors".into());
        };
        let x = kernel_inputs(inputs)?;
        let checkpoints = bridged(OP, *checkpoints, "the chunk-start states")?;
        let run = || -> Result<kernels::Backward, OpError> {
            // Only the final state was used: the output contributes nothing.
            let dout = match grads.first().copied().flatten() {
                Some(g) => rows_of_kind(g, x.u.kind())?,
                None => x.u.f_zeros_like()?,
            };
            let dht = bridge::state_grad(grads.get(1).copied().flatten())?;
            let inputs = kernels::BackwardInputs {
                x,
                checkpoints,
                ypre: *ypre,
                dout: &dout,
                dht: dht.as_ref(),
            };
            kernels::backward(&inputs, self.softplus, self.segments)
        };
        let g = run().map_err(|e| e.to_string())?;
        Ok(vec![
            Some(g.du),
            Some(g.ddelta),
            Some(g.da),
            Some(g.db),
            Some(g.dc),
            g.dd,
            g.dz,
            g.dbias,
            g.dh0,
            None,
        ])
    }
}

/// `t` in `kind` with its innermost dimension contiguous: `t` itself where it is, else a copy.
fn rows_of_kind(t: &Tensor, kind: Kind) -> Result<Tensor, OpError> {
    let t = if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.f_to_kind(kind)?
    };
    Ok(if kernels::row_major(&t) {
        t
    } else {
        t.f_contiguous()?
    })
}

/// `t` as a contiguous f32 tensor: `t` itself where it is one, else a converted copy.
fn contiguous_f32(t: &Tensor) -> Result<Tensor, OpError> {
    Ok(if t.kind() == Kind::Float && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.f_to_kind(Kind::Float)?.f_contiguous()?
    })
}

/// Whether libtorch records gradients on this thread (off under `no_grad`).
fn grad_mode() -> bool {
    // SAFETY: at_grad_set_enabled sets libtorch's thread-local gradient mode and returns the
    // previous one; the second call puts that back.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(1);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// Runs the kernels, through the autograd bridge when a gradient is to be recorded.
fn apply(x: &ScanInputs, options: &ScanOptions) -> Result<(Tensor, Tensor), OpError> {
    let kind = x.u.kind();
    let rows = |t: &Tensor| rows_of_kind(t, kind);
    let (u, delta, b, c) = (rows(x.u)?, rows(x.delta)?, rows(x.b)?, rows(x.c)?);
    let z = x.z.map(rows).transpose()?;
    let a = contiguous_f32(x.a)?;
    let [d, bias, h0] =
        [x.d, x.delta_bias, x.initial_state].map(|t| t.map(contiguous_f32).transpose());
    let (d, bias, h0) = (d?, bias?, h0?);
    let resets = x.resets.map(Tensor::f_contiguous).transpose()?;
    let list = [
        Some(&u),
        Some(&delta),
        Some(&a),
        Some(&b),
        Some(&c),
        d.as_ref(),
        z.as_ref(),
        bias.as_ref(),
        h0.as_ref(),
        resets.as_ref(),
    ];
    if !grad_mode() || !list.iter().flatten().any(|t| t.requires_grad()) {
        // Nothing to differentiate (inference, decoding): keep nothing for a backward.
        let inputs = kernel_inputs(&list).map_err(OpError::Autograd)?;
        let out = kernels::forward(&inputs, options.delta_softplus, options.segments, false)?;
        return Ok((out.out, out.final_state));
    }
    let op = ScanOp {
        softplus: options.delta_softplus,
        segments: options.segments,
    };
    let [out, state] = bridge::apply(OP, op, &list)?;
    Ok((out, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};

    /// f64 CPU inputs of B x T x D x N with every optional tensor.
    struct Owned {
        u: Tensor,
        delta: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        d: Tensor,
        z: Tensor,
        bias: Tensor,
        h0: Tensor,
    }

    impl Owned {
        fn new(seed: u64, [bb, t, d, n]: [i64; 4]) -> Owned {
            let mut rng = Rng::new(seed);
            let k = Kind::Double;
            Owned {
                u: rng.randn(&[bb, t, d], k),
                delta: rng.randn(&[bb, t, d], k) - 1.0,
                a: -rng.randn(&[d, n], k).exp(),
                b: rng.randn(&[bb, t, n], k),
                c: rng.randn(&[bb, t, n], k),
                d: rng.randn(&[d], k),
                z: rng.randn(&[bb, t, d], k),
                bias: rng.randn(&[d], k) * 0.5,
                h0: rng.randn(&[bb, d, n], k),
            }
        }

        fn inputs(&self) -> ScanInputs<'_> {
            ScanInputs {
                u: &self.u,
                delta: &self.delta,
                a: &self.a,
                b: &self.b,
                c: &self.c,
                d: Some(&self.d),
                z: Some(&self.z),
                delta_bias: Some(&self.bias),
                initial_state: Some(&self.h0),
                resets: None,
            }
        }
    }

    fn with_state() -> ScanOptions {
        ScanOptions {
            output_final_state: true,
            ..ScanOptions::default()
        }
    }

    #[test]
    fn the_reference_runs_on_the_cpu() {
        let cuda = Device::Cuda(0);
        assert_eq!(
            effective_mode(ScanMode::Kernels, Device::Cpu),
            ScanMode::Reference
        );
        assert_eq!(effective_mode(ScanMode::Kernels, cuda), ScanMode::Kernels);
        assert_eq!(
            effective_mode(ScanMode::Reference, cuda),
            ScanMode::Reference
        );
        // Nothing to prepare for dtypes without kernels (and no device needed for that).
        prepare(0, Kind::Int64, false).unwrap();
    }

    #[test]
    fn cpu_computes_the_formula_token_by_token() {
        // One channel, two states, every option: the recurrence written out by hand.
        let x = Owned::new(3, [1, 4, 1, 2]);
        let (out, state) = selective_scan(&x.inputs(), &with_state()).unwrap();
        let v = |t: &Tensor, i: &[i64]| t.double_value(i);
        let mut h = [v(&x.h0, &[0, 0, 0]), v(&x.h0, &[0, 0, 1])];
        for t in 0..4 {
            let raw = v(&x.delta, &[0, t, 0]) + v(&x.bias, &[0]);
            let dt = raw.exp().ln_1p();
            let u = v(&x.u, &[0, t, 0]);
            let mut y = v(&x.d, &[0]) * u;
            for (n, s) in h.iter_mut().enumerate() {
                let n = n as i64;
                *s = (dt * v(&x.a, &[0, n])).exp() * *s + dt * u * v(&x.b, &[0, t, n]);
                y += v(&x.c, &[0, t, n]) * *s;
            }
            let z = v(&x.z, &[0, t, 0]);
            let want = y * z / (1.0 + (-z).exp());
            assert!((v(&out, &[0, t, 0]) - want).abs() < 1e-12, "t {t}");
        }
        let state = state.unwrap();
        assert_eq!(state.kind(), Kind::Double);
        assert!((v(&state, &[0, 0, 1]) - h[1]).abs() < 1e-12);
    }

    #[test]
    fn restarts_compute_each_document_as_if_alone() {
        // Row 0 holds documents [0, 3), [3, 7), [7, 9); row 1 [0, 5), [5, 9). Outputs and every
        // gradient equal those of the five documents scanned apart.
        let x = Owned::new(17, [2, 9, 3, 4]);
        let docs = crate::Documents::new(9, vec![vec![3, 7], vec![5]]).unwrap();
        let resets = docs.resets(Device::Cpu).unwrap();
        let leaves: Vec<Tensor> = [&x.u, &x.delta, &x.a, &x.b, &x.c, &x.d, &x.z, &x.bias]
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        let inputs = |l: &[Tensor], resets: Option<&'_ Tensor>| -> (Tensor, Tensor) {
            let x = ScanInputs {
                u: &l[0],
                delta: &l[1],
                a: &l[2],
                b: &l[3],
                c: &l[4],
                d: Some(&l[5]),
                z: Some(&l[6]),
                delta_bias: Some(&l[7]),
                initial_state: None,
                resets,
            };
            let (out, _) = selective_scan(&x, &with_state()).unwrap();
            let loss = (&out * out.ones_like().cumsum(1, Kind::Double)).sum(Kind::Double);
            (out, loss)
        };
        let (together, loss) = inputs(&leaves, Some(&resets));
        let grads = Tensor::run_backward(&[&loss], &leaves, false, false);

        let apart: Vec<Tensor> = leaves
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        let mut outs = Vec::new();
        let mut losses = Vec::new();
        for (row, begin, len) in docs.spans() {
            let piece = |t: &Tensor| {
                t.narrow(0, row as i64, 1)
                    .narrow(1, begin as i64, len as i64)
            };
            let per_token = [0, 1, 3, 4, 6];
            let l: Vec<Tensor> = apart
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if per_token.contains(&i) {
                        piece(t)
                    } else {
                        t.shallow_clone()
                    }
                })
                .collect();
            let (out, _) = inputs(&l, None);
            // The same weights as the together run's loss: position within the row.
            let weights = Tensor::arange_start(
                begin as i64 + 1,
                (begin + len) as i64 + 1,
                (Kind::Double, Device::Cpu),
            );
            losses.push((&out * weights.view([1, -1, 1])).sum(Kind::Double));
            outs.push((row, begin, out));
        }
        for (row, begin, out) in &outs {
            let len = out.size()[1];
            let part = together
                .narrow(0, *row as i64, 1)
                .narrow(1, *begin as i64, len);
            assert!(rel_rms(&part, out) < 1e-13, "row {row} from {begin}");
        }
        let total = losses.into_iter().reduce(|a, b| a + b).unwrap();
        let apart_grads = Tensor::run_backward(&[&total], &apart, false, false);
        for (i, (g, h)) in grads.iter().zip(&apart_grads).enumerate() {
            assert!(rel_rms(g, h) < 1e-12, "gradient {i}: {}", rel_rms(g, h));
        }
    }

    #[test]
    fn options_drop_their_terms() {
        let x = Owned::new(5, [2, 9, 3, 4]);
        let full = x.inputs();
        // The bias goes in before the softplus; without the softplus, delta + bias is the step.
        let stepped = (&x.delta + &x.bias).softplus();
        let given_steps = ScanInputs {
            delta: &stepped,
            delta_bias: None,
            ..full
        };
        let plain = ScanOptions {
            delta_softplus: false,
            ..with_state()
        };
        let (a, _) = selective_scan(&given_steps, &plain).unwrap();
        let (c, _) = selective_scan(&full, &with_state()).unwrap();
        assert!(rel_rms(&a, &c) < 1e-14);
        // Without z the output is y; with z, y silu(z).
        let ungated = ScanInputs { z: None, ..full };
        let (y, _) = selective_scan(&ungated, &with_state()).unwrap();
        assert!(rel_rms(&(&y * x.z.silu()), &c) < 1e-14);
        // Without D, the skip term is gone.
        let no_skip = ScanInputs { d: None, ..ungated };
        let (y0, _) = selective_scan(&no_skip, &with_state()).unwrap();
        assert!(rel_rms(&(&y0 + &x.u * &x.d), &y) < 1e-14);
        // Without an initial state, the scan starts from zeros.
        let zero = x.h0.zeros_like();
        let from_zero = ScanInputs {
            initial_state: Some(&zero),
            ..full
        };
        let fresh = ScanInputs {
            initial_state: None,
            ..full
        };
        let (p, hp) = selective_scan(&from_zero, &with_state()).unwrap();
        let (q, hq) = selective_scan(&fresh, &with_state()).unwrap();
        assert!(rel_rms(&p, &q) < 1e-14 && rel_rms(&hp.unwrap(), &hq.unwrap()) < 1e-14);
        // The final state only when asked for.
        let (_, none) = selective_scan(&full, &ScanOptions::default()).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn decoding_token_by_token_equals_the_whole_sequence() {
        let x = Owned::new(7, [2, 6, 3, 5]);
        let (whole, h_whole) = selective_scan(&x.inputs(), &with_state()).unwrap();
        let mut state = x.h0.shallow_clone();
        let mut outs = Vec::new();
        for t in 0..6 {
            let step = |v: &Tensor| v.narrow(1, t, 1);
            let (u, delta, b, c, z) = (
                step(&x.u),
                step(&x.delta),
                step(&x.b),
                step(&x.c),
                step(&x.z),
            );
            let inputs = ScanInputs {
                u: &u,
                delta: &delta,
                b: &b,
                c: &c,
                z: Some(&z),
                initial_state: Some(&state),
                ..x.inputs()
            };
            let (out, h) = selective_scan(&inputs, &with_state()).unwrap();
            outs.push(out);
            state = h.unwrap();
        }
        assert!(rel_rms(&Tensor::cat(&outs, 1), &whole) < 1e-13);
        assert!(rel_rms(&state, &h_whole.unwrap()) < 1e-13);
    }

    #[test]
    fn an_empty_sequence_returns_the_initial_state() {
        let x = Owned::new(9, [2, 0, 3, 4]);
        let (out, state) = selective_scan(&x.inputs(), &with_state()).unwrap();
        assert_eq!(out.size(), [2, 0, 3]);
        assert_eq!(rel_rms(&state.unwrap(), &x.h0), 0.0);
    }

    #[test]
    fn half_precision_inputs_compute_in_fp32_and_return_their_dtype() {
        let x = Owned::new(11, [1, 5, 2, 3]);
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (u, delta, b, c, z) = (bf(&x.u), bf(&x.delta), bf(&x.b), bf(&x.c), bf(&x.z));
        let a = x.a.to_kind(Kind::Float);
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d: None,
            z: Some(&z),
            delta_bias: None,
            initial_state: None,
            resets: None,
        };
        let (out, state) = selective_scan(&inputs, &with_state()).unwrap();
        assert_eq!(
            (out.kind(), state.unwrap().kind()),
            (Kind::BFloat16, Kind::Float)
        );
    }

    #[test]
    fn errors_name_the_tensor_and_value() {
        let x = Owned::new(13, [2, 4, 3, 5]);
        let base = x.inputs();
        let check = |inputs: ScanInputs, words: &[&str]| {
            let err = selective_scan(&inputs, &ScanOptions::default()).unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            let msg = err.to_string();
            for w in words {
                assert!(msg.contains(w), "{msg} lacks {w}");
            }
        };
        let short = x.delta.narrow(1, 0, 3);
        check(
            ScanInputs {
                delta: &short,
                ..base
            },
            &["selective_scan: delta must be u's shape", "[2, 3, 3]"],
        );
        let a = Tensor::zeros([4, 5], (Kind::Double, Device::Cpu));
        check(
            ScanInputs { a: &a, ..base },
            &["A must be [D, N] with D = 3", "[4, 5]"],
        );
        let bm = x.b.narrow(2, 0, 4);
        check(
            ScanInputs { b: &bm, ..base },
            &["B must be [B, T, N] = [2, 4, 5]", "[2, 4, 4]"],
        );
        let h0 = Tensor::zeros([2, 3, 4], (Kind::Double, Device::Cpu));
        check(
            ScanInputs {
                initial_state: Some(&h0),
                ..base
            },
            &["initial_state must be [B, D, N] = [2, 3, 5]"],
        );
        let dd = Tensor::zeros([4], (Kind::Double, Device::Cpu));
        check(
            ScanInputs {
                d: Some(&dd),
                ..base
            },
            &["D must be [D] = [3]", "[4]"],
        );
        let c32 = x.c.to_kind(Kind::Float);
        check(
            ScanInputs { c: &c32, ..base },
            &["C has dtype Float", "u's dtype Double"],
        );
        let int = x.z.to_kind(Kind::Int64);
        check(
            ScanInputs {
                z: Some(&int),
                ..base
            },
            &["z has dtype Int64", "floating-point"],
        );
        let flat = x.u.reshape([-1]);
        check(ScanInputs { u: &flat, ..base }, &["u must be [B, T, D]"]);
    }
}
