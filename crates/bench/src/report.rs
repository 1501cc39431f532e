//! What a run measured: the printed table and the JSON report.

use std::path::Path;

use serde_json::{json, Value};

use crate::anchors::Anchor;
use crate::article;
use crate::first_call::FirstCall;
use crate::floor::{Floor, Rates};
use crate::op::{Op, RowShape};
use crate::plan::{dtype_name, Preset, RowSpec};
use crate::BenchError;

/// The measurement of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    pub spec: RowSpec,
    /// The SDPA backend that ran (SDPA rows).
    pub sdpa_backend: Option<&'static str>,
    /// Forward, ms (CUDA-event median).
    pub fwd_ms: f64,
    /// Forward + backward, ms.
    pub fwd_bwd_ms: f64,
    /// The floors (the memory floor; for the scan the larger of it and the exponential floor),
    /// on a GPU of the table.
    pub floor: Option<Floor>,
    /// The anchor of this row, if the project measured one.
    pub anchor: Option<Anchor>,
}

/// Column titles of [`RowResult::table_line`].
pub fn table_header() -> String {
    format!(
        "{:<24} {:<23} {:<5} {:>9} {:>11} {:>9} {:>8} {:>10}",
        "shape", "op", "dtype", "fwd ms", "fwd+bwd ms", "floor ms", "x floor", "vs anchor"
    )
}

impl RowResult {
    /// The row under [`table_header`]: forward+backward against its floor and its anchor.
    pub fn table_line(&self) -> String {
        let op = match self.sdpa_backend {
            Some(backend) if matches!(self.spec.op, Op::Sdpa(None) | Op::DocumentSdpa) => {
                format!("{} ({backend})", self.spec.op.name())
            }
            _ => self.spec.op.name(),
        };
        let (floor, times_floor) = match &self.floor {
            Some(f) => (
                format!("{:.3}", f.fwd_bwd_ms),
                format!("{:.1}", self.fwd_bwd_ms / f.fwd_bwd_ms),
            ),
            None => ("-".into(), "-".into()),
        };
        let vs = self.anchor.as_ref().map_or("-".into(), |a| {
            format!("{:.2}", self.fwd_bwd_ms / a.fwd_bwd_ms)
        });
        format!(
            "{:<24} {:<23} {:<5} {:>9.3} {:>11.3} {:>9} {:>8} {:>10}",
            self.spec.shape.describe(),
            op,
            dtype_name(self.spec.dtype),
            self.fwd_ms,
            self.fwd_bwd_ms,
            floor,
            times_floor,
            vs
        )
    }

    fn to_json(&self) -> Value {
        let shape = match self.spec.shape {
            RowShape::Attention(s) => json!({"B": s.b, "T": s.t, "H": s.h, "K": s.k, "V": s.v}),
            RowShape::Scan(s) => json!({"B": s.b, "T": s.t, "D": s.d, "N": s.n}),
        };
        json!({
            "op": self.spec.op.name(),
            "shape": shape,
            "dtype": dtype_name(self.spec.dtype),
            "sdpa_backend": self.sdpa_backend,
            "fwd_ms": self.fwd_ms,
            "fwd_bwd_ms": self.fwd_bwd_ms,
            "floor_fwd_ms": self.floor.as_ref().map(|f| f.fwd_ms),
            "floor_fwd_bwd_ms": self.floor.as_ref().map(|f| f.fwd_bwd_ms),
            "floor_arithmetic": self.floor.as_ref().map(|f| f.arithmetic.clone()),
            "anchor": self.anchor.as_ref().map(|a| json!({
                "name": a.name,
                "fwd_bwd_ms": a.fwd_bwd_ms,
                "what": a.what,
                "date": a.date,
            })),
        })
    }
}

/// What [`crate::run`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The GPU's name as the driver gives it.
    pub gpu: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// The rates the floors use (None for a GPU not in the table), and where the copy bandwidth
    /// comes from.
    pub rates: Option<(Rates, &'static str)>,
    /// The kernels' cold first call, when the plan measured it.
    pub first_call: Option<FirstCall>,
    pub rows: Vec<RowResult>,
    /// The comparison the run reproduced, if any.
    pub preset: Option<Preset>,
}

impl Report {
    /// The report as JSON, with the method described in words.
    pub fn to_json(&self) -> Value {
        json!({
            "gpu": self.gpu,
            "date": self.date,
            "timing": "CUDA-event median after warm-up, the fastest of 3 rounds; each timed call queued behind a 256 MiB write (Triton do_bench's method: cold L2, the host's launch latency hidden); fwd+bwd = forward + o.backward(do) (gradients returned, not accumulated); GLA log gates fp32; the scan's forward as in training (inputs requiring gradients: it keeps its checkpoints), z, D, delta_bias and softplus on, A, D, delta_bias fp32",
            "floor": "attention-like rows: bytes moved once (forward: q, k, v, g read, o written; backward: q, k, v, g, do read, dq, dk, dv, dg written; g and dg fp32) at the GPU's device-to-device copy bandwidth; selective_scan rows: the larger of that memory floor (u, delta, z, B, C read, y written; backward the same read again with dy, du, ddelta, dz, dB, dC written) and the exponential floor (one ex2 per (b, t, d, n) forward, again in the backward's recompute, at SMs x 16 ex2/clock x the boost clock); each row's floor_arithmetic has the numbers",
            "copy_bytes_per_s": self.rates.as_ref().map(|r| r.0.copy_bytes_per_s),
            "copy_bandwidth_source": self.rates.as_ref().map(|r| r.1),
            "ex2_per_s": self.rates.as_ref().map(|r| r.0.ex2_per_s),
            "ex2_source": self.rates.as_ref().map(|r| r.0.ex2_source.clone()),
            "first_call": self.first_call.as_ref().map(FirstCall::to_json),
            "preset": self.preset.map(|p| match p {
                Preset::Article => json!({
                    "name": p.name(),
                    "choices": article::choices(),
                    "table": article::table(&self.rows),
                }),
            }),
            "rows": self.rows.iter().map(RowResult::to_json).collect::<Vec<_>>(),
        })
    }

    /// Writes [`Self::to_json`] (pretty-printed) to `path` atomically.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let write_err = |message: String| BenchError::Write {
            path: path.to_path_buf(),
            message,
        };
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| write_err(e.to_string()))?;
        glatrain_fs::write_atomic(path, (text + "\n").as_bytes())
            .map_err(|e| write_err(e.to_string()))
    }
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn today() -> String {
    // A clock before 1970 reads as day 0 rather than failing the benchmark.
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        .div_euclid(86_400);
    civil_date(days)
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01 (Howard Hinnant's civil-from-days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Op, ScanShape, Shape};
    use glatrain_ops::GlaMode;

    #[test]
    fn civil_dates() {
        for (days, date) in [
            (0, "1970-01-01"),
            (20_417, "2025-11-25"),
            (11_016, "2000-02-29"),
        ] {
            assert_eq!(civil_date(days), date);
        }
    }

    #[test]
    fn rows_print_their_ratios() {
        let row = RowResult {
            spec: RowSpec {
                op: Op::Gla(GlaMode::Chunk),
                shape: RowShape::Attention(Shape::parse("8x2048x16x128").unwrap()),
                dtype: tch::Kind::BFloat16,
            },
            sdpa_backend: None,
            fwd_ms: 0.36,
            fwd_bwd_ms: 0.97,
            floor: Some(Floor {
                fwd_ms: 0.134,
                fwd_bwd_ms: 0.38,
                arithmetic: "memory".into(),
            }),
            anchor: Some(Anchor {
                name: "fla_chunk_gla".into(),
                what: String::new(),
                date: String::new(),
                fwd_bwd_ms: 3.69,
            }),
        };
        let line = row.table_line();
        assert!(
            line.contains("B8 T2048 H16 K128 V128") && line.contains("chunk"),
            "{line}"
        );
        assert!(line.contains(" 2.6 ") && line.contains("0.26"), "{line}");
        let json = row.to_json();
        assert_eq!(json["anchor"]["fwd_bwd_ms"], 3.69);
        assert_eq!(json["shape"]["K"], 128);
        assert_eq!(json["floor_arithmetic"], "memory");
        let scan = RowResult {
            spec: RowSpec {
                op: Op::SelectiveScan,
                shape: RowShape::Scan(ScanShape::parse("8x2048x2048x16").unwrap()),
                dtype: tch::Kind::BFloat16,
            },
            ..row
        };
        assert!(scan.table_line().starts_with("B8 T2048 D2048 N16"));
        assert_eq!(scan.to_json()["shape"]["N"], 16);
    }
}
