//! The numbers glatrain is measured against (`bench/anchors.json`, compiled in): other
//! projects' times of the same ops, measured by this project, with their source.

use serde::Deserialize;

use crate::op::{Op, RowShape, ScanShape, Shape};
use glatrain_ops::GlaMode;
use glatrain_shim::sdp::SdpaBackend;

/// `bench/anchors.json`.
#[derive(Debug, Deserialize)]
pub struct Anchors {
    ops: Vec<AnchorOp>,
}

#[derive(Debug, Deserialize)]
struct AnchorOp {
    name: String,
    what: String,
    date: String,
    rows: Vec<AnchorRow>,
}

#[derive(Debug, Deserialize)]
struct AnchorRow {
    shape: [i64; 4],
    fwd_bwd_ms: f64,
}

/// One anchor time of a benchmark row.
#[derive(Debug, Clone, PartialEq)]
pub struct Anchor {
    /// The anchor op's name in `bench/anchors.json` (`fla_chunk_gla`, ...).
    pub name: String,
    /// What was measured, and how.
    pub what: String,
    /// When.
    pub date: String,
    /// Its forward + backward time, ms.
    pub fwd_bwd_ms: f64,
}

impl Anchors {
    /// The compiled-in `bench/anchors.json`.
    pub fn embedded() -> Anchors {
        serde_json::from_str(include_str!("../../../bench/anchors.json"))
            .expect("bench/anchors.json is valid (a unit test parses it)")
    }

    /// The anchor of `op` at `shape` (bf16): flash-linear-attention's `chunk_gla` for GLA
    /// modes, FlashAttention for `sdpa_flash`, mamba_ssm's selective scan for the scan.
    pub fn for_row(&self, op: Op, shape: &RowShape) -> Option<Anchor> {
        let (name, key) = match (op, shape) {
            (
                Op::Gla(GlaMode::Chunk | GlaMode::FusedChunk | GlaMode::FusedRecurrent),
                RowShape::Attention(s),
            ) => ("fla_chunk_gla", s.square()?),
            (Op::Sdpa(Some(SdpaBackend::Flash)), RowShape::Attention(s)) => {
                ("sdpa_flash", s.square()?)
            }
            (Op::SelectiveScan, RowShape::Scan(s)) => {
                ("mamba_ssm_selective_scan", [s.b, s.t, s.d, s.n])
            }
            _ => return None,
        };
        let anchor = self.ops.iter().find(|o| o.name == name)?;
        let row = anchor.rows.iter().find(|r| r.shape == key)?;
        Some(Anchor {
            name: anchor.name.clone(),
            what: anchor.what.clone(),
            date: anchor.date.clone(),
            fwd_bwd_ms: row.fwd_bwd_ms,
        })
    }

    /// The rows of the anchor op `name`, by shape.
    fn shapes(&self, name: &str) -> impl Iterator<Item = [i64; 4]> + '_ {
        let name = name.to_string();
        self.ops
            .iter()
            .filter(move |o| o.name == name)
            .flat_map(|o| &o.rows)
            .map(|r| r.shape)
    }

    /// The shapes flash-linear-attention's `chunk_gla` was measured at: the default GLA rows.
    pub fn gla_shapes(&self) -> Vec<Shape> {
        self.shapes("fla_chunk_gla")
            .map(|[b, t, h, d]| Shape {
                b,
                t,
                h,
                k: d,
                v: d,
            })
            .collect()
    }

    /// The shapes mamba_ssm's selective scan was measured at: the default scan rows.
    pub fn scan_shapes(&self) -> Vec<ScanShape> {
        self.shapes("mamba_ssm_selective_scan")
            .map(|[b, t, d, n]| ScanShape { b, t, d, n })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_file_parses_and_keys_rows_by_shape() {
        let a = Anchors::embedded();
        assert_eq!(a.gla_shapes().len(), 6);
        let s = RowShape::Attention(Shape::parse("8x2048x16x128").unwrap());
        let fla = a.for_row(Op::Gla(GlaMode::Chunk), &s).unwrap();
        assert_eq!((fla.name.as_str(), fla.fwd_bwd_ms), ("fla_chunk_gla", 3.69));
        let flash = a.for_row(Op::Sdpa(Some(SdpaBackend::Flash)), &s).unwrap();
        assert_eq!(flash.fwd_bwd_ms, 2.30);
        assert_eq!(a.for_row(Op::Sdpa(None), &s), None);
        let other = RowShape::Attention(Shape::parse("8x2048x4x128x256").unwrap());
        assert_eq!(a.for_row(Op::Gla(GlaMode::Chunk), &other), None);
        // mamba_ssm's four rows, keyed B x T x D_inner x N.
        assert_eq!(a.scan_shapes().len(), 4);
        let scan = RowShape::Scan(ScanShape::parse("1x16384x2048x16").unwrap());
        let m = a.for_row(Op::SelectiveScan, &scan).unwrap();
        assert_eq!(
            (m.name.as_str(), m.fwd_bwd_ms),
            ("mamba_ssm_selective_scan", 3.86)
        );
        assert_eq!(a.for_row(Op::Gla(GlaMode::Chunk), &scan), None);
    }
}
