//! Fast results against their reference, by the tolerance rule of the ops' tests: relative RMS
//! error within a floor, or within twice the error of the reference computed in the same
//! precision (both against the f64 reference) where that is larger.

use tch::Tensor;

use crate::rel_rms;

/// One tensor compared with its reference: its error as a fraction of its tolerance (NaN stays
/// NaN, so an element no kernel wrote fails) and a line for the log.
#[derive(Debug, Clone)]
pub struct Compared {
    pub ratio: f64,
    pub line: String,
}

impl Compared {
    /// Within its tolerance (a NaN error is not).
    pub fn passed(&self) -> bool {
        self.ratio <= 1.0
    }
}

/// Compares each named tensor of `got` with the one of `exact` at its place by [`rel_rms`]. The
/// tolerance is `floor`, or, given `naive` (the reference computed in `got`'s precision), twice
/// its error and never less than `floor`. Lines start with `label`.
///
/// # Panics
/// If the names or a shape differ from the reference's.
pub fn compare(
    label: &str,
    got: &[(&str, Tensor)],
    exact: &[(&str, Tensor)],
    naive: Option<&[(&str, Tensor)]>,
    floor: f64,
) -> Vec<Compared> {
    let names = |r: &[(&str, Tensor)]| -> Vec<String> {
        r.iter().map(|(name, _)| name.to_string()).collect()
    };
    assert_eq!(names(got), names(exact), "{label}");
    exact
        .iter()
        .enumerate()
        .map(|(i, (name, want))| {
            let err = rel_rms(&got[i].1, want);
            let tol = naive.map_or(floor, |n| (2.0 * rel_rms(&n[i].1, want)).max(floor));
            Compared {
                ratio: err / tol,
                line: format!("{label}: {name} rel RMS {err:.3e}, tolerance {tol:.3e}"),
            }
        })
        .collect()
}

/// The lines of the comparisons over their tolerance.
fn failures(compared: &[Compared]) -> Vec<&str> {
    compared
        .iter()
        .filter(|x| !x.passed())
        .map(|x| x.line.as_str())
        .collect()
}

/// Prints the comparison closest to its tolerance (the headroom, for the log) and fails listing
/// every comparison over its tolerance.
#[track_caller]
pub fn assert_all_passed(compared: &[Compared]) {
    if let Some(worst) = compared.iter().max_by(|a, b| a.ratio.total_cmp(&b.ratio)) {
        eprintln!(
            "closest to its tolerance ({:.2} of it): {}",
            worst.ratio, worst.line
        );
    }
    let failures = failures(compared);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
