//! Which rows a benchmark run times.

use glatrain_ops::GlaMode;
use glatrain_shim::sdp::SdpaBackend;
use tch::Kind;

use crate::anchors::Anchors;
use crate::op::{Op, Shape};
use crate::BenchError;

/// One row: an op at a shape in a dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSpec {
    pub op: Op,
    pub shape: Shape,
    /// q, k, v (and o) dtype; GLA's log gates are always fp32.
    pub dtype: Kind,
}

/// The rows of a run, and whether it first measures the GLA kernels' cold first call.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rows: Vec<RowSpec>,
    pub first_call: bool,
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

impl Plan {
    /// The rows of `--op`, `--shape` and `--dtype` values (each repeatable; all combinations).
    /// No ops: the default ones for each shape (every GLA mode, SDPA flash and SDPA's own
    /// choice); no shapes: the shapes flash-linear-attention was measured at
    /// (`bench/anchors.json`); no dtypes: bf16.
    pub fn select(
        ops: &[String],
        shapes: &[String],
        dtypes: &[String],
    ) -> Result<Plan, BenchError> {
        let arg = |flag, value: &String, expected: String| BenchError::Arg {
            flag,
            value: value.clone(),
            expected,
        };
        let ops = ops
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
        let shapes = if shapes.is_empty() {
            Anchors::embedded().gla_shapes()
        } else {
            shapes
                .iter()
                .map(|s| {
                    Shape::parse(s).ok_or_else(|| {
                        let expected = "expected BxTxHxD or BxTxHxKxV, sizes >= 1".to_string();
                        arg("--shape", s, expected)
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let dtypes = if dtypes.is_empty() {
            vec![Kind::BFloat16]
        } else {
            dtypes
                .iter()
                .map(|d| {
                    parse_dtype(d)
                        .ok_or_else(|| arg("--dtype", d, "expected bf16, fp16 or fp32".into()))
                })
                .collect::<Result<_, _>>()?
        };
        let mut rows = Vec::new();
        for &dtype in &dtypes {
            for shape in &shapes {
                let shape_ops = if ops.is_empty() {
                    default_ops(shape)
                } else {
                    ops.clone()
                };
                rows.extend(shape_ops.into_iter().map(|op| RowSpec {
                    op,
                    shape: *shape,
                    dtype,
                }));
            }
        }
        Ok(Plan {
            rows,
            first_call: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_covers_the_anchor_rows() {
        let plan = Plan::select(&[], &[], &[]).unwrap();
        assert!(plan.first_call);
        // Six shapes; fused_recurrent at D = 32 and 64 only.
        assert_eq!(plan.rows.len(), 6 * 4 + 2);
        assert!(plan.rows.iter().all(|r| r.dtype == Kind::BFloat16));
        let recurrent: Vec<i64> = plan
            .rows
            .iter()
            .filter(|r| r.op == Op::Gla(GlaMode::FusedRecurrent))
            .map(|r| r.shape.k)
            .collect();
        assert_eq!(recurrent, [32, 64]);
    }

    #[test]
    fn flags_pick_rows_and_bad_values_name_the_flag() {
        let plan = Plan::select(
            &["chunk".into(), "sdpa_cudnn".into()],
            &["2x4096x4x128x256".into()],
            &["bf16".into(), "fp32".into()],
        )
        .unwrap();
        assert_eq!(plan.rows.len(), 4);
        assert_eq!(plan.rows[3].dtype, Kind::Float);
        assert_eq!(plan.rows[1].op.name(), "sdpa_cudnn");
        for (ops, shapes, dtypes, words) in [
            (vec!["fast".to_string()], vec![], vec![], "--op \"fast\""),
            (
                vec![],
                vec!["8x2048".to_string()],
                vec![],
                "--shape \"8x2048\"",
            ),
            (vec![], vec![], vec!["int8".to_string()], "--dtype \"int8\""),
        ] {
            let err = Plan::select(&ops, &shapes, &dtypes).unwrap_err();
            assert!(err.is_bad_input());
            assert!(err.to_string().contains(words), "{err}");
        }
    }
}
