//! What a run measured: the printed table and the JSON report.

use std::path::Path;

use serde_json::{json, Value};

use crate::anchors::Anchor;
use crate::first_call::FirstCall;
use crate::plan::{dtype_name, RowSpec};
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
    /// Memory floors (forward, forward + backward), ms, on a GPU whose copy bandwidth is known.
    pub floor_ms: Option<(f64, f64)>,
    /// The anchor of this row, if the project measured one.
    pub anchor: Option<Anchor>,
}

/// Column titles of [`RowResult::table_line`].
pub fn table_header() -> String {
    format!(
        "{:<22} {:<16} {:<5} {:>9} {:>11} {:>9} {:>8} {:>10}",
        "B x T x H x K x V",
        "op",
        "dtype",
        "fwd ms",
        "fwd+bwd ms",
        "floor ms",
        "x floor",
        "vs anchor"
    )
}

impl RowResult {
    /// The row under [`table_header`]: forward+backward against its floor and its anchor.
    pub fn table_line(&self) -> String {
        let s = self.spec.shape;
        let op = match self.sdpa_backend {
            Some(backend) if self.spec.op.name() == "sdpa" => format!("sdpa ({backend})"),
            _ => self.spec.op.name(),
        };
        let (floor, times_floor) = match self.floor_ms {
            Some((_, f)) => (format!("{f:.3}"), format!("{:.1}", self.fwd_bwd_ms / f)),
            None => ("-".into(), "-".into()),
        };
        let vs = self.anchor.as_ref().map_or("-".into(), |a| {
            format!("{:.2}", self.fwd_bwd_ms / a.fwd_bwd_ms)
        });
        format!(
            "{:<22} {:<16} {:<5} {:>9.3} {:>11.3} {:>9} {:>8} {:>10}",
            format!("{} x {} x {} x {} x {}", s.b, s.t, s.h, s.k, s.v),
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
        let s = self.spec.shape;
        json!({
            "op": self.spec.op.name(),
            "shape": {"B": s.b, "T": s.t, "H": s.h, "K": s.k, "V": s.v},
            "dtype": dtype_name(self.spec.dtype),
            "sdpa_backend": self.sdpa_backend,
            "fwd_ms": self.fwd_ms,
            "fwd_bwd_ms": self.fwd_bwd_ms,
            "floor_fwd_ms": self.floor_ms.map(|f| f.0),
            "floor_fwd_bwd_ms": self.floor_ms.map(|f| f.1),
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
    /// The copy bandwidth the floors use, bytes/s, and where it comes from.
    pub copy_bandwidth: Option<(f64, &'static str)>,
    /// The kernels' cold first call, when the plan measured it.
    pub first_call: Option<FirstCall>,
    pub rows: Vec<RowResult>,
}

impl Report {
    /// The report as JSON, with the method described in words.
    pub fn to_json(&self) -> Value {
        json!({
            "gpu": self.gpu,
            "date": self.date,
            "timing": "CUDA-event median after warm-up, the fastest of 3 rounds; each timed call queued behind a 256 MiB write (Triton do_bench's method: cold L2, the host's launch latency hidden); fwd+bwd = forward + o.backward(do) (gradients returned, not accumulated); GLA log gates fp32",
            "floor": "bytes moved once (forward: q, k, v, g read, o written; backward: q, k, v, g, do read, dq, dk, dv, dg written; g and dg fp32) at the GPU's device-to-device copy bandwidth",
            "copy_bytes_per_s": self.copy_bandwidth.map(|b| b.0),
            "copy_bandwidth_source": self.copy_bandwidth.map(|b| b.1),
            "first_call": self.first_call.as_ref().map(FirstCall::to_json),
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
    use crate::op::{Op, Shape};
    use glatrain_ops::GlaMode;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_417), "2025-11-25");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    #[test]
    fn rows_print_their_ratios() {
        let row = RowResult {
            spec: RowSpec {
                op: Op::Gla(GlaMode::Chunk),
                shape: Shape::parse("8x2048x16x128").unwrap(),
                dtype: tch::Kind::BFloat16,
            },
            sdpa_backend: None,
            fwd_ms: 0.36,
            fwd_bwd_ms: 0.97,
            floor_ms: Some((0.134, 0.38)),
            anchor: Some(Anchor {
                name: "fla_chunk_gla".into(),
                what: String::new(),
                date: String::new(),
                fwd_bwd_ms: 3.69,
            }),
        };
        let line = row.table_line();
        assert!(
            line.contains("8 x 2048 x 16 x 128 x 128") && line.contains("chunk"),
            "{line}"
        );
        assert!(line.contains(" 2.6 ") && line.contains("0.26"), "{line}");
        let json = row.to_json();
        assert_eq!(json["anchor"]["fwd_bwd_ms"], 3.69);
        assert_eq!(json["shape"]["K"], 128);
    }
}
