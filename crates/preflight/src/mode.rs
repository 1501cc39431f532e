//! The op a layer runs, and where that choice came from.

use glatrain_config::KernelMode;
use serde::{Deserialize, Serialize};

/// The sequence-mixing op of a layer: a GLA kernel schedule, or the op of a baseline model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// GLA: chunk states materialised, parallel over chunks.
    Chunk,
    /// GLA: one block walks the chunks with the state on chip.
    FusedChunk,
    /// GLA: token by token with the state in registers.
    FusedRecurrent,
    /// GLA: the reference tensor-op implementation (the only one on CPU).
    Reference,
    /// Transformer: causal `scaled_dot_product_attention` on a fused kernel (FlashAttention or
    /// cuDNN: libtorch picks; cuDNN on an H100).
    SdpaFused,
    /// Transformer: causal `scaled_dot_product_attention` where no fused kernel applies (CPU,
    /// fp32, head dim > 256); libtorch runs another backend.
    Sdpa,
    /// Mamba: the selective scan in tensor ops (sequential on a CPU, chunked on a GPU).
    SelectiveScanReference,
}

impl Mode {
    /// The spelling used in the table and the JSON ("fused_chunk", "sdpa_fused", ...).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Chunk => "chunk",
            Mode::FusedChunk => "fused_chunk",
            Mode::FusedRecurrent => "fused_recurrent",
            Mode::Reference => "reference",
            Mode::SdpaFused => "sdpa_fused",
            Mode::Sdpa => "sdpa",
            Mode::SelectiveScanReference => "selective_scan_reference",
        }
    }

    /// The `kernels.mode` that runs this op: `Some` for the GLA modes, `None` for the ops of
    /// the baselines.
    pub fn kernel_mode(self) -> Option<KernelMode> {
        match self {
            Mode::Chunk => Some(KernelMode::Chunk),
            Mode::FusedChunk => Some(KernelMode::FusedChunk),
            Mode::FusedRecurrent => Some(KernelMode::FusedRecurrent),
            Mode::Reference => Some(KernelMode::Reference),
            Mode::SdpaFused | Mode::Sdpa | Mode::SelectiveScanReference => None,
        }
    }

    /// The GLA mode a config's `kernels.mode` names; `None` for `auto`.
    pub fn from_kernel_mode(mode: KernelMode) -> Option<Mode> {
        match mode {
            KernelMode::Auto => None,
            KernelMode::Chunk => Some(Mode::Chunk),
            KernelMode::FusedChunk => Some(Mode::FusedChunk),
            KernelMode::FusedRecurrent => Some(Mode::FusedRecurrent),
            KernelMode::Reference => Some(Mode::Reference),
        }
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
    fn gla_modes_round_trip_through_the_config_spelling() {
        for mode in [
            Mode::Chunk,
            Mode::FusedChunk,
            Mode::FusedRecurrent,
            Mode::Reference,
        ] {
            let km = mode.kernel_mode().unwrap();
            assert_eq!(Mode::from_kernel_mode(km), Some(mode));
            assert_eq!(km.name(), mode.name());
        }
        assert_eq!(Mode::from_kernel_mode(KernelMode::Auto), None);
        assert_eq!(Mode::SdpaFused.kernel_mode(), None);
        assert_eq!(
            serde_json::to_string(&Mode::SelectiveScanReference).unwrap(),
            "\"selective_scan_reference\""
        );
        assert_eq!(
            serde_json::to_string(&Source::Cached).unwrap(),
            "\"cached\""
        );
    }
}
