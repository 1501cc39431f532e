//! The one error type of the crate. Every message names where the problem is (the file, or the
//! `--set` override that caused it), the full key path, the value found and what was expected.

use std::io;
use std::path::PathBuf;

/// Why a config could not be loaded, validated or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No config file of that path, nor a shipped config of that name; `hint` names the
    /// shipped configs.
    #[error("{}: no such config file; {hint}", path.display())]
    NotFound { path: PathBuf, hint: String },

    /// The config file is unreadable.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    /// The text is not valid TOML. `line` and `column` are 1-based.
    #[error("{origin}:{line}:{column}: TOML syntax error: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// A key that the schema does not have (`valid` lists the keys of that table).
    #[error("{origin}: {key}: unknown key; valid keys of {table} are: {valid}")]
    UnknownKey {
        origin: String,
        key: String,
        table: String,
        valid: String,
    },

    /// A required key is absent (`[model]` and `model.type` are the only required ones).
    #[error("{origin}: missing {key}: {expected}")]
    MissingKey {
        origin: String,
        key: String,
        expected: String,
    },

    /// A value of the wrong TOML type or out of the type's range (`"abc"` for a float, `-1` for
    /// a count, an unknown enum variant).
    #[error("{origin}: {key} = {value}: {expected}")]
    WrongType {
        origin: String,
        key: String,
        value: String,
        expected: String,
    },

    /// Deserializing failed in a way the key and type checks did not foresee; serde's message.
    #[error("{origin}: {message}")]
    Deserialize { origin: String, message: String },

    /// A `--set` argument that is not `KEY.PATH=VALUE` or whose path is not a key of the schema.
    #[error("override `--set {raw}`: {reason}")]
    BadOverride { raw: String, reason: String },

    /// A well-typed value that breaks a rule of the schema (divisibility, ranges, consistency).
    #[error("{origin}: {key} = {value}: {reason}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        reason: String,
    },

    /// Writing the resolved config failed (an I/O problem of the run directory, not of the
    /// config).
    #[error("{}: cannot write the resolved config: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },

    /// The resolved config could not be turned into TOML (a bug: every schema type serializes).
    #[error("cannot serialize the resolved config: {0}")]
    Serialize(#[from] toml::ser::Error),
}

impl ConfigError {
    /// True when the user's config or flags are at fault (the CLI exits 2); false for failures
    /// of the machine or of this program (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ConfigError::Write { .. } | ConfigError::Serialize(_))
    }
}

/// Longest text of a value or an override quoted whole in a message.
const MAX_QUOTED_CHARS: usize = 80;

/// `text` as a message quotes it: whole up to [`MAX_QUOTED_CHARS`] characters, else its start
/// and its length, so that a huge value (a 50 MB `--set`) gives a one-line error.
pub(crate) fn shorten(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= MAX_QUOTED_CHARS {
        return text.to_owned();
    }
    let start: String = text.chars().take(MAX_QUOTED_CHARS / 2).collect();
    format!("{start}... ({chars} characters)")
}

/// Where a key's value came from: the file, or a `--set` override applied on top of it. Used to
/// put the right origin into error messages.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    name: String,
    /// (dotted key path, the raw `KEY=VALUE` argument), in the order given.
    overrides: Vec<(String, String)>,
}

impl Origin {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            overrides: Vec::new(),
        }
    }

    pub(crate) fn add_override(&mut self, path: String, raw: &str) {
        self.overrides.push((path, shorten(raw)));
    }

    /// The file name alone.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The origin of `key`: the file name, plus the last override that set `key` or a table
    /// containing it.
    pub(crate) fn of(&self, key: &str) -> String {
        let set_by = self.overrides.iter().rev().find(|(path, _)| {
            key == path
                || key
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        match set_by {
            Some((_, raw)) => format!("{} (--set {raw})", self.name),
            None => self.name.clone(),
        }
    }

    /// Shorthand for an [`ConfigError::Invalid`] on `key`.
    pub(crate) fn invalid(
        &self,
        key: &str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.of(key),
            key: key.to_owned(),
            value: shorten(&value.to_string()),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_write_and_serialize_errors_are_not_bad_input() {
        let write = ConfigError::Write {
            path: "runs/x/config.toml".into(),
            source: io::Error::other("disk full"),
        };
        assert!(!write.is_bad_input());
        assert!(write.to_string().contains("runs/x/config.toml"));
        let read = ConfigError::Read {
            path: "configs/none.toml".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(read.is_bad_input());
        assert!(Origin::new("a.toml")
            .invalid("train.lr", -1.0, "must be >= 0")
            .is_bad_input());
    }

    #[test]
    fn huge_values_are_quoted_by_their_start_and_length() {
        assert_eq!(shorten("short"), "short");
        let huge = "x".repeat(50 << 20);
        let mut origin = Origin::new("x.toml");
        origin.add_override("run.name".into(), &format!("run.name={huge}"));
        let msg = origin.invalid("run.name", &huge, "too long").to_string();
        assert!(msg.len() < 300, "{} bytes", msg.len());
        assert!(
            msg.contains(&format!("({} characters)", huge.len())),
            "{msg}"
        );
        assert!(msg.contains("(--set run.name=xxx"), "{msg}");
    }

    #[test]
    fn origin_names_the_override_that_set_a_key() {
        let mut origin = Origin::new("configs/x.toml");
        origin.add_override("train".into(), "train={lr=1}");
        origin.add_override("train.lr".into(), "train.lr=-1");
        assert_eq!(origin.of("train.lr"), "configs/x.toml (--set train.lr=-1)");
        assert_eq!(
            origin.of("train.beta1"),
            "configs/x.toml (--set train={lr=1})"
        );
        // A key that merely shares a prefix with an overridden one is not covered by it.
        assert_eq!(origin.of("trainer"), "configs/x.toml");
        assert_eq!(origin.of("model.hidden_size"), "configs/x.toml");
    }
}
