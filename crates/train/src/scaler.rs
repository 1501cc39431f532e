//! Dynamic loss scaling for fp16 (PyTorch's `GradScaler` rules): the loss is multiplied by
//! `scale` before backward; a step whose unscaled gradients are not finite is skipped and the
//! scale multiplied by `backoff_factor` (never below `min_scale`); after `growth_interval`
//! finite steps in a row the scale is multiplied by `growth_factor`. The whole state is two
//! numbers, saved in `state.json`.

use glatrain_config::LossScaleConfig;
use serde::{Deserialize, Serialize};

/// The scaler's state; `enabled == false` (fp32, bf16) keeps the scale at 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    /// Finite steps since the last growth or backoff.
    pub growth_tracker: u64,
    pub growth_interval: u64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub min_scale: f64,
}

/// What [`LossScaler::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    Unchanged,
    Grew,
    BackedOff,
}

impl LossScaler {
    /// A scaler for fp16 (`enabled`) or a no-op one with scale 1.
    pub fn new(cfg: &LossScaleConfig, enabled: bool) -> Self {
        Self {
            enabled,
            scale: if enabled { cfg.init } else { 1.0 },
            growth_tracker: 0,
            growth_interval: cfg.growth_interval,
            growth_factor: cfg.growth_factor,
            backoff_factor: cfg.backoff_factor,
            min_scale: cfg.min_scale,
        }
    }

    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Records the outcome of a step: `finite` is whether every unscaled gradient was finite.
    pub fn update(&mut self, finite: bool) -> ScaleChange {
        if !self.enabled {
            return ScaleChange::Unchanged;
        }
        if !finite {
            self.scale = (self.scale * self.backoff_factor).max(self.min_scale);
            self.growth_tracker = 0;
            return ScaleChange::BackedOff;
        }
        self.growth_tracker += 1;
        if self.growth_tracker >= self.growth_interval {
            self.scale *= self.growth_factor;
            self.growth_tracker = 0;
            return ScaleChange::Grew;
        }
        ScaleChange::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LossScaleConfig {
        LossScaleConfig {
            init: 1024.0,
            growth_interval: 3,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale: 256.0,
        }
    }

    #[test]
    fn backs_off_on_overflow_and_grows_after_interval() {
        let mut s = LossScaler::new(&cfg(), true);
        assert_eq!(s.scale(), 1024.0);
        assert_eq!(s.update(false), ScaleChange::BackedOff);
        assert_eq!(s.scale(), 512.0);
        assert_eq!(s.update(true), ScaleChange::Unchanged);
        assert_eq!(s.update(true), ScaleChange::Unchanged);
        assert_eq!(s.scale(), 512.0);
        assert_eq!(s.update(true), ScaleChange::Grew);
        assert_eq!(s.scale(), 1024.0);
    }

    #[test]
    fn overflow_resets_the_growth_count() {
        let mut s = LossScaler::new(&cfg(), true);
        s.update(true);
        s.update(true);
        s.update(false);
        assert_eq!(s.scale(), 512.0);
        s.update(true);
        s.update(true);
        assert_eq!(
            s.scale(),
            512.0,
            "two finite steps after a backoff must not grow"
        );
        s.update(true);
        assert_eq!(s.scale(), 1024.0);
    }

    #[test]
    fn never_below_min_scale() {
        let mut s = LossScaler::new(&cfg(), true);
        for _ in 0..10 {
            s.update(false);
        }
        assert_eq!(s.scale(), 256.0);
    }

    #[test]
    fn disabled_is_identity() {
        let mut s = LossScaler::new(&cfg(), false);
        assert_eq!(s.scale(), 1.0);
        assert_eq!(s.update(false), ScaleChange::Unchanged);
        assert_eq!(s.scale(), 1.0);
    }

    #[test]
    fn serde_round_trip() {
        let mut s = LossScaler::new(&cfg(), true);
        s.update(true);
        let json = serde_json::to_string(&s).unwrap();
        let back: LossScaler = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
