//! The one error type of this crate. Messages name the file, the key or tensor, and both values.

use std::fmt;
use std::path::PathBuf;

/// A `config.json` value that differs from the run's `[model]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The `config.json` key.
    pub hf_key: &'static str,
    /// Its value there (as JSON).
    pub hf_value: String,
    /// The `[model]` key, without the `model.` prefix.
    pub key: &'static str,
    /// Its value in the run's config (as JSON).
    pub value: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}, but model.{} = {}",
            self.hf_key, self.hf_value, self.key, self.value
        )
    }
}

/// Why a model directory could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON file that does not parse, or a key of the wrong type.
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    /// A `config.json` of another class than the run's model type is exported as.
    #[error(
        "{path}: model_type = {found}, but model.type = \"{ours}\" needs model_type \"{expected}\""
    )]
    WrongClass {
        path: PathBuf,
        found: String,
        ours: &'static str,
        expected: &'static str,
    },
    /// A `config.json` setting that glatrain's model of that type has no counterpart for.
    #[error("{path}: {key} = {value}: {reason}")]
    Unsupported {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// Keys that fix the model's shapes or function differ between `config.json` and the run.
    #[error("{path} does not match the run's [model]: {}", list(.mismatches))]
    ConfigMismatch {
        path: PathBuf,
        mismatches: Vec<Mismatch>,
    },
    #[error("{path}: no tensor `{name}` (shape {shape:?}), which the model needs")]
    MissingTensor {
        path: PathBuf,
        name: String,
        shape: Vec<i64>,
    },
    #[error("{path}: tensor `{name}` (shape {shape:?}) is not a parameter of the model")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        shape: Vec<i64>,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, the model's is {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    /// A weights file that is missing or cannot be read as safetensors.
    #[error("{path}: {message}")]
    Tensors { path: PathBuf, message: String },
    #[error("{path} already exists (pass --force to replace it)")]
    OutputExists { path: PathBuf },
    /// `--force` only ever replaces a model directory, never some other directory or file.
    #[error("{path} exists and is not a model directory (no config.json): not replacing it")]
    NotAModelDir { path: PathBuf },
    /// A model whose Hugging Face class would compute another function.
    #[error("model.{key} = {value}: {reason}")]
    NotExportable {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn list(mismatches: &[Mismatch]) -> String {
    let items: Vec<String> = mismatches.iter().map(Mismatch::to_string).collect();
    items.join("; ")
}

impl HubError {
    /// True when the user's files, config or flags are at fault (the CLI exits 2); false when
    /// writing failed or libtorch did.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, HubError::Write { .. } | HubError::Torch(_))
    }

    pub(crate) fn json(path: impl Into<PathBuf>, message: impl fmt::Display) -> Self {
        HubError::Json {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_name_both_keys_and_values() {
        let e = HubError::ConfigMismatch {
            path: "hf/config.json".into(),
            mismatches: vec![
                Mismatch {
                    hf_key: "hidden_size",
                    hf_value: "64".into(),
                    key: "hidden_size",
                    value: "128".into(),
                },
                Mismatch {
                    hf_key: "tie_word_embeddings",
                    hf_value: "false".into(),
                    key: "tie_embeddings",
                    value: "true".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "hf/config.json does not match the run's [model]: hidden_size = 64, but \
             model.hidden_size = 128; tie_word_embeddings = false, but model.tie_embeddings = true"
        );
        assert!(e.is_bad_input());
        let write = HubError::Write {
            path: "out".into(),
            source: std::io::Error::other("disk full"),
        };
        assert!(!write.is_bad_input());
    }
}
