//! `prepare`: corpus files (or the embedded corpus) -> tokenizer -> token shards + manifest.json.
//!
//! Output layout of `out_dir`:
//!
//! ```text
//! manifest.json                 format version, tokenizer, vocab, per split: shards + sha256, bytes
//! tokenizer.json                copy of the tokenizer used (absent for "byte")
//! train/train-000000.tokens     glatrain shards (see the `shard` module), shard_tokens each
//! train/train-000000.docs       where documents begin in that shard (the `document_starts` module)
//! valid/valid-000000.tokens     the validation split, when it has documents (and its .docs)
//! ```
//!
//! Shards are cut every `shard_tokens` tokens, not at documents: a document may run on from one
//! shard into the next.
//!
//! Everything is written into a hidden sibling directory that is renamed to `out_dir` at the end
//! (`glatrain_fs::publish_dir`); on any error or interruption it is removed, so `out_dir` is
//! either complete or absent.
//!
//! The input is streamed: a reader thread decompresses and cuts records, the workers (a rayon
//! pool) parse and tokenize a batch of records at a time, and the tokens are written in input
//! order, so the shards are the same for any number of threads. See [`pipeline`].

mod pipeline;
mod stats;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::documents::{split_documents, ValidSelector};
use crate::embedded;
use crate::error::{DataError, Result};
use crate::inputs::{input_files, InputFile, InputFormat, Location, Raw, RawRecord};
use crate::manifest::{Manifest, TokenizerRecord, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::progress::ProgressDisplay;
use crate::shard::TokenDtype;
use crate::tokenizer::{Tokenizer, TokenizerSpec};

use pipeline::{Split, Tokenizing};
pub use stats::PrepareStats;

/// Default tokens per shard file (200 MB at u16, like nanoGPT's FineWeb shards).
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Default share of documents held out for validation by [`prepare`].
pub const DEFAULT_VALID_FRACTION: f64 = 0.01;
/// `bpe:<vocab>` trains on at most this many bytes of training documents (the first ones).
pub const BPE_TRAIN_MAX_BYTES: u64 = 1 << 30;
/// Name of the tokenizer copy inside a dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// What to do with a record that is not a document (invalid JSON, no text field, not UTF-8, an
/// unreadable stretch of a compressed file or parquet row group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBadRecord {
    /// Stop with an error naming the file, the line (or row) and the problem; nothing is
    /// written.
    Stop,
    /// Skip it, count it, list the first ones; the summary gives the counts by kind.
    Skip,
}

/// Everything [`prepare`] can be told besides its inputs and output.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// `"byte"` (vocab 256), `"bpe:<vocab>"` (train a byte-level BPE tokenizer on the training
    /// documents, at most [`BPE_TRAIN_MAX_BYTES`] of them) or the path of a Hugging Face
    /// tokenizer.json (copied into the dataset).
    pub tokenizer: String,
    /// Tokens per shard file (the last one of a split holds the rest), >= 1.
    pub shard_tokens: u64,
    /// Share of documents for validation, in `[0, 1)`: document `i` (over all files, in order)
    /// is validation when `round((i + 1) f) > round(i f)`, which spreads `round(n f)` of them
    /// evenly. With no validation document the manifest has no valid split.
    pub valid_fraction: f64,
    /// The JSON field (JSON Lines) or column (parquet) that holds a document's text.
    pub text_field: String,
    pub on_bad_record: OnBadRecord,
    /// Worker threads for parsing and tokenizing; 0 = one per core.
    pub threads: usize,
    pub progress: ProgressDisplay,
    /// Set from elsewhere (a Ctrl-C handler) to stop between batches; nothing is written.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            tokenizer: "byte".into(),
            shard_tokens: DEFAULT_SHARD_TOKENS,
            valid_fraction: DEFAULT_VALID_FRACTION,
            text_field: "text".into(),
            on_bad_record: OnBadRecord::Stop,
            threads: 0,
            progress: ProgressDisplay::Hidden,
            interrupt: None,
        }
    }
}

/// What [`prepare`] made: the manifest it wrote and how the run went.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub stats: PrepareStats,
}

/// Tokenizes corpus files into a dataset directory.
///
/// `inputs`: files and/or directories, in the formats of the `inputs` module (text, JSON
/// Lines, parquet; gzip or zstd compressed). Directories are walked recursively in sorted order;
/// files named directly are read whatever their extension (as text unless the name says
/// otherwise). Documents are text files' blank-line-separated blocks, JSON Lines' lines and
/// parquet's rows; each is tokenized followed by `"\n\n"`, and the manifest records the UTF-8
/// bytes of that text per split, for bits per byte. Empty documents are skipped.
///
/// `out_dir` must not exist yet; it is created complete or not at all.
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    options: &PrepareOptions,
) -> Result<PrepareReport> {
    if !(0.0..1.0).contains(&options.valid_fraction) {
        return Err(DataError::InvalidArgument {
            name: "valid_fraction",
            value: options.valid_fraction.to_string(),
            what: "must be in [0, 1)".into(),
        });
    }
    if inputs.is_empty() {
        return Err(DataError::InvalidArgument {
            name: "inputs",
            value: "[]".into(),
            what: "give at least one file or directory".into(),
        });
    }
    let files = input_files(inputs)?;
    let source = inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    run(Corpus::Files(files), source, out_dir, options)
}

/// [`prepare`] for the embedded Brown corpus, keeping its own train/validation split (475 / 25
/// documents); `options.valid_fraction` and `options.text_field` do not apply.
pub fn prepare_embedded(out_dir: &Path, options: &PrepareOptions) -> Result<PrepareReport> {
    run(
        Corpus::Embedded,
        format!("embedded:{}", embedded::NAME),
        out_dir,
        options,
    )
}

enum Corpus {
    Files(Vec<InputFile>),
    Embedded,
}

/// The hidden directory the dataset is built in; removed unless [`Staging::publish`] moved it
/// into place.
struct Staging {
    path: PathBuf,
    published: bool,
}

impl Staging {
    /// Checks that `out_dir` can be made and creates its staging directory next to it.
    fn create(out_dir: &Path) -> Result<Self> {
        if out_dir.exists() {
            return Err(DataError::OutputExists {
                path: out_dir.to_path_buf(),
            });
        }
        if out_dir.file_name().is_none() {
            return Err(DataError::InvalidArgument {
                name: "out_dir",
                value: out_dir.display().to_string(),
                what: "must end in a directory name".into(),
            });
        }
        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let path = glatrain_fs::temporary_name(out_dir);
        fs::create_dir(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(Staging {
            path,
            published: false,
        })
    }

    fn publish(mut self, out_dir: &Path) -> Result<()> {
        glatrain_fs::publish_dir(&self.path, out_dir).map_err(|e| DataError::io(out_dir, e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            // Best effort: the error being returned matters more than a failed cleanup.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn run(
    corpus: Corpus,
    source: String,
    out_dir: &Path,
    options: &PrepareOptions,
) -> Result<PrepareReport> {
    if options.shard_tokens == 0 {
        return Err(DataError::InvalidArgument {
            name: "shard_tokens",
            value: "0".into(),
            what: "must be at least 1".into(),
        });
    }
    let spec: TokenizerSpec = options.tokenizer.parse()?;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("prepare-{i}"))
        .build()
        .map_err(|e| DataError::Io {
            path: out_dir.to_path_buf(),
            source: std::io::Error::other(format!("cannot start worker threads: {e}")),
        })?;
    let staging = Staging::create(out_dir)?;

    let started = Instant::now();
    let tokenizer = build_tokenizer(&spec, &corpus, &staging.path, options, &pool, out_dir)?;
    let bpe_training = matches!(spec, TokenizerSpec::Bpe { .. }).then(|| started.elapsed());
    let vocab_size = tokenizer.vocab_size();

    let mut job = Tokenizing::new(&staging.path, &tokenizer, &pool, options, out_dir, threads)?;
    tokenize_corpus(&mut job, &corpus, options)?;
    let (train, valid, mut stats) = job.finish()?;
    stats.bpe_training = bpe_training;
    if train.tokens == 0 {
        return Err(DataError::Empty {
            path: PathBuf::from(&source),
            what: "no training text (every document went to validation or the inputs are blank)"
                .into(),
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        format_version: MANIFEST_VERSION,
        source,
        tokenizer: TokenizerRecord {
            spec: spec.to_string(),
            file: (!matches!(spec, TokenizerSpec::Byte)).then(|| TOKENIZER_FILE.to_string()),
        },
        vocab_size,
        dtype: TokenDtype::for_vocab(vocab_size),
        train,
        valid,
    };
    manifest.save(&staging.path)?;
    staging.publish(out_dir)?;
    Ok(PrepareReport { manifest, stats })
}

/// The tokenizer the spec names, written into the staging directory when it is a file: bytes,
/// a copy of a tokenizer file, or a byte-level BPE trained on the corpus.
fn build_tokenizer(
    spec: &TokenizerSpec,
    corpus: &Corpus,
    staging: &Path,
    options: &PrepareOptions,
    pool: &rayon::ThreadPool,
    out_dir: &Path,
) -> Result<Tokenizer> {
    let tokenizer_path = staging.join(TOKENIZER_FILE);
    match spec {
        TokenizerSpec::Byte => Ok(Tokenizer::Byte),
        TokenizerSpec::File(path) => {
            let tokenizer = Tokenizer::from_file(path)?;
            fs::copy(path, &tokenizer_path).map_err(|e| DataError::io(path, e))?;
            Ok(tokenizer)
        }
        TokenizerSpec::Bpe { vocab_size } => match corpus {
            Corpus::Files(files) => pipeline::train_bpe_on_files(
                files,
                *vocab_size,
                &tokenizer_path,
                options,
                pool,
                out_dir,
            ),
            Corpus::Embedded => {
                let text = embedded::train_text()?;
                let docs = split_documents(&text);
                pool.install(|| {
                    crate::tokenizer::train_bpe(docs.iter(), *vocab_size, &tokenizer_path)
                })
            }
        },
    }
}

/// Every document of the corpus through the tokenizing job: files split into train and
/// validation by `valid_fraction`, the embedded corpus by its own two texts.
fn tokenize_corpus(job: &mut Tokenizing, corpus: &Corpus, options: &PrepareOptions) -> Result<()> {
    match corpus {
        Corpus::Files(files) => {
            let mut selector = ValidSelector::new(options.valid_fraction);
            job.run_files(files, &mut || {
                if selector.next_is_valid() {
                    Split::Valid
                } else {
                    Split::Train
                }
            })
        }
        Corpus::Embedded => {
            for (split, text) in [
                (Split::Train, embedded::train_text()?),
                (Split::Valid, embedded::valid_text()?),
            ] {
                let name = PathBuf::from(format!("embedded:{}/{}", embedded::NAME, split.name()));
                let file = InputFile {
                    path: name,
                    format: InputFormat::Text,
                    compression: crate::inputs::Compression::None,
                    size: text.len() as u64,
                };
                let records = split_documents(&text)
                    .into_iter()
                    .map(|doc| RawRecord {
                        file: 0,
                        location: Location::File,
                        raw: Raw::Text(doc),
                    })
                    .collect();
                job.run_records(&[file], records, &mut || split)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
