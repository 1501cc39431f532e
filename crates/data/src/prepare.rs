//! `prepare`: text files (or the embedded corpus) -> tokenizer -> token shards + manifest.json.
//!
//! Output layout of `out_dir`:
//!
//! ```text
//! manifest.json                 format version, tokenizer, vocab, per split: shards + sha256, bytes
//! tokenizer.json                copy of the tokenizer used (absent for "byte")
//! train/train-000000.tokens     glatrain shards (see the `shard` module), shard_tokens each
//! valid/valid-000000.tokens     the validation split, when it has documents
//! ```
//!
//! Everything is written into a hidden sibling directory that is renamed to `out_dir` at the end;
//! on any error it is removed, so `out_dir` is either complete or absent.

use std::fs;
use std::path::{Path, PathBuf};

use crate::documents::{for_each_document, input_files, split_documents, ValidSelector};
use crate::embedded;
use crate::error::{DataError, Result};
use crate::manifest::{
    Manifest, ShardRecord, SplitRecord, TokenizerRecord, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use crate::shard::{ShardBuffer, TokenDtype, SHARD_EXTENSION};
use crate::source::DOCUMENT_SEPARATOR;
use crate::tokenizer::{train_bpe, Tokenizer, TokenizerSpec};

/// Default tokens per shard file (200 MB at u16, like nanoGPT's FineWeb shards).
pub const DEFAULT_SHARD_TOKENS: u64 = 100_000_000;
/// Default share of documents held out for validation by [`prepare`].
pub const DEFAULT_VALID_FRACTION: f64 = 0.01;
/// `bpe:<vocab>` trains on at most this many bytes of training documents (the first ones).
pub const BPE_TRAIN_MAX_BYTES: u64 = 1 << 30;
/// Text is tokenized in batches of about this many bytes (parallel inside the tokenizers crate).
const ENCODE_BATCH_BYTES: usize = 8 << 20;
/// Name of the tokenizer copy inside a dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tokenizes text files into a dataset directory and returns its manifest.
///
/// * `inputs`: files and/or directories. Directories are walked recursively for `*.txt` and
///   `*.gz` (gzip text) files in sorted order, skipping hidden entries; files named directly are
///   read whatever their extension. Text must be UTF-8.
/// * `tokenizer`: `"byte"` (vocab 256), `"bpe:<vocab>"` (train a byte-level BPE tokenizer on the
///   training documents, at most [`BPE_TRAIN_MAX_BYTES`] of them) or the path of a Hugging Face
///   tokenizer.json (copied into the dataset).
/// * `out_dir`: must not exist yet; created complete or not at all.
/// * `shard_tokens`: tokens per shard file (the last one of a split holds the rest), >= 1.
/// * `valid_fraction`: share of documents for validation, in `[0, 1)`. Documents are the
///   blank-line-separated blocks of the input files; document `i` (over all files, in order) is
///   validation when `round((i + 1) f) > round(i f)`, which spreads `round(n f)` of them evenly.
///   With no validation document the manifest has no valid split.
///
/// Each document is tokenized followed by `"\n\n"`; the manifest records the UTF-8 bytes of that
/// text per split, for bits per byte.
pub fn prepare(
    inputs: &[PathBuf],
    tokenizer: &str,
    out_dir: &Path,
    shard_tokens: u64,
    valid_fraction: f64,
) -> Result<Manifest> {
    if !(0.0..1.0).contains(&valid_fraction) {
        return Err(DataError::InvalidArgument {
            name: "valid_fraction",
            value: valid_fraction.to_string(),
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
    let corpus = Corpus::Files {
        files,
        valid_fraction,
    };
    run(&corpus, source, tokenizer, out_dir, shard_tokens)
}

/// [`prepare`] for the embedded Brown corpus, keeping its own train/validation split (475 / 25
/// documents).
pub fn prepare_embedded(tokenizer: &str, out_dir: &Path, shard_tokens: u64) -> Result<Manifest> {
    run(
        &Corpus::Embedded,
        format!("embedded:{}", embedded::NAME),
        tokenizer,
        out_dir,
        shard_tokens,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Valid,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

enum Corpus {
    Files {
        files: Vec<PathBuf>,
        valid_fraction: f64,
    },
    Embedded,
}

impl Corpus {
    /// Calls `f` on every document with its split, in a fixed order (the same on every call).
    fn for_each(&self, f: &mut dyn FnMut(Split, String) -> Result<()>) -> Result<()> {
        match self {
            Corpus::Files {
                files,
                valid_fraction,
            } => {
                let mut selector = ValidSelector::new(*valid_fraction);
                for file in files {
                    for_each_document(file, &mut |doc| {
                        let split = if selector.next_is_valid() {
                            Split::Valid
                        } else {
                            Split::Train
                        };
                        f(split, doc)
                    })?;
                }
                Ok(())
            }
            Corpus::Embedded => {
                for (split, text) in [
                    (Split::Train, embedded::train_text()?),
                    (Split::Valid, embedded::valid_text()?),
                ] {
                    for doc in split_documents(&text) {
                        f(split, doc)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Removes the temporary output directory unless the run completed.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the error being returned matters more than a failed cleanup.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn run(
    corpus: &Corpus,
    source: String,
    tokenizer_spec: &str,
    out_dir: &Path,
    shard_tokens: u64,
) -> Result<Manifest> {
    if shard_tokens == 0 {
        return Err(DataError::InvalidArgument {
            name: "shard_tokens",
            value: "0".into(),
            what: "must be at least 1".into(),
        });
    }
    let spec: TokenizerSpec = tokenizer_spec.parse()?;
    if out_dir.exists() {
        return Err(DataError::OutputExists {
            path: out_dir.to_path_buf(),
        });
    }
    let name = out_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| DataError::InvalidArgument {
            name: "out_dir",
            value: out_dir.display().to_string(),
            what: "must end in a directory name".into(),
        })?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let mut tmp = TempDir {
        path: parent.join(format!(".{name}.partial-{}", std::process::id())),
        keep: false,
    };
    if tmp.path.exists() {
        fs::remove_dir_all(&tmp.path).map_err(|e| DataError::io(&tmp.path, e))?;
    }
    fs::create_dir(&tmp.path).map_err(|e| DataError::io(&tmp.path, e))?;

    let tokenizer_path = tmp.path.join(TOKENIZER_FILE);
    let tokenizer = match &spec {
        TokenizerSpec::Byte => Tokenizer::Byte,
        TokenizerSpec::File(path) => {
            let tokenizer = Tokenizer::from_file(path)?;
            fs::copy(path, &tokenizer_path).map_err(|e| DataError::io(path, e))?;
            tokenizer
        }
        TokenizerSpec::Bpe { vocab_size } => {
            let docs = training_sample(corpus)?;
            train_bpe(docs.iter(), *vocab_size, &tokenizer_path)?
        }
    };
    let vocab_size = tokenizer.vocab_size();

    let mut train = SplitWriter::new(&tmp.path, Split::Train, vocab_size, shard_tokens)?;
    let mut valid = SplitWriter::new(&tmp.path, Split::Valid, vocab_size, shard_tokens)?;
    corpus.for_each(&mut |split, doc| match split {
        Split::Train => train.add(doc, &tokenizer),
        Split::Valid => valid.add(doc, &tokenizer),
    })?;
    let train = train.finish(&tokenizer)?;
    let valid = valid.finish(&tokenizer)?;
    if train.tokens == 0 {
        return Err(DataError::Empty {
            path: PathBuf::from(&source),
            what: "no training text (every document went to validation or the inputs are blank)"
                .into(),
        });
    }
    let valid = if valid.documents == 0 {
        let dir = tmp.path.join(Split::Valid.name());
        fs::remove_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        None
    } else {
        Some(valid)
    };

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
    manifest.save(&tmp.path)?;
    fs::rename(&tmp.path, out_dir).map_err(|e| DataError::io(out_dir, e))?;
    tmp.keep = true;
    Ok(manifest)
}

/// The first training documents, up to [`BPE_TRAIN_MAX_BYTES`], for BPE training.
fn training_sample(corpus: &Corpus) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    let mut bytes = 0u64;
    corpus.for_each(&mut |split, doc| {
        if split == Split::Train && bytes < BPE_TRAIN_MAX_BYTES {
            bytes += doc.len() as u64;
            docs.push(doc);
        }
        Ok(())
    })?;
    Ok(docs)
}

/// Tokenizes one split's documents in batches and cuts the tokens into shard files.
struct SplitWriter {
    dir: PathBuf,
    split: Split,
    vocab_size: u32,
    shard_tokens: u64,
    pending: Vec<String>,
    pending_bytes: usize,
    buffer: ShardBuffer,
    record: SplitRecord,
}

impl SplitWriter {
    fn new(root: &Path, split: Split, vocab_size: u32, shard_tokens: u64) -> Result<Self> {
        let dir = root.join(split.name());
        fs::create_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        Ok(SplitWriter {
            dir,
            split,
            vocab_size,
            shard_tokens,
            pending: Vec::new(),
            pending_bytes: 0,
            buffer: ShardBuffer::new(vocab_size),
            record: SplitRecord {
                documents: 0,
                source_bytes: 0,
                tokens: 0,
                shards: Vec::new(),
            },
        })
    }

    fn add(&mut self, mut doc: String, tokenizer: &Tokenizer) -> Result<()> {
        doc.push_str(DOCUMENT_SEPARATOR);
        self.record.documents += 1;
        self.record.source_bytes += doc.len() as u64;
        self.pending_bytes += doc.len();
        self.pending.push(doc);
        if self.pending_bytes >= ENCODE_BATCH_BYTES {
            self.encode_pending(tokenizer)?;
        }
        Ok(())
    }

    fn shard_file(&self) -> String {
        let name = self.split.name();
        format!(
            "{name}/{name}-{:06}.{SHARD_EXTENSION}",
            self.record.shards.len()
        )
    }

    fn encode_pending(&mut self, tokenizer: &Tokenizer) -> Result<()> {
        let docs = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        for tokens in tokenizer.encode_batch(&docs)? {
            let mut rest = tokens.as_slice();
            while !rest.is_empty() {
                let room = (self.shard_tokens - self.buffer.len()) as usize;
                let (now, later) = rest.split_at(room.min(rest.len()));
                let file = self.shard_file();
                self.buffer.push(Path::new(&file), now)?;
                rest = later;
                if self.buffer.len() == self.shard_tokens {
                    self.write_shard()?;
                }
            }
        }
        Ok(())
    }

    fn write_shard(&mut self) -> Result<()> {
        let file = self.shard_file();
        let buffer = std::mem::replace(&mut self.buffer, ShardBuffer::new(self.vocab_size));
        let path = self
            .dir
            .parent()
            .expect("split dir has a parent")
            .join(&file);
        let written = buffer.write(&path)?;
        self.record.tokens += written.tokens;
        self.record.shards.push(ShardRecord {
            file,
            tokens: written.tokens,
            sha256: written.sha256,
        });
        Ok(())
    }

    fn finish(mut self, tokenizer: &Tokenizer) -> Result<SplitRecord> {
        self.encode_pending(tokenizer)?;
        if self.buffer.len() > 0 {
            self.write_shard()?;
        }
        Ok(self.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Dataset, OpenOptions};

    /// Three small files: 12 documents in all.
    fn write_inputs(dir: &Path) -> PathBuf {
        let input = dir.join("input");
        fs::create_dir_all(input.join("more")).unwrap();
        for f in 0..3 {
            let docs: Vec<String> = (0..4)
                .map(|d| format!("Document {d} of file {f}.\nIt has two lines, the second longer."))
                .collect();
            let path = if f == 2 {
                input.join("more/c.txt")
            } else {
                input.join(format!("{f}.txt"))
            };
            fs::write(path, docs.join("\n\n")).unwrap();
        }
        input
    }

    fn read_all(source: &crate::source::TokenSource) -> Vec<u32> {
        let mut out = vec![0i64; source.len() as usize];
        source.read(0, &mut out);
        out.into_iter().map(|t| t as u32).collect()
    }

    #[test]
    fn byte_prepare_round_trips_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_inputs(dir.path());
        let out = dir.path().join("ds");
        let manifest = prepare(&[input], "byte", &out, 100, 0.25).unwrap();
        assert_eq!(manifest.vocab_size, 256);
        assert_eq!(manifest.train.documents, 9);
        let valid = manifest.valid.as_ref().unwrap();
        assert_eq!(valid.documents, 3);
        assert!(manifest.train.shards.len() > 3, "100-token shards");
        assert!(manifest.train.shards[..manifest.train.shards.len() - 1]
            .iter()
            .all(|s| s.tokens == 100));
        assert_eq!(manifest.train.tokens, manifest.train.source_bytes);
        assert!(!out.join(TOKENIZER_FILE).exists());

        let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
        let bytes: Vec<u8> = read_all(&ds.train).iter().map(|&t| t as u8).collect();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("Document 0 of file 0.\nIt has two lines"));
        assert_eq!(text.matches("Document").count(), 9);
        let valid_text: Vec<u8> = read_all(ds.valid.as_ref().unwrap())
            .iter()
            .map(|&t| t as u8)
            .collect();
        // Documents 1, 5 and 9 (round((i+1)/4) > round(i/4)) are validation.
        assert_eq!(
            String::from_utf8(valid_text)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("Doc"))
                .collect::<Vec<_>>(),
            [
                "Document 1 of file 0.",
                "Document 1 of file 1.",
                "Document 1 of file 2."
            ]
        );
        assert_eq!(ds.train.bytes_per_token(), Some(1.0));
        assert!(matches!(ds.tokenizer().unwrap(), Some(Tokenizer::Byte)));
        // Nothing but the dataset is left next to it.
        let siblings: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings.len(), 2, "{siblings:?}");

        let err = prepare(&[dir.path().join("input")], "byte", &out, 100, 0.0).unwrap_err();
        assert!(matches!(err, DataError::OutputExists { .. }), "{err}");
    }

    #[test]
    fn embedded_prepare_keeps_the_corpus_split() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("brown");
        let manifest = prepare_embedded("byte", &out, 1 << 21).unwrap();
        assert_eq!(manifest.source, "embedded:brown");
        assert_eq!(manifest.train.documents, 475);
        assert_eq!(manifest.train.shards.len(), 3);
        let valid = manifest.valid.as_ref().unwrap();
        assert_eq!(valid.documents, 25);
        let valid_text = embedded::valid_text().unwrap();
        assert_eq!(valid.tokens, valid_text.len() as u64 + 1);
        let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
        let embedded = Dataset::embedded(&Tokenizer::Byte).unwrap();
        assert_eq!(ds.train.len(), embedded.train.len());
        assert_eq!(ds.train.source_bytes(), embedded.train.source_bytes());
    }

    #[test]
    fn bpe_prepare_copies_the_tokenizer_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("brown-valid.txt");
        fs::write(&input, embedded::valid_text().unwrap()).unwrap();
        let out = dir.path().join("brown-bpe");
        let manifest = prepare(std::slice::from_ref(&input), "bpe:300", &out, 50_000, 0.2).unwrap();
        assert_eq!(manifest.vocab_size, 300);
        assert_eq!(manifest.dtype, TokenDtype::U16);
        assert_eq!(manifest.tokenizer.spec, "bpe:300");
        assert_eq!(manifest.tokenizer.file.as_deref(), Some(TOKENIZER_FILE));
        assert_eq!(
            (
                manifest.train.documents,
                manifest.valid.as_ref().unwrap().documents
            ),
            (20, 5)
        );
        assert!(manifest.train.tokens * 11 < manifest.train.source_bytes * 10);

        let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
        let tokenizer = ds.tokenizer().unwrap().unwrap();
        assert_eq!(tokenizer.vocab_size(), 300);
        let valid = ds.valid.as_ref().unwrap();
        let decoded = tokenizer.decode(&read_all(valid)).unwrap();
        let mut selector = ValidSelector::new(0.2);
        let expected: String = split_documents(&embedded::valid_text().unwrap())
            .into_iter()
            .filter(|_| selector.next_is_valid())
            .map(|d| d + DOCUMENT_SEPARATOR)
            .collect();
        assert_eq!(decoded, expected);
        assert_eq!(valid.source_bytes(), Some(expected.len() as u64));
    }

    #[test]
    fn tokenizer_file_spec_and_u32_shards() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_inputs(dir.path());
        // A tokenizer with a vocab above 65536 needs u32 shards: pad a trained one with added
        // tokens.
        let trained = dir.path().join("small.json");
        let docs = split_documents(&embedded::valid_text().unwrap());
        let Tokenizer::HuggingFace { mut inner, .. } =
            train_bpe(docs.iter().take(3), 300, &trained).unwrap()
        else {
            panic!("train_bpe returns a Hugging Face tokenizer");
        };
        let extra: Vec<tokenizers::AddedToken> = (0..65_300)
            .map(|i| tokenizers::AddedToken::from(format!("<extra_{i}>"), true))
            .collect();
        inner.add_special_tokens(&extra);
        let big = dir.path().join("big.json");
        inner.save(&big, false).unwrap();

        let out = dir.path().join("ds32");
        let manifest = prepare(&[input], big.to_str().unwrap(), &out, 1000, 0.0).unwrap();
        assert_eq!(manifest.vocab_size, 65_600);
        assert_eq!(manifest.dtype, TokenDtype::U32);
        assert!(manifest.valid.is_none());
        assert!(!out.join("valid").exists());
        let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
        assert_eq!(ds.train.shards()[0].dtype(), TokenDtype::U32);
        let text = ds
            .tokenizer()
            .unwrap()
            .unwrap()
            .decode(&read_all(&ds.train))
            .unwrap();
        assert!(text.starts_with("Document 0 of file 0.\n"));
    }

    #[test]
    fn failures_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir(&input).unwrap();
        fs::write(input.join("a.txt"), "fine text\n\nmore").unwrap();
        fs::write(input.join("b.txt"), b"bad \xff byte").unwrap();
        let out = dir.path().join("out");
        let err = prepare(std::slice::from_ref(&input), "byte", &out, 4, 0.0).unwrap_err();
        assert!(matches!(err, DataError::NotUtf8 { .. }), "{err}");
        assert!(err.to_string().contains("b.txt"));
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["in"]);

        let err = prepare(
            std::slice::from_ref(&input),
            "missing/tokenizer.json",
            &out,
            4,
            0.0,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("missing/tokenizer.json"),
            "{err}"
        );
        assert!(!out.exists());

        let err = prepare(std::slice::from_ref(&input), "byte", &out, 4, 1.0).unwrap_err();
        assert_eq!(err.to_string(), "valid_fraction = 1: must be in [0, 1)");

        let blank = dir.path().join("blank.txt");
        fs::write(&blank, "\n  \n").unwrap();
        let err = prepare(&[blank], "byte", &out, 4, 0.0).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn corrupted_datasets_are_refused_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let input = write_inputs(dir.path());
        let out = dir.path().join("ds");
        let manifest = prepare(&[input], "byte", &out, 50, 0.25).unwrap();
        let shard = out.join(&manifest.train.shards[1].file);
        let mut bytes = fs::read(&shard).unwrap();
        bytes[70] ^= 1;
        fs::write(&shard, &bytes).unwrap();
        let err = Dataset::open(&out, OpenOptions::default()).unwrap_err();
        assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&shard.display().to_string()),
            "{err}"
        );
        // Without verification the flipped byte goes unnoticed (sizes still match).
        Dataset::open(&out, OpenOptions { verify: false }).unwrap();

        fs::remove_file(&shard).unwrap();
        let err = Dataset::open(&out, OpenOptions { verify: false }).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("train-000001.tokens"), "{err}");
    }
}
