//! Learning-rate schedules as pure functions of the step (nanoGPT's habit): the rate for an
//! optimizer step depends only on the step index and the config, so a resumed run needs no
//! scheduler state.

use glatrain_config::{Schedule, TrainConfig};

/// The schedule's numbers, copied out of [`TrainConfig`] so tests can build one directly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    /// Peak rate.
    pub lr: f64,
    /// Floor reached at `max_steps` (cosine and wsd).
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub max_steps: u64,
    /// Wsd only: fraction of `max_steps` spent in the final linear decay.
    pub decay_fraction: f64,
}

impl LrSchedule {
    /// The schedule of a `[train]` table.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        Self {
            kind: cfg.schedule,
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            max_steps: cfg.max_steps,
            decay_fraction: cfg.decay_fraction,
        }
    }

    /// First step of the wsd decay phase: `max_steps - round(decay_fraction * max_steps)`, never
    /// before the end of warmup.
    pub fn decay_start(&self) -> u64 {
        let decay_steps = (self.decay_fraction * self.max_steps as f64).round() as u64;
        self.max_steps
            .saturating_sub(decay_steps)
            .max(self.warmup_steps)
    }

    /// Learning rate of the optimizer step with 0-based index `step`.
    ///
    /// Warmup is linear, `lr * (step + 1) / (warmup_steps + 1)` for `step < warmup_steps`, so step
    /// 0 already moves the weights and `step == warmup_steps` is exactly `lr`. After warmup:
    /// - cosine: `min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2`, `r` going 0 -> 1 from the end
    ///   of warmup to `max_steps`;
    /// - wsd: `lr` until [`Self::decay_start`], then linear to `min_lr` at `max_steps`;
    /// - constant: `lr`.
    ///
    /// Steps at or past `max_steps` get `min_lr` (cosine, wsd).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.max_steps.saturating_sub(self.warmup_steps);
                if span == 0 || step >= self.max_steps {
                    return self.min_lr;
                }
                let ratio = (step - self.warmup_steps) as f64 / span as f64;
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
                self.min_lr + coeff * (self.lr - self.min_lr)
            }
            Schedule::Wsd => {
                let start = self.decay_start();
                if step < start {
                    return self.lr;
                }
                if step >= self.max_steps {
                    return self.min_lr;
                }
                let ratio = (step - start) as f64 / (self.max_steps - start) as f64;
                self.lr + ratio * (self.min_lr - self.lr)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: Schedule) -> LrSchedule {
        LrSchedule {
            kind,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            max_steps: 110,
            decay_fraction: 0.2,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 + 1e-12 * b.abs()
    }

    #[test]
    fn warmup_boundaries() {
        for kind in [Schedule::Cosine, Schedule::Wsd, Schedule::Constant] {
            let s = sched(kind);
            assert!(close(s.lr_at(0), 1e-3 / 11.0), "{kind:?} step 0");
            assert!(close(s.lr_at(9), 1e-3 * 10.0 / 11.0), "{kind:?} step 9");
            assert!(close(s.lr_at(10), 1e-3), "{kind:?} warmup end");
        }
    }

    #[test]
    fn cosine_midpoint_and_end() {
        let s = sched(Schedule::Cosine);
        // Halfway through the 100 decay steps the cosine factor is exactly 1/2.
        assert!(close(s.lr_at(60), 1e-4 + 0.5 * 9e-4));
        assert!(close(s.lr_at(110), 1e-4));
        assert!(close(s.lr_at(500), 1e-4));
        assert!(s.lr_at(109) > 1e-4 && s.lr_at(109) < 1.01e-4);
    }

    #[test]
    fn wsd_stable_then_linear() {
        let s = sched(Schedule::Wsd);
        assert_eq!(s.decay_start(), 88); // 110 - round(0.2 * 110)
        assert!(close(s.lr_at(87), 1e-3));
        assert!(close(s.lr_at(88), 1e-3));
        assert!(close(s.lr_at(99), 1e-3 + 0.5 * (1e-4 - 1e-3)));
        assert!(close(s.lr_at(110), 1e-4));
    }

    #[test]
    fn wsd_decay_never_starts_inside_warmup() {
        let mut s = sched(Schedule::Wsd);
        s.decay_fraction = 1.0;
        assert_eq!(s.decay_start(), 10);
        assert!(close(s.lr_at(10), 1e-3));
    }

    #[test]
    fn constant_stays() {
        let s = sched(Schedule::Constant);
        assert!(close(s.lr_at(110), 1e-3));
        assert!(close(s.lr_at(10_000), 1e-3));
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let mut s = sched(Schedule::Cosine);
        s.warmup_steps = 0;
        assert!(close(s.lr_at(0), 1e-3));
    }
}
