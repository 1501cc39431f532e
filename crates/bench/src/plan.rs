//! Which rows a benchmark run times.

use glatrain_ops::GlaMode;
use glatrain_shim::sdp::SdpaBackend;
use tch::Kind;

use crate::anchors::Anchors;
use crate::article;
use crate::op::{Op, RowShape, ScanShape, Shape};
use crate::BenchError;

/// One row: an op at a shape in a dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSpec {
    pub op: Op,
    /// A [`RowShape::Scan`] for the scan, a [`RowShape::Attention`] for the others.
    pub shape: RowShape,
    /// q, k, v (and o) dtype, or u, delta, z, B, C (and y) for the scan; GLA's log gates and the
    /// scan's A, D and delta_bias are always fp32.
    pub dtype: Kind,
}

/// The rows of a run, whether it first measures the GLA kernels' cold first call, and the
/// preset it reproduces (which adds its own table and chart).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rows: Vec<RowSpec>,
    pub first_call: bool,
    pub preset: Option<Preset>,
}

/// A comparison the benchmark reproduces in one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// GLA vs FlashAttention vs Mamba at head dims 32, 128, 1024 over T ([`crate::article`]).
    Article,
}

impl Preset {
    /// Every preset, for listings.
    pub const ALL: [Preset; 1] = [Preset::Article];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Article => "article",
        }
    }
}

/// The ops of the default rows: every GLA mode and SDPA (FlashAttention alone, and libtorch's
/// own choice); `fused_recurrent` only at head dims up to this (past it, it is the slowest by
/// far and only there for decoding).
const DEFAULT_RECURRENT_MAX_D: i64 = 64;

fn default_ops(shape: &Shape) -> Vec<Op> {
    let mut ops = vec![Op::Gla(GlaMode::Chunk), Op::Gla(GlaMode::FusedChunk)];
    if shape.k.max(shape.v) <= DEFAULT_RECURRENT_MAX_D {
        ops.push(Op::Gla(GlaMode::FusedRecurrent));
    }
    ops.extend([Op::Sdpa(Some(SdpaBackend::Flash)), Op::Sdpa(None)]);
    ops
}

/// A dtype's command-line name.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "fp32",
    }
}

fn parse_dtype(name: &str) -> Option<Kind> {
    match name {
        "bf16" => Some(Kind::BFloat16),
        "fp16" => Some(Kind::Half),
        "fp32" => Some(Kind::Float),
        _ => None,
    }
}

/// The command-line selection of rows: each list as repeated flags give it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// `--op`.
    pub ops: Vec<String>,
    /// `--shape` (attention-like ops: `BxTxHxD` or `BxTxHxKxV`).
    pub shapes: Vec<String>,
    /// `--scan-shape` (the selective scan: `BxTxDxN`).
    pub scan_shapes: Vec<String>,
    /// `--dtype`.
    pub dtypes: Vec<String>,
}

fn arg(flag: &'static str, value: &str, expected: String) -> BenchError {
    BenchError::Arg {
        flag,
        value: value.to_string(),
        expected,
    }
}

impl Plan {
    /// The rows of a selection: every combination of its ops, their shapes and its dtypes.
    ///
    /// Attention-like ops run at the `--shape` shapes, the selective scan at the `--scan-shape`
    /// ones. Without `--op`, each family runs with its default ops (every GLA mode, SDPA flash
    /// and SDPA's own choice; the scan) when its shapes are given or no shapes are given at all.
    /// A family without shapes runs at its anchor shapes (`bench/anchors.json`:
    /// flash-linear-attention's for the attention-like ops, mamba_ssm's for the scan). No
    /// dtypes: bf16.
    ///
    /// # Errors
    /// A value that does not parse, or shapes for a family none of the ops belongs to.
    pub fn select(sel: &Selection) -> Result<Plan, BenchError> {
        let ops = sel
            .ops
            .iter()
            .map(|name| {
                Op::parse(name).ok_or_else(|| {
                    let names: Vec<String> = Op::all().into_iter().map(Op::name).collect();
                    arg(
                        "--op",
                        name,
                        format!("expected one of {}", names.join(", ")),
                    )
                })
            })
            .collect::<Result<Vec<Op>, _>>()?;
        let shapes = sel
            .shapes
            .iter()
            .map(|s| {
                Shape::parse(s).ok_or_else(|| {
                    arg(
                        "--shape",
                        s,
                        "expected BxTxHxD or BxTxHxKxV, sizes >= 1".into(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scan_shapes = sel
            .scan_shapes
            .iter()
            .map(|s| {
                ScanShape::parse(s)
                    .ok_or_else(|| arg("--scan-shape", s, "expected BxTxDxN, sizes >= 1".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dtypes = if sel.dtypes.is_empty() {
            vec![Kind::BFloat16]
        } else {
            sel.dtypes
                .iter()
                .map(|d| {
                    parse_dtype(d)
                        .ok_or_else(|| arg("--dtype", d, "expected bf16, fp16 or fp32".into()))
                })
                .collect::<Result<_, _>>()?
        };
        let no_shapes = shapes.is_empty() && scan_shapes.is_empty();
        let attention_ops: Vec<Op> = ops.iter().copied().filter(|op| !op.is_scan()).collect();
        let attention = if ops.is_empty() {
            !shapes.is_empty() || no_shapes
        } else {
            !attention_ops.is_empty()
        };
        let scan = if ops.is_empty() {
            !scan_shapes.is_empty() || no_shapes
        } else {
            ops.contains(&Op::SelectiveScan)
        };
        if !attention && !shapes.is_empty() {
            let expected = "no --op given here takes it (--shape is for GLA and SDPA ops; the \
                            scan takes --scan-shape)";
            return Err(arg("--shape", &sel.shapes[0], expected.into()));
        }
        if !scan && !scan_shapes.is_empty() {
            let expected = "no --op given here takes it (--scan-shape is for selective_scan)";
            return Err(arg("--scan-shape", &sel.scan_shapes[0], expected.into()));
        }
        let anchors = Anchors::embedded();
        let shapes = if shapes.is_empty() {
            anchors.gla_shapes()
        } else {
            shapes
        };
        let scan_shapes = if scan_shapes.is_empty() {
            anchors.scan_shapes()
        } else {
            scan_shapes
        };
        let mut rows = Vec::new();
        for &dtype in &dtypes {
            if attention {
                for shape in &shapes {
                    let shape_ops = if ops.is_empty() {
                        default_ops(shape)
                    } else {
                        attention_ops.clone()
                    };
                    rows.extend(shape_ops.into_iter().map(|op| RowSpec {
                        op,
                        shape: RowShape::Attention(*shape),
                        dtype,
                    }));
                }
            }
            if scan {
                rows.extend(scan_shapes.iter().map(|&s| RowSpec {
                    op: Op::SelectiveScan,
                    shape: RowShape::Scan(s),
                    dtype,
                }));
            }
        }
        Ok(Plan {
            rows,
            first_call: true,
            preset: None,
        })
    }

    /// The rows of a preset by name (`--preset`), without the first-call measurement.
    ///
    /// # Errors
    /// An unknown preset, or a preset combined with a selection (its rows are fixed).
    pub fn preset(name: &str, sel: &Selection) -> Result<Plan, BenchError> {
        let preset = Preset::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                arg(
                    "--preset",
                    name,
                    format!("expected one of {}", names.join(", ")),
                )
            })?;
        if *sel != Selection::default() {
            let expected = "a preset's rows are fixed: leave out --op, --shape, --scan-shape \
                            and --dtype";
            return Err(arg("--preset", name, expected.into()));
        }
        let rows = match preset {
            Preset::Article => article::rows(),
        };
        Ok(Plan {
            rows,
            first_call: false,
            preset: Some(preset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(ops: &[&str], shapes: &[&str], scan_shapes: &[&str], dtypes: &[&str]) -> Selection {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Selection {
            ops: own(ops),
            shapes: own(shapes),
            scan_shapes: own(scan_shapes),
            dtypes: own(dtypes),
        }
    }

    #[test]
    fn the_default_plan_covers_the_anchor_rows() {
        let plan = Plan::select(&Selection::default()).unwrap();
        assert!(plan.first_call);
        // Six GLA shapes (fused_recurrent at D = 32 and 64 only), four scan shapes.
        assert_eq!(plan.rows.len(), 6 * 4 + 2 + 4);
        assert!(plan.rows.iter().all(|r| r.dtype == Kind::BFloat16));
        let recurrent: Vec<RowShape> = plan
            .rows
            .iter()
            .filter(|r| r.op == Op::Gla(GlaMode::FusedRecurrent))
            .map(|r| r.shape)
            .collect();
        assert_eq!(
            recurrent,
            [32, 64].map(|d| RowShape::Attention(Shape::parse(&format!("8x2048x16x{d}")).unwrap()))
        );
        let scans: Vec<RowShape> = plan
            .rows
            .iter()
            .filter(|r| r.op == Op::SelectiveScan)
            .map(|r| r.shape)
            .collect();
        assert_eq!(scans.len(), 4);
        assert!(scans.iter().all(|s| matches!(s, RowShape::Scan(_))));
    }

    #[test]
    fn flags_pick_rows_and_bad_values_name_the_flag() {
        let plan = Plan::select(&sel(
            &["chunk", "sdpa_cudnn"],
            &["2x4096x4x128x256"],
            &[],
            &["bf16", "fp32"],
        ))
        .unwrap();
        assert_eq!(plan.rows.len(), 4);
        assert_eq!(plan.rows[3].dtype, Kind::Float);
        assert_eq!(plan.rows[1].op.name(), "sdpa_cudnn");
        // The scan at a given shape, alone; and a scan shape alone picks the scan.
        let scan = sel(&["selective_scan"], &[], &["1x4096x1024x64"], &[]);
        let plan = Plan::select(&scan).unwrap();
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(plan.rows[0].shape.describe(), "B1 T4096 D1024 N64");
        let plan = Plan::select(&sel(&[], &[], &["1x4096x1024x64"], &[])).unwrap();
        assert_eq!((plan.rows.len(), plan.rows[0].op), (1, Op::SelectiveScan));
        // The scan without shapes: mamba_ssm's four.
        assert_eq!(
            Plan::select(&sel(&["selective_scan"], &[], &[], &[]))
                .unwrap()
                .rows
                .len(),
            4
        );
        for (s, words) in [
            (sel(&["fast"], &[], &[], &[]), "--op \"fast\""),
            (sel(&[], &["8x2048"], &[], &[]), "--shape \"8x2048\""),
            (sel(&[], &[], &[], &["int8"]), "--dtype \"int8\""),
            (
                sel(&[], &[], &["8x2048x16"], &[]),
                "--scan-shape \"8x2048x16\"",
            ),
            (
                sel(&["chunk"], &[], &["8x2048x2048x16"], &[]),
                "--scan-shape is for selective_scan",
            ),
            (
                sel(&["selective_scan"], &["8x2048x16x64"], &[], &[]),
                "the scan takes --scan-shape",
            ),
        ] {
            let err = Plan::select(&s).unwrap_err();
            assert!(err.is_bad_input());
            assert!(err.to_string().contains(words), "{err}");
        }
    }

    #[test]
    fn presets_by_name_and_alone() {
        let plan = Plan::preset("article", &Selection::default()).unwrap();
        assert_eq!(plan.preset, Some(Preset::Article));
        assert!(!plan.first_call && !plan.rows.is_empty());
        let err = Plan::preset("paper", &Selection::default()).unwrap_err();
        assert!(err.to_string().contains("expected one of article"), "{err}");
        let err = Plan::preset("article", &sel(&["chunk"], &[], &[], &[])).unwrap_err();
        assert!(err.to_string().contains("rows are fixed"), "{err}");
    }
}
