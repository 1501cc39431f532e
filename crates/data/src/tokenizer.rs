//! Tokenizers: raw bytes (vocab 256, needs nothing) or any Hugging Face `tokenizer.json`, plus
//! training a byte-level BPE tokenizer with the `tokenizers` crate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rayon::prelude::*;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::byte_level_bpe::ByteLevelBpe;
use crate::error::{DataError, Result};

/// Smallest vocab `train_bpe` accepts: the 256 byte symbols plus at least one merge.
pub const MIN_BPE_VOCAB: u32 = 257;

/// What the user asked for on the command line: `byte`, `bpe:<vocab>` or a path to a
/// `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// One token per byte; vocab 256.
    Byte,
    /// Train a byte-level BPE tokenizer of this vocab size on the training documents.
    Bpe { vocab_size: u32 },
    /// Load a Hugging Face tokenizer.json.
    File(PathBuf),
}

impl FromStr for TokenizerSpec {
    type Err = DataError;

    /// `byte`, `bpe:<vocab>` (vocab >= 257) or anything else as a file path (checked on load).
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |what: String| DataError::TokenizerSpec {
            spec: spec.to_string(),
            what,
        };
        if spec == "byte" {
            return Ok(TokenizerSpec::Byte);
        }
        if let Some(vocab) = spec.strip_prefix("bpe:") {
            let vocab_size: u32 = vocab
                .parse()
                .map_err(|_| bad(format!("vocab size {vocab:?} is not a positive integer")))?;
            if vocab_size < MIN_BPE_VOCAB {
                return Err(bad(format!(
                    "vocab size {vocab_size} is below {MIN_BPE_VOCAB} (256 byte symbols + 1 merge)"
                )));
            }
            return Ok(TokenizerSpec::Bpe { vocab_size });
        }
        if spec.is_empty() {
            return Err(bad(
                "expected \"byte\", \"bpe:<vocab>\" or a tokenizer.json path".into(),
            ));
        }
        Ok(TokenizerSpec::File(PathBuf::from(spec)))
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerSpec::Byte => write!(f, "byte"),
            TokenizerSpec::Bpe { vocab_size } => write!(f, "bpe:{vocab_size}"),
            TokenizerSpec::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A loaded tokenizer. Token ids are `u32` and always `< vocab_size()`.
#[derive(Clone)]
pub enum Tokenizer {
    /// Token id = byte value; decoding is exact (invalid UTF-8 is replaced by U+FFFD).
    Byte,
    /// A Hugging Face tokenizer loaded from (or saved to) `path`. `fast` encodes the same ids
    /// faster when the pipeline is GPT-2's byte-level BPE (see the `byte_level_bpe` module).
    HuggingFace {
        inner: Box<tokenizers::Tokenizer>,
        path: PathBuf,
        fast: Option<Arc<ByteLevelBpe>>,
    },
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`; errors name the file. Truncation and padding
    /// settings in the file are dropped: documents are encoded whole.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let bad = |what: String| DataError::TokenizerFile {
            path: path.to_path_buf(),
            what,
        };
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        if inner.get_vocab_size(true) == 0 {
            return Err(bad("the vocabulary is empty".into()));
        }
        inner
            .with_truncation(None)
            .map_err(|e| bad(e.to_string()))?
            .with_padding(None);
        let fast = ByteLevelBpe::for_tokenizer(&inner).map(Arc::new);
        Ok(Tokenizer::HuggingFace {
            inner: Box::new(inner),
            path: path.to_path_buf(),
            fast,
        })
    }

    /// Loads `byte` or a file. `bpe:<vocab>` needs training text: use [`train_bpe`].
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Self> {
        match spec {
            TokenizerSpec::Byte => Ok(Tokenizer::Byte),
            TokenizerSpec::File(path) => Tokenizer::from_file(path),
            TokenizerSpec::Bpe { .. } => Err(DataError::TokenizerSpec {
                spec: spec.to_string(),
                what: "a BPE tokenizer must be trained first (glatrain prepare does this)".into(),
            }),
        }
    }

    /// Number of token ids, including added special tokens.
    pub fn vocab_size(&self) -> u32 {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::HuggingFace { inner, .. } => inner.get_vocab_size(true) as u32,
        }
    }

    /// Short human description: `byte` or `tokenizer.json <path> (vocab N)`.
    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Byte => "byte".into(),
            Tokenizer::HuggingFace { path, .. } => {
                format!(
                    "tokenizer.json {} (vocab {})",
                    path.display(),
                    self.vocab_size()
                )
            }
        }
    }

    /// Encodes text without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_into(text, &mut ids)?;
        Ok(ids)
    }

    /// Appends the ids of `text` (no special tokens added) to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        match self {
            Tokenizer::Byte => {
                out.extend(text.bytes().map(u32::from));
                Ok(())
            }
            Tokenizer::HuggingFace {
                fast: Some(fast),
                path,
                ..
            } if !fast.needs_general_pipeline(text) => fast
                .encode(text, out)
                .map_err(|e| tokenizer_error(path, "encode", e)),
            Tokenizer::HuggingFace { inner, path, .. } => {
                let encoding = inner
                    .encode_fast(text, false)
                    .map_err(|e| tokenizer_error(path, "encode", e))?;
                out.extend_from_slice(encoding.get_ids());
                Ok(())
            }
        }
    }

    /// Encodes several texts in parallel (on rayon's pool), keeping their order.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Decodes ids back to text (ids >= vocab_size are an error).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id >= vocab) {
            return Err(DataError::Tokenizer {
                context: self.describe(),
                what: format!("cannot decode token {id} at position {pos}: vocab size is {vocab}"),
            });
        }
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace { inner, path, .. } => inner
                .decode(ids, false)
                .map_err(|e| tokenizer_error(path, "decode", e)),
        }
    }

    /// Writes the tokenizer.json to `path` (nothing to write for `byte`, which returns false).
    pub fn save(&self, path: &Path) -> Result<bool> {
        match self {
            Tokenizer::Byte => Ok(false),
            Tokenizer::HuggingFace { inner, .. } => {
                inner.save(path, false).map_err(|e| DataError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Ok(true)
            }
        }
    }
}

fn tokenizer_error(path: &Path, what: &str, e: tokenizers::Error) -> DataError {
    DataError::Tokenizer {
        context: path.display().to_string(),
        what: format!("{what}: {e}"),
    }
}

/// Trains a byte-level BPE tokenizer (GPT-2 style pre-tokenization, no prefix space, so decoding
/// an encoding gives the input back) of `vocab_size` ids on `texts`, saves it as tokenizer.json at
/// `out_path` and returns it loaded from there. Pairs seen fewer than 2 times are not merged, so a
/// small text may give a smaller vocab than asked.
pub fn train_bpe<I, S>(texts: I, vocab_size: u32, out_path: &Path) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if vocab_size < MIN_BPE_VOCAB {
        return Err(DataError::TokenizerSpec {
            spec: format!("bpe:{vocab_size}"),
            what: format!("vocab size is below {MIN_BPE_VOCAB} (256 byte symbols + 1 merge)"),
        });
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size as usize)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| tokenizer_error(out_path, "BPE training", e))?;
    tokenizer.save(out_path, false).map_err(|e| DataError::Io {
        path: out_path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Tokenizer::from_file(out_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(
            "byte".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Byte
        );
        assert_eq!(
            "bpe:4096".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Bpe { vocab_size: 4096 }
        );
        assert_eq!(
            "t/tokenizer.json".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::File("t/tokenizer.json".into())
        );
        let err = "bpe:100".parse::<TokenizerSpec>().unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("bpe:100"), "{err}");
        assert!("bpe:x".parse::<TokenizerSpec>().is_err());
    }

    #[test]
    fn byte_round_trip_is_exact() {
        let tok = Tokenizer::Byte;
        let text = "Grüße, \"quotes\" -- and\nnewlines\t€";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| id < 256));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.vocab_size(), 256);
        assert!(tok.decode(&[65, 256]).is_err());
    }

    /// A BPE tokenizer of 320 tokens trained on five embedded documents, and the tokenizer.json
    /// it was saved to (in the returned temporary directory).
    fn small_bpe() -> (tempfile::TempDir, PathBuf, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let text = crate::embedded::valid_text().unwrap();
        let docs = crate::documents::split_documents(&text);
        let tok = train_bpe(docs.iter().take(5), 320, &path).unwrap();
        (dir, path, tok)
    }

    #[test]
    fn bpe_training_gives_a_working_tokenizer() {
        let (_dir, path, tok) = small_bpe();
        assert!(path.exists());
        assert_eq!(tok.vocab_size(), 320);
        let sample = "The jury said, \"It is well operated.\"\nNew paragraph: 3-to-3 ü";
        let ids = tok.encode(sample).unwrap();
        assert!(
            ids.len() < sample.len(),
            "{} ids for {} bytes",
            ids.len(),
            sample.len()
        );
        assert_eq!(tok.decode(&ids).unwrap(), sample);
        let batch = tok
            .encode_batch(&[sample.to_string(), "the".into()])
            .unwrap();
        assert_eq!(batch[0], ids);
        let reloaded = Tokenizer::from_file(&path).unwrap();
        assert_eq!(reloaded.encode(sample).unwrap(), ids);
    }

    #[test]
    fn truncation_in_the_file_is_ignored() {
        let (_dir, path, tok) = small_bpe();
        let Tokenizer::HuggingFace { mut inner, .. } = tok else {
            panic!("train_bpe returns a Hugging Face tokenizer");
        };
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: 4,
                ..Default::default()
            }))
            .unwrap();
        inner.save(&path, false).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        let text = crate::embedded::valid_text().unwrap();
        let first = &crate::documents::split_documents(&text)[0];
        assert!(tok.encode(first).unwrap().len() > 100);
    }

    #[test]
    fn bad_tokenizer_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = Tokenizer::from_file(&missing).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("missing.json"), "{err}");

        let invalid = dir.path().join("tokenizer.json");
        std::fs::write(&invalid, "{\"not\": \"a tokenizer\"}").unwrap();
        let err = Tokenizer::from_file(&invalid).unwrap_err();
        assert!(matches!(err, DataError::TokenizerFile { .. }), "{err}");
        assert!(err.is_bad_input());
        assert!(err
            .to_string()
            .starts_with(&format!("{}: cannot load tokenizer", invalid.display())));
    }
}
