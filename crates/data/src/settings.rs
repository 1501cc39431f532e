//! A run's data settings checked before anything is built: a `data.train` / `data.valid` path
//! that does not exist fails at once, with the commands that make it or avoid it.
//!
//! Relative paths resolve against the current directory (the same rule for a config file, a
//! shipped config and a run's resolved config.toml), so the message says which directory that is.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::tokenizer::TokenizerSpec;

/// The `[data]` settings of a run, as its config gives them.
#[derive(Debug, Clone, Copy)]
pub struct DataSettings<'a> {
    /// Where the settings come from (the config file), for messages.
    pub origin: &'a str,
    /// `data.train`: `"embedded"` or a path.
    pub train: &'a str,
    /// `data.valid`: `"embedded"` or a path.
    pub valid: &'a str,
    /// `data.tokenizer`: `"byte"` or a tokenizer.json path.
    pub tokenizer: &'a str,
    /// The model's vocab size, for the BPE tokenizer `prepare` would train.
    pub vocab_size: u32,
}

impl DataSettings<'_> {
    /// Fails with [`DataError::MissingData`] when `data.train` or `data.valid` names a path that
    /// does not exist.
    pub fn check_paths(&self) -> Result<()> {
        let missing: Vec<(&str, &str)> = [("data.train", self.train), ("data.valid", self.valid)]
            .into_iter()
            .filter(|(_, value)| *value != "embedded" && !Path::new(value).exists())
            .collect();
        let Some(&(key, value)) = missing.first() else {
            return Ok(());
        };
        let mut message = format!("{key} = {value:?}: no such file or directory");
        if let [_, (other, other_value)] = missing[..] {
            if other_value == value {
                message.push_str(&format!(" (nor {other}, the same path)"));
            } else {
                message.push_str(&format!(" (nor {other} = {other_value:?})"));
            }
        }
        if Path::new(value).is_relative() {
            let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            message.push_str(&format!(
                "; relative paths resolve against the current directory, {}",
                here.display()
            ));
        }
        Err(DataError::MissingData {
            origin: self.origin.to_string(),
            message,
            remedy: self.remedy(&missing),
        })
    }

    /// The two ways out: make the data with `glatrain prepare`, or train on the embedded corpus.
    fn remedy(&self, missing: &[(&str, &str)]) -> String {
        let tokenizer_file = match self.tokenizer.parse::<TokenizerSpec>() {
            Ok(TokenizerSpec::File(path)) => Some(path),
            _ => None,
        };
        let tokenizer_missing = tokenizer_file.as_ref().is_some_and(|p| !p.exists());
        let tokenizer = match &tokenizer_file {
            Some(path) if !tokenizer_missing => path.display().to_string(),
            Some(_) => format!("bpe:{}", self.vocab_size),
            None => "byte".into(),
        };
        let mut outs: Vec<&str> = missing.iter().map(|(_, value)| *value).collect();
        outs.dedup();
        let mut lines = vec![
            "make it from a corpus (text, JSON Lines or parquet files, or \
                              directories of them; see `glatrain prepare --help`):"
                .to_string(),
        ];
        for out in &outs {
            lines.push(format!(
                "  glatrain prepare --input YOUR_CORPUS --tokenizer {tokenizer} --out {out}"
            ));
        }
        if tokenizer_missing {
            lines.push(format!(
                "  (data.tokenizer = {:?} does not exist either: `bpe:{}` trains a tokenizer and \
                 writes it to {}/tokenizer.json; point data.tokenizer there)",
                self.tokenizer, self.vocab_size, outs[0]
            ));
        }
        let mut embedded: Vec<String> = missing
            .iter()
            .map(|(key, _)| format!("--set {key}=embedded"))
            .collect();
        if tokenizer_missing {
            embedded.push("--set data.tokenizer=byte".into());
        }
        lines.push(
            "or try the model at once on the corpus built into glatrain, adding:".to_string(),
        );
        lines.push(format!("  {}", embedded.join(" ")));
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings<'a>(
        dir: &'a str,
        train: &'a str,
        valid: &'a str,
        tok: &'a str,
    ) -> DataSettings<'a> {
        DataSettings {
            origin: dir,
            train,
            valid,
            tokenizer: tok,
            vocab_size: 32000,
        }
    }

    #[test]
    fn embedded_and_existing_paths_pass() {
        let dir = tempfile::tempdir().unwrap();
        let here = dir.path().to_str().unwrap();
        settings("x.toml", "embedded", "embedded", "byte")
            .check_paths()
            .unwrap();
        settings("x.toml", here, "embedded", "nope.json")
            .check_paths()
            .unwrap();
    }

    #[test]
    fn a_missing_path_names_the_key_and_both_ways_out() {
        let err = settings(
            "gla-340m.toml (built in)",
            "/nowhere/tokens",
            "/nowhere/tokens",
            "/nowhere/tokenizer.json",
        )
        .check_paths()
        .unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            "gla-340m.toml (built in): data.train = \"/nowhere/tokens\": no such file or \
             directory (nor data.valid, the same path)\n\
             make it from a corpus (text, JSON Lines or parquet files, or directories of them; \
             see `glatrain prepare --help`):\n  \
             glatrain prepare --input YOUR_CORPUS --tokenizer bpe:32000 --out /nowhere/tokens\n  \
             (data.tokenizer = \"/nowhere/tokenizer.json\" does not exist either: `bpe:32000` \
             trains a tokenizer and writes it to /nowhere/tokens/tokenizer.json; point \
             data.tokenizer there)\n\
             or try the model at once on the corpus built into glatrain, adding:\n  \
             --set data.train=embedded --set data.valid=embedded --set data.tokenizer=byte"
        );
    }

    #[test]
    fn an_existing_tokenizer_is_the_one_to_prepare_with() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(&tokenizer, "{}").unwrap();
        let tokenizer = tokenizer.to_str().unwrap();
        let err = settings("x.toml", "embedded", "rel/valid-tokens", tokenizer)
            .check_paths()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "x.toml: data.valid = \"rel/valid-tokens\": no such file or directory; relative \
                 paths resolve against the current directory, "
            ),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "glatrain prepare --input YOUR_CORPUS --tokenizer {tokenizer} --out \
                 rel/valid-tokens\n"
            )),
            "{err}"
        );
        assert!(err.ends_with("\n  --set data.valid=embedded"), "{err}");
    }
}
