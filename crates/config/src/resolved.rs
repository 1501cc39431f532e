//! The resolved config: a validated [`Config`] with every derived value filled in, the numbers
//! the trainer needs (sequences per step, accumulation steps, tokens per step), and its TOML
//! form, which is written into the run directory and re-loads to the same run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::ConfigError;
use crate::schema::{Config, ModelConfig};

/// A validated config, ready to train from.
///
/// Every `Option` of the schema that has a derived default is `Some` here
/// (`model.intermediate_size`, `model.num_kv_heads`, `model.dt_rank`, `train.batch_size`,
/// `train.batch_tokens`), so [`ResolvedConfig::to_toml_string`] spells the whole run out.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// The config with derived values filled in.
    pub config: Config,
    /// Where it came from: the file path, or the origin name given to [`crate::from_str`].
    pub source: String,
    /// Sequences per optimizer step (all micro-batches together).
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step: `batch_size / micro_batch_size`.
    pub grad_accum_steps: usize,
    /// Tokens per optimizer step: `batch_size * seq_len`.
    pub tokens_per_step: usize,
}

impl ResolvedConfig {
    /// Fills in the derived values of a config that passed validation (which guarantees that
    /// the divisions below are exact and the products fit).
    pub(crate) fn new(mut config: Config, source: String) -> Self {
        match &mut config.model {
            ModelConfig::Gla(m) => m.intermediate_size = Some(m.mlp_size()),
            ModelConfig::Transformer(m) => {
                m.intermediate_size = Some(m.mlp_size());
                m.num_kv_heads = Some(m.kv_heads());
            }
            ModelConfig::Mamba(m) => m.dt_rank = Some(m.dt_rank()),
        }
        let train = &mut config.train;
        let seq_len = config.data.seq_len;
        // Neither set: one micro-batch per step.
        let batch_size = train
            .batch_size
            .or(train.batch_tokens.map(|tokens| tokens / seq_len))
            .unwrap_or(train.micro_batch_size);
        let tokens_per_step = batch_size * seq_len;
        train.batch_size = Some(batch_size);
        train.batch_tokens = Some(tokens_per_step);
        let grad_accum_steps = batch_size / train.micro_batch_size;
        Self {
            config,
            source,
            batch_size,
            grad_accum_steps,
            tokens_per_step,
        }
    }

    /// The run directory, `run.out_dir/run.name`.
    pub fn run_dir(&self) -> PathBuf {
        Path::new(&self.config.run.out_dir).join(&self.config.run.name)
    }

    /// The whole config as TOML, every default and derived value written out, under a comment
    /// naming its source. Loading the text gives back an equal config.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        let body = toml::to_string_pretty(&self.config)?;
        // One line per comment: a source with a newline must not end the comment early.
        let source = self.source.replace(['\n', '\r'], " ");
        Ok(format!(
            "# Resolved config of run \"{}\", from {source}.\n\
             # Every default and derived value is written out; `glatrain --config` on this file\n\
             # repeats the run.\n\n{body}",
            self.config.run.name
        ))
    }

    /// Writes [`Self::to_toml_string`] to `dir/config.toml` atomically, creating `dir` if
    /// needed. Returns the path written.
    pub fn write_resolved(&self, dir: &Path) -> Result<PathBuf, ConfigError> {
        self.write_to(&dir.join("config.toml"))
    }

    /// Writes [`Self::to_toml_string`] to `path` atomically (a temporary file next to it,
    /// flushed to disk, then renamed over it), creating its directory if needed.
    pub fn write_to(&self, path: &Path) -> Result<PathBuf, ConfigError> {
        let text = self.to_toml_string()?;
        glatrain_fs::write_atomic(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(path.to_path_buf())
    }

    /// Every key whose value differs from `earlier`'s, as `key = value (was earlier value)`,
    /// sorted by key; a key only one of them has shows as `(unset)` on the other side.
    pub fn differences(&self, earlier: &ResolvedConfig) -> Result<Vec<String>, ConfigError> {
        let now = flatten(&self.config)?;
        let before = flatten(&earlier.config)?;
        let mut keys: Vec<&String> = now.keys().chain(before.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&toml::Value>| v.map_or_else(|| "(unset)".into(), |v| v.to_string());
        Ok(keys
            .into_iter()
            .filter(|k| now.get(*k) != before.get(*k))
            .map(|k| format!("{k} = {} (was {})", show(now.get(k)), show(before.get(k))))
            .collect())
    }
}

/// The config's values by dotted key (`train.loss_scale.init`).
fn flatten(config: &Config) -> Result<BTreeMap<String, toml::Value>, ConfigError> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value {
                toml::Value::Table(sub) => walk(&path, sub, out),
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
    }
    let table = toml::Table::try_from(config)?;
    let mut out = BTreeMap::new();
    walk("", &table, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schedule;
    use crate::{from_str, load};
    use std::fs;

    const GLA: &str =
        "[model]\ntype = \"gla\"\nhidden_size = 64\nnum_heads = 2\nvocab_size = 256\n";

    #[test]
    fn derived_values_are_filled_in() {
        let r = from_str(GLA, "gla", &[]).unwrap();
        let ModelConfig::Gla(m) = &r.config.model else {
            panic!("GLA config")
        };
        // 256 * ceil(8 * 64 / 3 / 256) = 256.
        assert_eq!(m.intermediate_size, Some(256));
        assert_eq!(
            r.batch_size, 8,
            "neither batch key set: one micro-batch per step"
        );
        assert_eq!(r.grad_accum_steps, 1);
        assert_eq!(r.tokens_per_step, 8 * 2048);
        assert_eq!(r.config.train.batch_size, Some(8));
        assert_eq!(r.config.train.batch_tokens, Some(8 * 2048));
        assert_eq!(r.source, "gla");
        assert_eq!(r.run_dir(), Path::new("runs/run"));

        let r = from_str(
            "[model]\ntype = \"transformer\"\nnum_heads = 16\n",
            "t",
            &[],
        )
        .unwrap();
        let ModelConfig::Transformer(m) = &r.config.model else {
            panic!("Transformer config")
        };
        assert_eq!(
            (m.intermediate_size, m.num_kv_heads),
            (Some(2816), Some(16))
        );

        let r = from_str("[model]\ntype = \"mamba\"\nhidden_size = 1000\n", "m", &[]).unwrap();
        let ModelConfig::Mamba(m) = &r.config.model else {
            panic!("Mamba config")
        };
        assert_eq!(m.dt_rank, Some(63));
    }

    #[test]
    fn batch_tokens_and_batch_size_give_the_step_shape() {
        // (the [train] key that sizes the batch; batch size, accumulation steps, tokens per step)
        for (size, step) in [
            ("batch_tokens = 8192", (64, 4, 8192)),
            ("batch_size = 48", (48, 3, 6144)),
        ] {
            let text =
                format!("{GLA}[data]\nseq_len = 128\n[train]\n{size}\nmicro_batch_size = 16\n");
            let r = from_str(&text, "gla", &[]).unwrap();
            assert_eq!(
                (r.batch_size, r.grad_accum_steps, r.tokens_per_step),
                step,
                "{size}"
            );
            assert_eq!(r.config.train.batch_tokens, Some(step.2), "{size}");
        }
    }

    #[test]
    fn the_toml_form_reloads_to_the_same_config() {
        let overrides = [
            "train.schedule=wsd".to_owned(),
            "train.lr=1e-3".to_owned(),
            "model.expand_k=0.25".to_owned(),
        ];
        let original = from_str(GLA, "gla", &overrides).unwrap();
        assert_eq!(original.config.train.schedule, Schedule::Wsd);
        let text = original.to_toml_string().unwrap();
        assert!(
            text.starts_with("# Resolved config of run \"run\", from gla.\n"),
            "{text}"
        );
        // Every key is spelled out, including the derived ones.
        for key in [
            "intermediate_size = 256",
            "batch_tokens = 16384",
            "[train.loss_scale]",
            "norm_eps",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
        let reloaded = from_str(&text, "resolved", &[]).unwrap();
        assert_eq!(reloaded.config, original.config);
        assert_eq!(
            (
                reloaded.batch_size,
                reloaded.grad_accum_steps,
                reloaded.tokens_per_step
            ),
            (
                original.batch_size,
                original.grad_accum_steps,
                original.tokens_per_step
            )
        );
    }

    #[test]
    fn write_resolved_writes_config_toml_that_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("runs/x");
        let original = from_str(GLA, "gla", &["run.name=x".to_owned()]).unwrap();
        let path = original.write_resolved(&run_dir).unwrap();
        assert_eq!(path, run_dir.join("config.toml"));
        // Only the target is left behind, no temporary file.
        let names: Vec<_> = fs::read_dir(&run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["config.toml"]);
        let reloaded = load(&path, &[]).unwrap();
        assert_eq!(reloaded.config, original.config);
        assert_eq!(reloaded.source, path.display().to_string());
        // Writing again replaces the file.
        original.write_resolved(&run_dir).unwrap();
        assert_eq!(load(&path, &[]).unwrap().config, original.config);
    }

    #[test]
    fn differences_name_each_changed_key_with_both_values() {
        let before = from_str(GLA, "gla", &[]).unwrap();
        assert!(before.differences(&before).unwrap().is_empty());
        let after = from_str(
            GLA,
            "gla",
            &[
                "train.lr=1e-3".to_owned(),
                "train.loss_scale.init=8.0".to_owned(),
            ],
        )
        .unwrap();
        assert_eq!(
            after.differences(&before).unwrap(),
            [
                "train.loss_scale.init = 8.0 (was 65536.0)",
                "train.lr = 0.001 (was 0.0003)",
            ]
        );
    }

    #[test]
    fn write_failures_are_not_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "not a directory").unwrap();
        let err = from_str(GLA, "gla", &[])
            .unwrap()
            .write_resolved(&blocker.join("run"))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Write { .. }), "{err}");
        assert!(!err.is_bad_input());
        assert!(
            err.to_string().contains("cannot write the resolved config"),
            "{err}"
        );
    }
}
