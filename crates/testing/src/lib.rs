//! Helpers for testing tensor ops: relative error, a seeded random source, a finite-difference
//! gradient check (tch has no `gradcheck`), the tolerance rule that compares fast results with
//! their reference, the CUDA device of tests that skip without one, and threads that run
//! together; and, in [`process`], for tests that run training processes.

mod compare;
pub mod process;

use std::collections::BTreeSet;

use tch::{Device, Kind, Tensor};

pub use compare::{assert_all_passed, compare, Compared};

/// The first CUDA device, or `None` after printing that the calling test is skipped (on machines
/// without CUDA, where GPU tests pass without running).
pub fn cuda_or_skip() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        println!("skipped: no CUDA device");
        None
    }
}

/// Relative root-mean-square error `||a - b|| / ||b||`, computed in f64.
///
/// `b` is the reference. When `b` is all zeros the absolute norm `||a - b||` is returned instead,
/// so two zero tensors compare as `0.0`. A NaN or infinity anywhere gives a non-finite result, which
/// fails every `<= tolerance` comparison.
///
/// # Panics
/// If the shapes differ (no broadcasting: a silently broadcast comparison would hide shape bugs).
pub fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(
        a.size(),
        b.size(),
        "rel_rms: shapes differ: a {:?}, b {:?}",
        a.size(),
        b.size()
    );
    let a = a.detach().to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = b.detach().to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let diff = (&a - &b).norm().double_value(&[]);
    let reference = b.norm().double_value(&[]);
    if reference == 0.0 {
        diff
    } else {
        diff / reference
    }
}

/// A small seeded random source (splitmix64 + Box-Muller), independent of libtorch's global
/// generator, so that tests running in parallel threads draw the same inputs on every run.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        // 53 random mantissa bits, shifted by half a step so 0 never comes out (log below).
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A CPU tensor of standard normal samples.
    ///
    /// # Shapes
    /// `shape` -> `shape`, of `kind`.
    pub fn randn(&mut self, shape: &[i64], kind: Kind) -> Tensor {
        let numel = shape.iter().product::<i64>().max(0) as usize;
        let values: Vec<f64> = (0..numel).map(|_| self.normal()).collect();
        Tensor::from_slice(&values).reshape(shape).to_kind(kind)
    }

    /// An index in `0..n`.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below: n must be positive, got 0");
        self.next_u64() % n
    }
}

/// Standard normal f64 tensors of the requested shapes on `device`, drawn in turn from `seed`'s
/// stream.
pub fn normal_f64_on(seed: u64, device: Device) -> impl FnMut(&[i64]) -> Tensor {
    let mut rng = Rng::new(seed);
    move |shape| rng.randn(shape, Kind::Double).to_device(device)
}

/// `body(i)` for each `i` in `0..n`, each on a thread of its own (as the ranks of a process group,
/// which wait for each other), and their results in order. Panics if any of them panics.
pub fn on_threads<T: Send>(n: usize, body: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let body = &body;
        let threads: Vec<_> = (0..n).map(|i| scope.spawn(move || body(i))).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Settings of [`gradcheck`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradcheckOptions {
    /// Step of the central difference `(f(x + eps) - f(x - eps)) / (2 eps)`.
    pub eps: f64,
    /// Relative tolerance, against the larger of the two gradient magnitudes.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// How many coordinates of each input are checked (all of them when the input is smaller).
    pub coords_per_input: usize,
    /// Seed of the choice of coordinates.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    /// In f64 the central difference's truncation error is about `eps^2 * f'''` ~ 1e-12 and its
    /// rounding error about `1e-16 * |f| / eps` ~ 1e-10 for losses of order 1, so `rtol` 1e-6 and
    /// `atol` 1e-7 leave a wide margin while any wrong gradient term fails.
    fn default() -> Self {
        Self {
            eps: 1e-6,
            rtol: 1e-6,
            atol: 1e-7,
            coords_per_input: 6,
            seed: 0,
        }
    }
}

/// What [`gradcheck`] compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradcheckReport {
    /// Number of (input, coordinate) pairs compared.
    pub checked: usize,
    /// Largest `|autograd - central difference|` seen.
    pub max_abs_diff: f64,
}

/// Why [`gradcheck`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GradcheckError {
    /// Finite differences need f64: in f32 their rounding error swamps the comparison.
    #[error("gradcheck: input `{name}` is {kind:?}; finite differences need Double (f64)")]
    NotDouble { name: String, kind: Kind },
    /// The function must return one number.
    #[error("gradcheck: the function must return a scalar loss, got shape {shape:?}")]
    NotScalar { shape: Vec<i64> },
    /// Autograd could not differentiate the loss with respect to the inputs.
    #[error("gradcheck: autograd failed: {0}")]
    Autograd(#[from] tch::TchError),
    /// Autograd and the central difference disagree.
    #[error(
        "gradcheck: input `{name}` flat index {index}: autograd {analytic:e}, central difference \
         {numeric:e}, |diff| {diff:e} > tolerance {tolerance:e}"
    )]
    Mismatch {
        name: String,
        index: i64,
        analytic: f64,
        numeric: f64,
        diff: f64,
        tolerance: f64,
    },
}

impl GradcheckError {
    /// Always false: these are failures of the code under test or of the test itself, never of
    /// user-supplied config or data.
    pub fn is_bad_input(&self) -> bool {
        false
    }
}

/// Compares autograd's gradient of the scalar `loss(inputs)` with central differences, on
/// `opts.coords_per_input` randomly chosen coordinates of each named input.
///
/// Every input must be f64. The function is called with fresh leaf tensors (requiring grad) in
/// the order given; it must not depend on anything random. A loss that combines several outputs
/// with fixed random weights (`(o * w).sum() + (s * w2).sum()`) checks all of them at once.
///
/// # Errors
/// [`GradcheckError::Mismatch`] on the first disagreeing coordinate; the other variants when the
/// check itself cannot run.
pub fn gradcheck(
    loss: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[(&str, &Tensor)],
    opts: &GradcheckOptions,
) -> Result<GradcheckReport, GradcheckError> {
    for (name, x) in inputs {
        if x.kind() != Kind::Double {
            return Err(GradcheckError::NotDouble {
                name: (*name).to_owned(),
                kind: x.kind(),
            });
        }
    }
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|(_, x)| x.detach().copy().set_requires_grad(true))
        .collect();
    let value = loss(&leaves);
    if value.numel() != 1 {
        return Err(GradcheckError::NotScalar {
            shape: value.size(),
        });
    }
    let grads = Tensor::f_run_backward(&[&value], &leaves, false, false)?;

    // Evaluates the loss with one coordinate of one input moved by `delta`.
    let shifted = |which: usize, index: i64, delta: f64| -> f64 {
        tch::no_grad(|| {
            let args: Vec<Tensor> = inputs
                .iter()
                .enumerate()
                .map(|(i, (_, x))| {
                    if i != which {
                        return x.detach();
                    }
                    let flat = x.detach().reshape([-1]).copy();
                    let _ = flat.narrow(0, index, 1).g_add_scalar_(delta);
                    flat.view(x.size().as_slice())
                })
                .collect();
            loss(&args).double_value(&[])
        })
    };

    let mut rng = Rng::new(opts.seed);
    let mut report = GradcheckReport {
        checked: 0,
        max_abs_diff: 0.0,
    };
    for (which, ((name, x), grad)) in inputs.iter().zip(&grads).enumerate() {
        let numel = x.numel() as u64;
        let wanted = (opts.coords_per_input as u64).min(numel);
        let mut coords = BTreeSet::new();
        while (coords.len() as u64) < wanted {
            coords.insert(rng.below(numel) as i64);
        }
        let grad = grad.reshape([-1]);
        for index in coords {
            let numeric = (shifted(which, index, opts.eps) - shifted(which, index, -opts.eps))
                / (2.0 * opts.eps);
            let analytic = grad.double_value(&[index]);
            let diff = (analytic - numeric).abs();
            let tolerance = opts.atol + opts.rtol * analytic.abs().max(numeric.abs());
            if diff.is_nan() || diff > tolerance {
                return Err(GradcheckError::Mismatch {
                    name: (*name).to_owned(),
                    index,
                    analytic,
                    numeric,
                    diff,
                    tolerance,
                });
            }
            report.checked += 1;
            report.max_abs_diff = report.max_abs_diff.max(diff);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_rms_of_known_values() {
        let b = Tensor::from_slice(&[3.0f64, 4.0]);
        let a = Tensor::from_slice(&[3.0f32, 4.5]);
        assert!((rel_rms(&a, &b) - 0.1).abs() < 1e-7);
        assert_eq!(rel_rms(&b, &b), 0.0);
        let zeros = Tensor::zeros([2], (Kind::Double, tch::Device::Cpu));
        assert_eq!(rel_rms(&zeros, &zeros), 0.0);
        assert!(!rel_rms(&Tensor::from_slice(&[f64::NAN, 4.0]), &b).is_finite());
    }

    #[test]
    #[should_panic(expected = "rel_rms: shapes differ")]
    fn rel_rms_rejects_broadcasting() {
        rel_rms(
            &Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)),
            &Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
        );
    }

    #[test]
    fn rng_is_reproducible_and_roughly_normal() {
        let a = Rng::new(7).randn(&[4000], Kind::Double);
        let b = Rng::new(7).randn(&[4000], Kind::Double);
        assert_eq!(rel_rms(&a, &b), 0.0);
        let mean = a.mean(Kind::Double).double_value(&[]);
        let std = a.std(true).double_value(&[]);
        assert!(
            mean.abs() < 0.1 && (std - 1.0).abs() < 0.1,
            "mean {mean}, std {std}"
        );
    }

    #[test]
    fn gradcheck_accepts_a_right_gradient() {
        let x = Rng::new(1).randn(&[3, 4], Kind::Double);
        let y = Rng::new(2).randn(&[4], Kind::Double);
        let report = gradcheck(
            |t| (t[0].sin() * &t[1]).sum(Kind::Double),
            &[("x", &x), ("y", &y)],
            &GradcheckOptions::default(),
        )
        .unwrap();
        assert_eq!(report.checked, 6 + 4);
    }

    #[test]
    fn gradcheck_catches_a_wrong_gradient() {
        // Detaching one factor makes autograd's gradient x instead of 2x.
        let x = Rng::new(3).randn(&[5], Kind::Double);
        let err = gradcheck(
            |t| (&t[0] * t[0].detach()).sum(Kind::Double),
            &[("x", &x)],
            &GradcheckOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, GradcheckError::Mismatch { ref name, .. } if name == "x"),
            "{err}"
        );
    }

    #[test]
    fn gradcheck_rejects_f32_inputs() {
        let x = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
        let err = gradcheck(
            |t| t[0].sum(Kind::Float),
            &[("x", &x)],
            &GradcheckOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, GradcheckError::NotDouble { .. }), "{err}");
    }
}
