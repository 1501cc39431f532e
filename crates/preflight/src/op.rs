//! The op a layer runs, and where that choice came from.

use glatrain_config::GlaMode;
use serde::{Deserialize, Serialize};

/// The sequence-mixing op of a layer: GLA in one of its modes, or the op of a baseline model.
/// Serialized as its [`LayerOp::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum LayerOp {
    /// GLA in this mode.
    Gla(GlaMode),
    /// Transformer: causal `scaled_dot_product_attention` on a fused kernel (FlashAttention or
    /// cuDNN: libtorch picks; cuDNN on an H100).
    SdpaFused,
    /// Transformer: causal `scaled_dot_product_attention` where no fused kernel applies (CPU,
    /// fp32, head dim > 256); libtorch runs another backend.
    Sdpa,
    /// Mamba: the selective scan's CUDA kernels (kernels/selective_scan.cu).
    SelectiveScan,
    /// Mamba: the selective scan in tensor ops (sequential on a CPU, chunked on a GPU).
    SelectiveScanReference,
}

impl LayerOp {
    /// The spelling used in the table and the JSON: a GLA mode's config name ("chunk",
    /// "fused_chunk", ...), "sdpa_fused", "sdpa", "selective_scan" or "selective_scan_reference".
    pub fn name(self) -> &'static str {
        match self {
            LayerOp::Gla(mode) => mode.name(),
            LayerOp::SdpaFused => "sdpa_fused",
            LayerOp::Sdpa => "sdpa",
            LayerOp::SelectiveScan => "selective_scan",
            LayerOp::SelectiveScanReference => "selective_scan_reference",
        }
    }

    /// The GLA mode, for the GLA ops.
    pub fn gla_mode(self) -> Option<GlaMode> {
        match self {
            LayerOp::Gla(mode) => Some(mode),
            _ => None,
        }
    }
}

impl From<LayerOp> for String {
    fn from(op: LayerOp) -> String {
        op.name().to_string()
    }
}

impl TryFrom<String> for LayerOp {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let baselines = [
            LayerOp::SdpaFused,
            LayerOp::Sdpa,
            LayerOp::SelectiveScan,
            LayerOp::SelectiveScanReference,
        ];
        GlaMode::from_name(&name)
            .map(LayerOp::Gla)
            .or_else(|| baselines.into_iter().find(|op| op.name() == name))
            .ok_or_else(|| format!("unknown layer op `{name}`"))
    }
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The rules of [`crate::choose_mode`], from the dimensions and the device profile.
    Rules,
    /// `kernels.mode` in the config.
    Forced,
    /// Timed on the device just now.
    Measured,
    /// A measurement reused from the on-disk cache.
    Cached,
}

impl Source {
    /// "rules", "forced", "measured" or "cached".
    pub fn name(self) -> &'static str {
        match self {
            Source::Rules => "rules",
            Source::Forced => "forced",
            Source::Measured => "measured",
            Source::Cached => "cached",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_their_names() {
        let ops = GlaMode::ALL.map(LayerOp::Gla).into_iter().chain([
            LayerOp::SdpaFused,
            LayerOp::Sdpa,
            LayerOp::SelectiveScan,
            LayerOp::SelectiveScanReference,
        ]);
        for op in ops {
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(json, format!("\"{}\"", op.name()));
            assert_eq!(serde_json::from_str::<LayerOp>(&json).unwrap(), op);
        }
        assert_eq!(LayerOp::Gla(GlaMode::Chunk).name(), "chunk");
        assert_eq!(LayerOp::Sdpa.gla_mode(), None);
        assert!(serde_json::from_str::<LayerOp>("\"fast\"").is_err());
        assert_eq!(
            serde_json::to_string(&Source::Cached).unwrap(),
            "\"cached\""
        );
    }
}
