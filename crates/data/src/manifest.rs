//! `manifest.json`: what a prepared dataset directory holds (tokenizer, vocab, shards with their
//! token counts and sha256, each shard's document starts, source bytes per split for bits per
//! byte).
//!
//! Format version 2 lists a document-starts file per shard (see [`crate::document_starts`]);
//! version 1, written before those existed, lists none and is still read.

use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::shard::TokenDtype;

/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "glatrain-token-shards";
/// Manifest format version this build writes; it reads this one and every one before.
pub const MANIFEST_VERSION: u32 = 2;
/// The first format version whose shards have document starts.
const FIRST_WITH_DOCUMENT_STARTS: u32 = 2;

/// A prepared dataset. Paths inside are relative to the manifest's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`] when written by this build.
    pub format_version: u32,
    /// Where the text came from: `embedded:brown` or the input paths.
    pub source: String,
    /// The tokenizer the shards were made with.
    pub tokenizer: TokenizerRecord,
    /// Every token id is below this.
    pub vocab_size: u32,
    /// How the shards store tokens.
    pub dtype: TokenDtype,
    /// The training split.
    pub train: SplitRecord,
    /// The validation split, when there is one.
    pub valid: Option<SplitRecord>,
}

/// How the tokens were produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// The spec given to `prepare`: `byte`, `bpe:<vocab>` or the tokenizer.json path.
    pub spec: String,
    /// The tokenizer.json copied into the dataset directory; `None` for `byte`.
    pub file: Option<String>,
}

/// One split: its shards and the size of the text they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRecord {
    /// Documents in this split (from version 2 on, the sum of its shards' document starts).
    pub documents: u64,
    /// UTF-8 bytes of the text that was tokenized (documents plus their separators).
    pub source_bytes: u64,
    /// Total tokens over the shards.
    pub tokens: u64,
    /// Shards in order.
    pub shards: Vec<ShardRecord>,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Path relative to the manifest's directory, e.g. `train/train-000000.tokens`.
    pub file: String,
    /// Tokens in the file (must equal its header's count).
    pub tokens: u64,
    /// Hex sha256 of the whole file.
    pub sha256: String,
    /// Where documents begin in the shard (from format version 2 on; `None` before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_starts: Option<DocumentStartsRecord>,
}

/// One shard's document-starts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentStartsRecord {
    /// Path relative to the manifest's directory, e.g. `train/train-000000.docs`.
    pub file: String,
    /// Documents that begin in the shard (must equal its header's count).
    pub starts: u64,
    /// Hex sha256 of the whole file.
    pub sha256: String,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let bad = |what: String| DataError::Manifest {
            path: path.clone(),
            what,
        };
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid manifest: {e}")))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format = {:?}, expected {MANIFEST_FORMAT:?}",
                manifest.format
            )));
        }
        if !(1..=MANIFEST_VERSION).contains(&manifest.format_version) {
            return Err(DataError::UnsupportedVersion {
                path,
                found: manifest.format_version,
                supported: MANIFEST_VERSION,
            });
        }
        if manifest.vocab_size == 0 {
            return Err(bad("vocab_size = 0".into()));
        }
        if manifest.dtype != TokenDtype::for_vocab(manifest.vocab_size) {
            return Err(bad(format!(
                "dtype = {:?} does not match vocab_size = {}",
                manifest.dtype, manifest.vocab_size
            )));
        }
        for (name, split) in manifest.splits() {
            let sum: u64 = split.shards.iter().map(|s| s.tokens).sum();
            if sum != split.tokens {
                return Err(bad(format!(
                    "{name}.tokens = {} but its shards hold {sum}",
                    split.tokens
                )));
            }
            let inside = |what: &str, file: &str| {
                let relative = Path::new(file)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
                if relative && !file.is_empty() {
                    return Ok(());
                }
                Err(bad(format!(
                    "{name} {what} file {file:?} must be a path inside the dataset directory"
                )))
            };
            for shard in &split.shards {
                inside("shard", &shard.file)?;
                match (&shard.document_starts, manifest.has_document_starts()) {
                    (Some(starts), true) => inside("document starts", &starts.file)?,
                    (None, false) => {}
                    (None, true) => {
                        return Err(bad(format!(
                            "{name} shard {:?} has no document_starts (every shard of format \
                             version {} has them)",
                            shard.file, manifest.format_version
                        )))
                    }
                    (Some(_), false) => {
                        return Err(bad(format!(
                            "{name} shard {:?} has document_starts, which format version {} \
                             does not have",
                            shard.file, manifest.format_version
                        )))
                    }
                }
            }
            let starts: u64 = split
                .shards
                .iter()
                .filter_map(|s| s.document_starts.as_ref())
                .map(|d| d.starts)
                .sum();
            if manifest.has_document_starts() && starts != split.documents {
                return Err(bad(format!(
                    "{name}.documents = {} but its shards' document starts count {starts}",
                    split.documents
                )));
            }
        }
        Ok(manifest)
    }

    /// Whether the shards list where their documents begin (format version 2 on).
    pub fn has_document_starts(&self) -> bool {
        self.format_version >= FIRST_WITH_DOCUMENT_STARTS
    }

    /// Writes `dir/manifest.json` (pretty-printed), atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        glatrain_fs::write_atomic(&path, (text + "\n").as_bytes())
            .map_err(|e| DataError::io(&path, e))
    }

    /// `("train", train)` and, when present, `("valid", valid)`.
    pub fn splits(&self) -> impl Iterator<Item = (&'static str, &SplitRecord)> {
        std::iter::once(("train", &self.train)).chain(self.valid.as_ref().map(|v| ("valid", v)))
    }

    /// The tokenizer.json inside `dir`, if the dataset has one.
    pub fn tokenizer_path(&self, dir: &Path) -> Option<PathBuf> {
        self.tokenizer.file.as_ref().map(|f| dir.join(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            source: "embedded:brown".into(),
            tokenizer: TokenizerRecord {
                spec: "byte".into(),
                file: None,
            },
            vocab_size: 256,
            dtype: TokenDtype::U16,
            train: SplitRecord {
                documents: 2,
                source_bytes: 10,
                tokens: 10,
                shards: vec![ShardRecord {
                    file: "train/train-000000.tokens".into(),
                    tokens: 10,
                    sha256: "00".into(),
                    document_starts: Some(DocumentStartsRecord {
                        file: "train/train-000000.docs".into(),
                        starts: 2,
                        sha256: "11".into(),
                    }),
                }],
            },
            valid: None,
        }
    }

    /// [`sample`] as format version 1 wrote it: no document starts.
    fn version_1() -> Manifest {
        let mut m = sample();
        m.format_version = 1;
        m.train.shards[0].document_starts = None;
        m
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        sample().save(dir.path()).unwrap();
        let loaded = Manifest::load(dir.path()).unwrap();
        assert_eq!(loaded, sample());
        assert!(loaded.has_document_starts());
    }

    #[test]
    fn version_1_manifests_load_without_document_starts() {
        let dir = tempfile::tempdir().unwrap();
        version_1().save(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(!text.contains("document_starts"), "{text}");
        let loaded = Manifest::load(dir.path()).unwrap();
        assert_eq!(loaded, version_1());
        assert!(!loaded.has_document_starts());
    }

    #[test]
    fn bad_manifests_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");

        let cases: Vec<(Manifest, &str)> = vec![
            (
                Manifest {
                    format_version: 9,
                    ..sample()
                },
                "format version 9",
            ),
            (
                Manifest {
                    format: "x".into(),
                    ..sample()
                },
                "format = \"x\"",
            ),
            (
                Manifest {
                    dtype: TokenDtype::U32,
                    ..sample()
                },
                "dtype = U32",
            ),
            (
                {
                    let mut m = sample();
                    m.train.tokens = 11;
                    m
                },
                "train.tokens = 11 but its shards hold 10",
            ),
            (
                {
                    let mut m = sample();
                    m.train.shards[0].file = "../elsewhere.tokens".into();
                    m
                },
                "must be a path inside",
            ),
            (
                {
                    let mut m = sample();
                    m.train.shards[0].document_starts.as_mut().unwrap().file = "/x.docs".into();
                    m
                },
                "train document starts file \"/x.docs\" must be a path inside",
            ),
            (
                {
                    let mut m = sample();
                    m.train.shards[0].document_starts = None;
                    m
                },
                "has no document_starts (every shard of format version 2 has them)",
            ),
            (
                Manifest {
                    format_version: 1,
                    ..sample()
                },
                "has document_starts, which format version 1 does not have",
            ),
            (
                {
                    let mut m = sample();
                    m.train.documents = 3;
                    m
                },
                "train.documents = 3 but its shards' document starts count 2",
            ),
        ];
        for (manifest, needle) in cases {
            manifest.save(dir.path()).unwrap();
            let err = Manifest::load(dir.path()).unwrap_err();
            assert!(err.is_bad_input());
            let msg = err.to_string();
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
        fs::write(&path, "{ not json").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("invalid manifest"), "{err}");
    }
}
