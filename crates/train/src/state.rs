//! `state.json`: everything besides tensors that an exact resume needs, plus facts about the
//! run for people reading the checkpoint.

use glatrain_config::{ModelConfig, Precision, ResolvedConfig};
use glatrain_data::{BatchLoader, LoaderState};
use serde::{Deserialize, Serialize};

use crate::precision::MixedPrecision;
use crate::scaler::LossScaler;

/// What the models draw random numbers for, recorded in `state.json`.
pub const RNG_NOTE: &str = "libtorch's generator is seeded with `seed` and used only to \
    initialise the weights (the models have no dropout); the data order lives in `loader`";

/// The trainer's state at the end of optimizer step `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken (skipped ones included): the next step's index.
    pub step: u64,
    /// Training tokens consumed (skipped steps included).
    pub tokens_seen: u64,
    /// AdamW updates applied (its bias-correction `t`).
    pub optimizer_updates: u64,
    pub loss_scaler: LossScaler,
    /// Position of the training batch loader.
    pub loader: LoaderState,
    /// Steps in a row with non-finite gradients, up to now.
    pub consecutive_skips: u64,
    /// Steps skipped since the start of training.
    pub skipped_steps: u64,
    /// `run.seed`.
    pub seed: u64,
    /// See [`RNG_NOTE`].
    pub rng: String,
    /// libtorch intra-op threads the run used (bit-identical CPU resumes need the same count).
    pub torch_threads: i32,
    /// Wall-clock seconds of training so far, over all sessions.
    pub elapsed_secs: f64,
    /// Mean loss of the last step.
    pub last_loss: Option<f64>,
    /// The model the weights belong to (resuming with another one is refused).
    pub model: ModelConfig,
    /// Trainable parameters.
    pub parameters: i64,
    pub precision: Precision,
    /// glatrain version that wrote the checkpoint.
    pub glatrain_version: String,
}

impl TrainState {
    /// The state of a run that has taken no step yet: its loader at the start, the loss scale
    /// at `train.loss_scale.init` (when the precision scales the loss).
    pub fn fresh(
        cfg: &ResolvedConfig,
        loader: &BatchLoader,
        precision: &MixedPrecision,
        torch_threads: i32,
        parameters: i64,
    ) -> Self {
        let tc = &cfg.config.train;
        TrainState {
            step: 0,
            tokens_seen: 0,
            optimizer_updates: 0,
            loss_scaler: LossScaler::new(&tc.loss_scale, precision.uses_loss_scaling()),
            loader: loader.state(),
            consecutive_skips: 0,
            skipped_steps: 0,
            seed: cfg.config.run.seed,
            rng: RNG_NOTE.to_string(),
            torch_threads,
            elapsed_secs: 0.0,
            last_loss: None,
            model: cfg.config.model.clone(),
            parameters,
            precision: tc.precision,
            glatrain_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// Differences between two model configs as `model.<key> = <a> vs <b>` lines (keys of the
/// JSON form, `type` included). `init_from` is left out: it says where a run started, not what
/// the weights are.
pub fn model_differences(checkpoint: &ModelConfig, config: &ModelConfig) -> Vec<String> {
    let (Ok(a), Ok(b)) = (
        serde_json::to_value(checkpoint),
        serde_json::to_value(config),
    ) else {
        return vec!["model: not comparable".into()];
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["model: not comparable".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| *k != "init_from" && a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| {
                v.map_or_else(|| "(unset)".to_string(), |v| v.to_string())
            };
            format!(
                "model.{k} = {} in the checkpoint, {} in the config",
                show(a.get(k)),
                show(b.get(k))
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_config::{GlaConfig, MambaConfig};

    #[test]
    fn differences_name_keys_and_values() {
        let a = ModelConfig::Gla(GlaConfig::default());
        let b = ModelConfig::Gla(GlaConfig {
            hidden_size: 512,
            ..GlaConfig::default()
        });
        assert!(model_differences(&a, &a).is_empty());
        let d = model_differences(&a, &b);
        assert_eq!(
            d,
            vec!["model.hidden_size = 1024 in the checkpoint, 512 in the config".to_string()]
        );
        let started = ModelConfig::Gla(GlaConfig {
            init_from: Some("hf/gla".into()),
            ..GlaConfig::default()
        });
        assert!(model_differences(&started, &a).is_empty());
        let m = ModelConfig::Mamba(MambaConfig::default());
        let d = model_differences(&a, &m);
        assert!(
            d.iter().any(|l| l.starts_with("model.type = \"gla\"")),
            "{d:?}"
        );
    }
}
