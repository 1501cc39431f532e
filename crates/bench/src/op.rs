//! What a benchmark row times: an op and the shape of its inputs (attention-like ops
//! `BxTxHxKxV`, the selective scan `BxTxDxN`).

use glatrain_ops::GlaMode;
use glatrain_shim::sdp::SdpaBackend;

/// An op the benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// GLA in one of its kernel modes.
    Gla(GlaMode),
    /// libtorch's causal SDPA on one backend alone, or (`None`) on the backend it picks.
    Sdpa(Option<SdpaBackend>),
    /// Block-causal SDPA over [`DOCUMENTS_PER_ROW`] equal documents in each row
    /// (`glatrain_ops::sdpa::block_causal_sdpa`, as packed training runs the Transformer).
    DocumentSdpa,
    /// Mamba's selective scan (the CUDA kernels), at a [`ScanShape`].
    SelectiveScan,
}

/// How many documents of equal length a [`Op::DocumentSdpa`] row packs into each row.
pub const DOCUMENTS_PER_ROW: usize = 4;

/// The SDPA backends a row can pin, with their names.
const SDPA_BACKENDS: [SdpaBackend; 4] = [
    SdpaBackend::Flash,
    SdpaBackend::Cudnn,
    SdpaBackend::Efficient,
    SdpaBackend::Math,
];

impl Op {
    /// Every op, for listings.
    pub fn all() -> Vec<Op> {
        let gla = [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent].map(Op::Gla);
        let sdpa = SDPA_BACKENDS.map(|b| Op::Sdpa(Some(b)));
        gla.into_iter()
            .chain(sdpa)
            .chain([Op::Sdpa(None), Op::DocumentSdpa, Op::SelectiveScan])
            .collect()
    }

    /// The name on the command line and in the report: a GLA mode's config name (`chunk`,
    /// `fused_chunk`, `fused_recurrent`), `sdpa_<backend>` for one SDPA backend alone, `sdpa`
    /// for libtorch's own choice, `sdpa_documents` for block-causal SDPA, `selective_scan`.
    pub fn name(self) -> String {
        match self {
            Op::Gla(mode) => mode.name().to_string(),
            Op::Sdpa(Some(backend)) => format!("sdpa_{}", backend.name()),
            Op::Sdpa(None) => "sdpa".to_string(),
            Op::DocumentSdpa => "sdpa_documents".to_string(),
            Op::SelectiveScan => "selective_scan".to_string(),
        }
    }

    /// Whether the op takes a [`ScanShape`] (else a [`Shape`]).
    pub fn is_scan(self) -> bool {
        self == Op::SelectiveScan
    }

    /// The op a name gives (see [`Op::name`]).
    pub fn parse(name: &str) -> Option<Op> {
        Op::all().into_iter().find(|op| op.name() == name)
    }
}

/// Parses `AxBx...` into sizes, each at least 1.
fn sizes(text: &str) -> Option<Vec<i64>> {
    text.split('x')
        .map(|s| s.parse().ok().filter(|&n: &i64| n >= 1))
        .collect()
}

/// The sizes of an attention-like op's inputs: q, k `[B, T, H, K]`, v `[B, T, H, V]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub b: i64,
    pub t: i64,
    pub h: i64,
    pub k: i64,
    pub v: i64,
}

impl Shape {
    /// `BxTxHxD` (K = V = D) or `BxTxHxKxV`, each size at least 1.
    pub fn parse(text: &str) -> Option<Shape> {
        match sizes(text)?[..] {
            [b, t, h, d] => Some(Shape {
                b,
                t,
                h,
                k: d,
                v: d,
            }),
            [b, t, h, k, v] => Some(Shape { b, t, h, k, v }),
            _ => None,
        }
    }

    /// As [`Shape::parse`] reads it: `BxTxHxD` when K = V.
    pub fn name(&self) -> String {
        let Shape { b, t, h, k, v } = *self;
        if k == v {
            format!("{b}x{t}x{h}x{k}")
        } else {
            format!("{b}x{t}x{h}x{k}x{v}")
        }
    }

    /// The same shape with K = V = D, as the anchors key their rows.
    pub fn square(&self) -> Option<[i64; 4]> {
        (self.k == self.v).then_some([self.b, self.t, self.h, self.k])
    }

    /// Elements of one q (or k) tensor: B T H K.
    pub fn qk_elements(&self) -> i64 {
        self.b * self.t * self.h * self.k
    }

    /// Elements of one v (or o) tensor: B T H V.
    pub fn v_elements(&self) -> i64 {
        self.b * self.t * self.h * self.v
    }
}

/// The sizes of a selective scan: u, delta, z `[B, T, D]` (D = d_inner), B, C `[B, T, N]`
/// (N = d_state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanShape {
    pub b: i64,
    pub t: i64,
    pub d: i64,
    pub n: i64,
}

impl ScanShape {
    /// `BxTxDxN`, each size at least 1.
    pub fn parse(text: &str) -> Option<ScanShape> {
        match sizes(text)?[..] {
            [b, t, d, n] => Some(ScanShape { b, t, d, n }),
            _ => None,
        }
    }

    /// As [`ScanShape::parse`] reads it.
    pub fn name(&self) -> String {
        format!("{}x{}x{}x{}", self.b, self.t, self.d, self.n)
    }

    /// Tokens: B T.
    pub fn tokens(&self) -> i64 {
        self.b * self.t
    }

    /// Elements of the state over the sequence, B T D N: one exponential each per walk.
    pub fn state_elements(&self) -> i64 {
        self.tokens() * self.d * self.n
    }
}

/// The shape of one benchmark row: an attention-like op's or the scan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowShape {
    Attention(Shape),
    Scan(ScanShape),
}

impl RowShape {
    /// The shape as the table and the JSON spell it, with its dimension names
    /// (`B8 T2048 H16 K128 V128`, `B8 T2048 D2048 N16`).
    pub fn describe(&self) -> String {
        match *self {
            RowShape::Attention(Shape { b, t, h, k, v }) => format!("B{b} T{t} H{h} K{k} V{v}"),
            RowShape::Scan(ScanShape { b, t, d, n }) => format!("B{b} T{t} D{d} N{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip() {
        for op in Op::all() {
            assert_eq!(Op::parse(&op.name()), Some(op));
        }
        assert_eq!(Op::parse("chunk"), Some(Op::Gla(GlaMode::Chunk)));
        assert_eq!(
            Op::parse("sdpa_flash"),
            Some(Op::Sdpa(Some(SdpaBackend::Flash)))
        );
        assert_eq!(Op::parse("sdpa"), Some(Op::Sdpa(None)));
        assert_eq!(Op::parse("sdpa_documents"), Some(Op::DocumentSdpa));
        assert_eq!(Op::parse("selective_scan"), Some(Op::SelectiveScan));
        assert!(Op::SelectiveScan.is_scan() && !Op::Sdpa(None).is_scan());
        assert_eq!(Op::parse("reference"), None);
    }

    #[test]
    fn shapes_take_one_or_two_head_dims() {
        let s = Shape::parse("8x2048x16x128").unwrap();
        assert_eq!((s.k, s.v), (128, 128));
        assert_eq!(s.name(), "8x2048x16x128");
        let s = Shape::parse("8x2048x4x128x256").unwrap();
        assert_eq!((s.h, s.k, s.v), (4, 128, 256));
        assert_eq!(s.name(), "8x2048x4x128x256");
        assert_eq!(s.square(), None);
        for bad in ["8x2048x16", "8x0x16x128", "axbxcxd", "1x2x3x4x5x6", ""] {
            assert_eq!(Shape::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn scan_shapes_are_b_t_d_n() {
        let s = ScanShape::parse("8x2048x2048x16").unwrap();
        assert_eq!((s.b, s.t, s.d, s.n), (8, 2048, 2048, 16));
        assert_eq!(s.name(), "8x2048x2048x16");
        assert_eq!(s.state_elements(), 8 * 2048 * 2048 * 16);
        assert_eq!(RowShape::Scan(s).describe(), "B8 T2048 D2048 N16");
        for bad in ["8x2048x16", "8x2048x16x1x1", "8x2048x0x16"] {
            assert_eq!(ScanShape::parse(bad), None, "{bad}");
        }
        let a = Shape::parse("1x64x2x32").unwrap();
        assert_eq!(RowShape::Attention(a).describe(), "B1 T64 H2 K32 V32");
    }
}
