//! The GLA kernels' launch geometry as the preflight plans with it, and the padding it implies.
//! Every number comes from the launchers (`glatrain_ops::gla::geometry`): when a kernel changes
//! its tiles, grid or schedule, the preflight follows.

use glatrain_config::GlaMode;
use glatrain_ops::gla::geometry;
use serde::{Deserialize, Serialize};

use crate::op::LayerOp;

/// Head dims are padded to a multiple of this along K (and [`TILE_V`] along V).
pub const TILE_K: usize = geometry::PAD_MULTIPLE as usize;
/// See [`TILE_K`].
pub const TILE_V: usize = geometry::PAD_MULTIPLE as usize;
/// Tokens per chunk of the `chunk` mode: one `K x V` state is stored per chunk.
pub const CHUNK_SIZE: usize = geometry::CHUNK_LEN as usize;
/// State tile of one `chunk` / `fused_chunk` block: the grid is `ceil(K / 64) * ceil(V / 64) *
/// B * H` blocks (times chunks for the parallel passes).
pub const CHUNK_BLOCK_K: usize = geometry::CHUNK_TILE as usize;
/// See [`CHUNK_BLOCK_K`].
pub const CHUNK_BLOCK_V: usize = geometry::CHUNK_TILE as usize;
/// State tile of one `fused_recurrent` block.
pub const RECURRENT_BLOCK_K: usize = geometry::RECURRENT_TILE as usize;
/// See [`RECURRENT_BLOCK_K`].
pub const RECURRENT_BLOCK_V: usize = geometry::RECURRENT_TILE as usize;
/// Kernel launches per forward+backward of each mode.
pub use geometry::{
    CHUNK_LAUNCHES, FUSED_CHUNK_LAUNCHES, FUSED_RECURRENT_LAUNCHES, TENSOR_CORE_CHUNK_LAUNCHES,
};

/// Whether `op`'s GLA kernels run their matmuls on bf16/fp16 tensor cores for inputs of
/// `act_bytes` bytes per element, so that the roofline takes the device's tensor peak. Only the
/// bf16/fp16 `chunk` mode does (kernels/gla_tc.cu: `mma.m16n8k16` in the input dtype, the
/// intra-chunk products as three mma on bf16 halves). fp32 `chunk` and `fused_chunk` at any
/// precision run kernels/gla.cu's 3xTF32 products (three tf32 mma for one fp32-accurate one:
/// about the fp32 peak), fused_recurrent scalar fp32 FMAs: the roofline takes the fp32 peak.
pub fn gla_uses_tensor_cores(op: LayerOp, act_bytes: u64) -> bool {
    op == LayerOp::Gla(GlaMode::Chunk) && act_bytes == 2
}

/// How a layer's head dims are padded to whole tiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Padding {
    /// `head_k_dim` rounded up to a multiple of [`TILE_K`].
    pub k_padded: usize,
    /// `head_v_dim` rounded up to a multiple of [`TILE_V`].
    pub v_padded: usize,
    /// Share of the padded `K x V` state tile (and of the tensor-core work) that is padding:
    /// `1 - K V / (K_padded V_padded)`.
    pub wasted_fraction: f64,
}

impl Padding {
    /// Padding of GLA head dims `k x v` to whole tiles (each >= 1).
    pub fn for_tiles(k: usize, v: usize) -> Self {
        let k_padded = k.max(1).div_ceil(TILE_K) * TILE_K;
        let v_padded = v.max(1).div_ceil(TILE_V) * TILE_V;
        let wasted_fraction = 1.0 - (k * v) as f64 / (k_padded * v_padded) as f64;
        Self {
            k_padded,
            v_padded,
            wasted_fraction,
        }
    }

    /// No padding (ops that do not use glatrain's tiles: libtorch's SDPA, the reference ops).
    pub fn none(k: usize, v: usize) -> Self {
        Self {
            k_padded: k,
            v_padded: v,
            wasted_fraction: 0.0,
        }
    }

    /// The table's cell: "-" without padding, else e.g. "K 8->16 50%".
    pub fn describe(&self, k: usize, v: usize) -> String {
        let mut parts = Vec::new();
        if self.k_padded != k {
            parts.push(format!("K {k}->{}", self.k_padded));
        }
        if self.v_padded != v {
            parts.push(format!("V {v}->{}", self.v_padded));
        }
        if parts.is_empty() {
            "-".into()
        } else {
            format!("{} {:.0}%", parts.join(" "), 100.0 * self.wasted_fraction)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_dims_pad_to_whole_tiles() {
        // (K, padded K, wasted share of the K side)
        for (k, padded, waste) in [
            (1, 16, 15.0 / 16.0),
            (4, 16, 0.75),
            (8, 16, 0.5),
            (60, 64, 4.0 / 64.0),
            (100, 112, 12.0 / 112.0),
            (128, 128, 0.0),
        ] {
            let p = Padding::for_tiles(k, 64);
            assert_eq!((p.k_padded, p.v_padded), (padded, 64), "K = {k}");
            assert!(
                (p.wasted_fraction - waste).abs() < 1e-12,
                "K = {k}: {}",
                p.wasted_fraction
            );
        }
        // Both sides padded: the waste is of the whole state tile.
        let p = Padding::for_tiles(8, 8);
        assert_eq!((p.k_padded, p.v_padded), (16, 16));
        assert!((p.wasted_fraction - 0.75).abs() < 1e-12);
    }

    #[test]
    fn padding_is_described_for_the_table() {
        assert_eq!(Padding::for_tiles(8, 16).describe(8, 16), "K 8->16 50%");
        assert_eq!(
            Padding::for_tiles(100, 60).describe(100, 60),
            "K 100->112 V 60->64 16%"
        );
        assert_eq!(Padding::for_tiles(128, 256).describe(128, 256), "-");
        assert_eq!(Padding::none(64, 64).describe(64, 64), "-");
    }
}
