//! The article's comparison (`glatrain bench --preset article`): per-layer forward+backward time
//! of GLA (the `chunk` kernels), softmax attention (FlashAttention) and Mamba (the selective
//! scan) at head dims 32, 128 and 1024 over sequence lengths 1K to 16K, as a table and a chart.
//!
//! Every call is one layer of a model of width [`HIDDEN`] on [`TOKENS`] tokens (B = TOKENS / T
//! sequences of T): GLA and softmax attention with H = HIDDEN / D heads of dim D (K = V = D, as
//! the head dims are compared), Mamba with d_inner = [`MAMBA_EXPAND`] x HIDDEN and d_state
//! [`MAMBA_STATES`], the Mamba block that takes an attention layer's place at that width.

use std::path::Path;

use glatrain_ops::GlaMode;
use glatrain_plot::{draw_line_charts, Axis, LineChart, Series};
use glatrain_shim::sdp::SdpaBackend;
use tch::Kind;

use crate::op::{Op, RowShape, ScanShape, Shape};
use crate::plan::RowSpec;
use crate::report::{Report, RowResult};
use crate::BenchError;

/// Model width: H x D for the attention-like ops.
pub const HIDDEN: i64 = 2048;
/// Tokens per call, B x T: 8 x 2048 as the anchor rows, the same work at every T.
pub const TOKENS: i64 = 16384;
/// The head dims compared.
pub const HEAD_DIMS: [i64; 3] = [32, 128, 1024];
/// The sequence lengths compared.
pub const LENGTHS: [i64; 5] = [1024, 2048, 4096, 8192, 16384];
/// Mamba's expansion (d_inner = 2 x hidden, Mamba's default and mamba-370m.toml's).
pub const MAMBA_EXPAND: i64 = 2;
/// Mamba's state size per channel (Mamba's default).
pub const MAMBA_STATES: i64 = 16;
/// FlashAttention takes head dims up to this; past it the softmax rows run libtorch's own choice.
const FLASH_MAX_HEAD_DIM: i64 = 256;
/// The length of the chart against head dim, and the head dim of the chart against T.
const CHART_T: i64 = 2048;
const CHART_HEAD_DIM: i64 = 128;

/// The choices above in words, for the report.
pub fn choices() -> String {
    format!(
        "one layer of a model of width {HIDDEN} on {TOKENS} tokens per call (B = {TOKENS} / T), \
         bf16: GLA chunk and softmax attention with H = {HIDDEN} / D heads of K = V = D \
         (softmax: FlashAttention alone up to D = {FLASH_MAX_HEAD_DIM}, libtorch's own backend \
         past it, which FlashAttention does not take); Mamba's selective scan at d_inner = \
         {MAMBA_EXPAND} x {HIDDEN}, d_state {MAMBA_STATES} (the Mamba block at that width; it has \
         no head dim); forward + o.backward(do)"
    )
}

/// The softmax op at head dim `d`.
fn softmax_op(d: i64) -> Op {
    if d <= FLASH_MAX_HEAD_DIM {
        Op::Sdpa(Some(SdpaBackend::Flash))
    } else {
        Op::Sdpa(None)
    }
}

fn attention_shape(t: i64, d: i64) -> RowShape {
    RowShape::Attention(Shape {
        b: TOKENS / t,
        t,
        h: HIDDEN / d,
        k: d,
        v: d,
    })
}

fn scan_shape(t: i64) -> RowShape {
    RowShape::Scan(ScanShape {
        b: TOKENS / t,
        t,
        d: MAMBA_EXPAND * HIDDEN,
        n: MAMBA_STATES,
    })
}

/// The preset's rows: per T, GLA and softmax at each head dim, and the scan.
pub fn rows() -> Vec<RowSpec> {
    let row = |op, shape| RowSpec {
        op,
        shape,
        dtype: Kind::BFloat16,
    };
    let mut rows = Vec::new();
    for t in LENGTHS {
        for d in HEAD_DIMS {
            rows.push(row(Op::Gla(GlaMode::Chunk), attention_shape(t, d)));
            rows.push(row(softmax_op(d), attention_shape(t, d)));
        }
        rows.push(row(Op::SelectiveScan, scan_shape(t)));
    }
    rows
}

/// The measured forward+backward ms of `op` at `shape`, if that row ran.
fn measured(rows: &[RowResult], op: Op, shape: RowShape) -> Option<f64> {
    rows.iter()
        .find(|r| r.spec.op == op && r.spec.shape == shape)
        .map(|r| r.fwd_bwd_ms)
}

fn cell(ms: Option<f64>) -> String {
    ms.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The comparison table: one line per T, GLA and softmax per head dim, then Mamba.
pub fn table(rows: &[RowResult]) -> String {
    let mut out = format!(
        "forward+backward ms per layer: width {HIDDEN}, {TOKENS} tokens per call, bf16 \
         (softmax: FlashAttention; D = 1024: libtorch's backend)\n{:>6}",
        "T"
    );
    for d in HEAD_DIMS {
        out.push_str(&format!(
            " {:>11} {:>11}",
            format!("GLA D{d}"),
            format!("softmax D{d}")
        ));
    }
    out.push_str(&format!(
        " {:>14}\n",
        format!("Mamba E{} N{MAMBA_STATES}", MAMBA_EXPAND * HIDDEN)
    ));
    for t in LENGTHS {
        out.push_str(&format!("{t:>6}"));
        for d in HEAD_DIMS {
            let shape = attention_shape(t, d);
            out.push_str(&format!(
                " {:>11} {:>11}",
                cell(measured(rows, Op::Gla(GlaMode::Chunk), shape)),
                cell(measured(rows, softmax_op(d), shape))
            ));
        }
        out.push_str(&format!(
            " {:>14}\n",
            cell(measured(rows, Op::SelectiveScan, scan_shape(t)))
        ));
    }
    out
}

/// The two panels: time against head dim at T = 2048, and against T at head dim 128.
pub fn charts(rows: &[RowResult]) -> Vec<LineChart> {
    let series = |name: &str, points: Vec<(f64, Option<f64>)>| Series {
        name: name.to_string(),
        points: points
            .into_iter()
            .filter_map(|(x, y)| y.map(|y| (x, y)))
            .collect(),
    };
    let ms_axis = || Axis {
        label: "forward+backward ms per layer".into(),
        log: true,
    };
    let mamba = format!("Mamba (E {}, N {MAMBA_STATES})", MAMBA_EXPAND * HIDDEN);
    let by_head_dim = |op: &dyn Fn(i64) -> Op| -> Vec<(f64, Option<f64>)> {
        HEAD_DIMS
            .iter()
            .map(|&d| (d as f64, measured(rows, op(d), attention_shape(CHART_T, d))))
            .collect()
    };
    let mamba_flat: Vec<(f64, Option<f64>)> = HEAD_DIMS
        .iter()
        .map(|&d| {
            (
                d as f64,
                measured(rows, Op::SelectiveScan, scan_shape(CHART_T)),
            )
        })
        .collect();
    let by_t = |op: Op, shape: &dyn Fn(i64) -> RowShape| -> Vec<(f64, Option<f64>)> {
        LENGTHS
            .iter()
            .map(|&t| (t as f64, measured(rows, op, shape(t))))
            .collect()
    };
    vec![
        LineChart {
            title: format!("against head dim (T = {CHART_T}, width {HIDDEN})"),
            x: Axis {
                label: "head dim D (H = width / D)".into(),
                log: true,
            },
            y: ms_axis(),
            series: vec![
                series("GLA chunk", by_head_dim(&|_| Op::Gla(GlaMode::Chunk))),
                series("softmax attention", by_head_dim(&softmax_op)),
                series(&mamba, mamba_flat),
            ],
        },
        LineChart {
            title: format!("against T (head dim {CHART_HEAD_DIM}, {TOKENS} tokens)"),
            x: Axis {
                label: "sequence length T".into(),
                log: true,
            },
            y: ms_axis(),
            series: vec![
                series(
                    "GLA chunk",
                    by_t(Op::Gla(GlaMode::Chunk), &|t| {
                        attention_shape(t, CHART_HEAD_DIM)
                    }),
                ),
                series(
                    "FlashAttention",
                    by_t(softmax_op(CHART_HEAD_DIM), &|t| {
                        attention_shape(t, CHART_HEAD_DIM)
                    }),
                ),
                series(&mamba, by_t(Op::SelectiveScan, &scan_shape)),
            ],
        },
    ]
}

/// Draws [`charts`] of `report` as a PNG at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), BenchError> {
    draw_line_charts(path, &charts(&report.rows), (640, 480)).map_err(|e| BenchError::Write {
        path: path.to_path_buf(),
        message: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RowResult;

    #[test]
    fn the_rows_keep_width_and_tokens_fixed() {
        let rows = rows();
        // Per T: GLA and softmax at three head dims, and the scan.
        assert_eq!(rows.len(), LENGTHS.len() * 7);
        for r in &rows {
            match r.shape {
                RowShape::Attention(s) => {
                    assert_eq!((s.b * s.t, s.h * s.k, s.k), (TOKENS, HIDDEN, s.v));
                }
                RowShape::Scan(s) => assert_eq!((s.b * s.t, s.d, s.n), (TOKENS, 4096, 16)),
            }
        }
        let softmax: Vec<String> = rows
            .iter()
            .filter(|r| matches!(r.op, Op::Sdpa(_)))
            .take(3)
            .map(|r| r.op.name())
            .collect();
        assert_eq!(softmax, ["sdpa_flash", "sdpa_flash", "sdpa"]);
    }

    #[test]
    fn table_and_charts_show_what_was_measured() {
        // Fake measurements: GLA 1 ms x D / 128, softmax 2 ms x T / 2048, Mamba 0.5 ms.
        let results: Vec<RowResult> = rows()
            .into_iter()
            .filter(|r| r.op != Op::Sdpa(None))
            .map(|spec| {
                let ms = match (spec.op, spec.shape) {
                    (Op::Gla(_), RowShape::Attention(s)) => s.k as f64 / 128.0,
                    (_, RowShape::Attention(s)) => 2.0 * s.t as f64 / 2048.0,
                    _ => 0.5,
                };
                RowResult {
                    spec,
                    sdpa_backend: None,
                    fwd_ms: ms / 3.0,
                    fwd_bwd_ms: ms,
                    floor: None,
                    anchor: None,
                }
            })
            .collect();
        let table = table(&results);
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with("2048"))
            .unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            ["2048", "0.250", "2.000", "1.000", "2.000", "8.000", "-", "0.500"]
        );
        let charts = charts(&results);
        assert_eq!(charts.len(), 2);
        // Against head dim: D = 1024's softmax did not run; Mamba is flat.
        assert_eq!(charts[0].series[1].points, [(32.0, 2.0), (128.0, 2.0)]);
        assert_eq!(charts[0].series[2].points.len(), 3);
        // Against T at D = 128: softmax grows with T.
        assert_eq!(charts[1].series[1].points.last(), Some(&(16384.0, 16.0)));
        let dir = tempfile::tempdir().unwrap();
        let report = Report {
            gpu: "test".into(),
            date: "2026-12-08".into(),
            rates: None,
            first_call: None,
            rows: results,
            preset: None,
        };
        draw(&report, &dir.path().join("article.png")).unwrap();
        assert!(
            std::fs::metadata(dir.path().join("article.png"))
                .unwrap()
                .len()
                > 4000
        );
    }
}
