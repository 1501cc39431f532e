//! Token sources: the shards of one split presented as one token sequence (with where its
//! documents begin, when recorded), and datasets (a train source plus an optional validation
//! source) opened from disk or built from the embedded corpus.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::document_starts::DocumentStarts;
use crate::documents::split_documents;
use crate::embedded;
use crate::error::{DataError, Result};
use crate::manifest::{Manifest, SplitRecord};
use crate::shard::Shard;
use crate::tokenizer::Tokenizer;

/// Separator appended to every document before tokenizing, by `prepare` and [`Dataset::embedded`]
/// alike, so that the token stream reads like the original text.
pub const DOCUMENT_SEPARATOR: &str = "\n\n";

/// Concatenation of shards as one sequence of token ids, with random access to windows.
#[derive(Debug)]
pub struct TokenSource {
    name: String,
    shards: Vec<Shard>,
    /// `starts[i]` = index of shard i's first token in the whole sequence.
    starts: Vec<u64>,
    /// Each shard's document starts, when the data records them.
    document_starts: Option<Vec<DocumentStarts>>,
    len: u64,
    vocab_size: Option<u32>,
    source_bytes: Option<u64>,
}

impl TokenSource {
    /// Joins `shards` in order. `name` appears in messages (a path or `embedded:brown/train`);
    /// `vocab_size` is the dataset's, when known; `source_bytes` the size of the text behind the
    /// tokens, when known (for bits per byte).
    pub fn new(
        name: impl Into<String>,
        shards: Vec<Shard>,
        vocab_size: Option<u32>,
        source_bytes: Option<u64>,
    ) -> Result<Self> {
        let name = name.into();
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0u64;
        for shard in &shards {
            starts.push(len);
            len += shard.len();
        }
        if len == 0 {
            return Err(DataError::Empty {
                path: PathBuf::from(&name),
                what: "no tokens".into(),
            });
        }
        Ok(TokenSource {
            name,
            shards,
            starts,
            document_starts: None,
            len,
            vocab_size,
            source_bytes,
        })
    }

    /// This source with where its documents begin: `starts[i]` belongs to shard `i` and must
    /// be for its token count.
    pub fn with_document_starts(mut self, starts: Vec<DocumentStarts>) -> Result<Self> {
        if starts.len() != self.shards.len() {
            return Err(DataError::Loader {
                source_name: self.name,
                what: format!(
                    "{} document-starts files for {} shards",
                    starts.len(),
                    self.shards.len()
                ),
            });
        }
        for (shard, starts) in self.shards.iter().zip(&starts) {
            if starts.shard_tokens() != shard.len() {
                return Err(DataError::BadDocumentStarts {
                    path: starts.path().to_path_buf(),
                    what: format!(
                        "they are for a shard of {} tokens, but {} holds {}",
                        starts.shard_tokens(),
                        shard.path().display(),
                        shard.len()
                    ),
                });
            }
        }
        self.document_starts = Some(starts);
        Ok(self)
    }

    /// An in-memory source of `tokens` (each `< vocab_size`).
    pub fn from_tokens(
        name: &str,
        tokens: &[u32],
        vocab_size: u32,
        source_bytes: Option<u64>,
    ) -> Result<Self> {
        let shard = Shard::from_tokens(name, tokens, vocab_size)?;
        TokenSource::new(name, vec![shard], Some(vocab_size), source_bytes)
    }

    /// Name for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Total tokens.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an empty source cannot be built.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The shards, in order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The dataset's vocab size when recorded (`None` for nanoGPT / llm.c files).
    pub fn vocab_size(&self) -> Option<u32> {
        self.vocab_size
    }

    /// Bytes of text behind these tokens, when known (manifest or embedded corpus).
    pub fn source_bytes(&self) -> Option<u64> {
        self.source_bytes
    }

    /// Average text bytes per token, when the source byte count is known.
    pub fn bytes_per_token(&self) -> Option<f64> {
        self.source_bytes.map(|b| b as f64 / self.len as f64)
    }

    /// Copies tokens `start..start + out.len()` into `out`, across shard boundaries.
    ///
    /// # Panics
    /// If the range runs past `len()`.
    pub fn read(&self, start: u64, out: &mut [i64]) {
        let end = start + out.len() as u64;
        assert!(
            end <= self.len,
            "{}: window {start}..{end} past {} tokens",
            self.name,
            self.len
        );
        // Last shard whose start is <= `start`.
        let mut shard = self.starts.partition_point(|&s| s <= start) - 1;
        let mut pos = start;
        let mut filled = 0usize;
        while filled < out.len() {
            let local = pos - self.starts[shard];
            let take = ((self.shards[shard].len() - local) as usize).min(out.len() - filled);
            self.shards[shard].copy_to(local, &mut out[filled..filled + take]);
            filled += take;
            pos += take as u64;
            shard += 1;
        }
    }

    /// Whether the source records where its documents begin.
    pub fn has_document_starts(&self) -> bool {
        self.document_starts.is_some()
    }

    /// How many documents begin in the source, when it records that.
    pub fn documents(&self) -> Option<u64> {
        let starts = self.document_starts.as_ref()?;
        Some(starts.iter().map(DocumentStarts::len).sum())
    }

    /// How many documents a window of `seq_len` tokens holds on average, when the source records
    /// its documents: the one the window begins in, plus those beginning at its other
    /// `seq_len - 1` positions (`documents / len` a position).
    pub fn documents_per_window(&self, seq_len: usize) -> Option<f64> {
        let per_position = self.documents()? as f64 / self.len as f64;
        Some(1.0 + seq_len.saturating_sub(1) as f64 * per_position)
    }

    /// Where documents begin inside tokens `range`, as positions in the whole sequence, in order,
    /// across shard boundaries (which are not document boundaries unless a start says so);
    /// `None` when the source does not record document starts.
    ///
    /// # Panics
    /// If the range runs past `len()`.
    pub fn document_starts(&self, range: Range<u64>) -> Option<Vec<u64>> {
        let starts = self.document_starts.as_ref()?;
        assert!(
            range.end <= self.len,
            "{}: document starts in {range:?} past {} tokens",
            self.name,
            self.len
        );
        let mut found = Vec::new();
        if range.is_empty() {
            return Some(found);
        }
        let first = self.starts.partition_point(|&s| s <= range.start) - 1;
        let shards = self.starts.iter().zip(starts).skip(first);
        for (&offset, shard_starts) in shards.take_while(|(&offset, _)| offset < range.end) {
            let local = range.start.saturating_sub(offset)..range.end - offset;
            found.extend(shard_starts.in_range(local).map(|s| s + offset));
        }
        Some(found)
    }

    /// Checks that every token id fits a model with `model_vocab` embeddings. Free when the
    /// recorded vocab already fits; otherwise scans the shards and names the first offending file
    /// and position.
    pub fn check_vocab(&self, model_vocab: u32) -> Result<()> {
        if self.vocab_size.is_some_and(|v| v <= model_vocab) {
            return Ok(());
        }
        for_each_parallel(&self.shards, |_, shard| shard.check_range(model_vocab))
    }
}

/// Runs `f` on every shard on up to `available_parallelism` threads; returns the error of the
/// lowest-indexed failing shard, so the result does not depend on thread timing.
fn for_each_parallel(
    shards: &[Shard],
    f: impl Fn(usize, &Shard) -> Result<()> + Sync,
) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(shards.len());
    let next = AtomicUsize::new(0);
    let mut errors: Vec<(usize, DataError)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut errs = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(shard) = shards.get(i) else { break };
                        if let Err(e) = f(i, shard) {
                            errs.push((i, e));
                        }
                    }
                    errs
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("shard check thread panicked"))
            .collect()
    });
    errors.sort_by_key(|(i, _)| *i);
    match errors.into_iter().next() {
        None => Ok(()),
        Some((_, e)) => Err(e),
    }
}

/// How much of a dataset to check when opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read every shard in full: sha256 against the manifest and every token id against the
    /// vocab size. Costs one read of the data (parallel over shards); sizes, magic and versions
    /// are always checked.
    pub verify: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { verify: true }
    }
}

/// A training source, an optional validation source, and where they came from.
#[derive(Debug)]
pub struct Dataset {
    /// Training tokens.
    pub train: Arc<TokenSource>,
    /// Validation tokens, when the dataset has a validation split.
    pub valid: Option<Arc<TokenSource>>,
    /// The manifest, for datasets opened from a directory.
    pub manifest: Option<Manifest>,
    /// The directory or file it was opened from (`None` for the embedded corpus).
    pub root: Option<PathBuf>,
}

impl Dataset {
    /// Opens a dataset directory (with manifest.json), a single glatrain or llm.c shard, or a
    /// nanoGPT-style headerless u16 `.bin` file (the last three give a train source only).
    pub fn open(path: &Path, options: OpenOptions) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        if meta.is_dir() {
            return Dataset::open_dir(path, options);
        }
        let shard = Shard::open(path)?;
        let vocab = shard.vocab_size();
        if options.verify {
            if let Some(v) = vocab {
                shard.check_range(v)?;
            }
        }
        let source = TokenSource::new(path.display().to_string(), vec![shard], vocab, None)?;
        Ok(Dataset {
            train: Arc::new(source),
            valid: None,
            manifest: None,
            root: Some(path.to_path_buf()),
        })
    }

    fn open_dir(dir: &Path, options: OpenOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let train = open_split(dir, &manifest, "train", &manifest.train, options)?;
        let valid = match &manifest.valid {
            Some(split) => Some(Arc::new(open_split(
                dir, &manifest, "valid", split, options,
            )?)),
            None => None,
        };
        Ok(Dataset {
            train: Arc::new(train),
            valid,
            manifest: Some(manifest),
            root: Some(dir.to_path_buf()),
        })
    }

    /// The embedded Brown corpus tokenized in memory with `tokenizer`, each document followed by
    /// [`DOCUMENT_SEPARATOR`] as in `prepare`, with its document starts; nothing is read from
    /// disk.
    pub fn embedded(tokenizer: &Tokenizer) -> Result<Self> {
        let train = embedded_source("train", &embedded::train_text()?, tokenizer)?;
        let valid = embedded_source("valid", &embedded::valid_text()?, tokenizer)?;
        Ok(Dataset {
            train: Arc::new(train),
            valid: Some(Arc::new(valid)),
            manifest: None,
            root: None,
        })
    }

    /// The tokenizer that made this dataset: from the manifest (byte, or the copied
    /// tokenizer.json). `None` when unknown (single shard files).
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let (Some(manifest), Some(root)) = (&self.manifest, &self.root) else {
            return Ok(None);
        };
        match manifest.tokenizer_path(root) {
            Some(path) => Tokenizer::from_file(&path).map(Some),
            None => Ok(Some(Tokenizer::Byte)),
        }
    }
}

fn embedded_source(split: &str, text: &str, tokenizer: &Tokenizer) -> Result<TokenSource> {
    let docs: Vec<String> = split_documents(text)
        .into_iter()
        .map(|d| d + DOCUMENT_SEPARATOR)
        .collect();
    let bytes: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let encoded = tokenizer.encode_batch(&docs)?;
    // As in `prepare`, a document without tokens begins nowhere.
    let mut starts = Vec::with_capacity(encoded.len());
    let mut position = 0u64;
    for doc in encoded.iter().filter(|d| !d.is_empty()) {
        starts.push(position);
        position += doc.len() as u64;
    }
    let tokens: Vec<u32> = encoded.concat();
    let name = format!("embedded:{}/{split}", embedded::NAME);
    let starts = DocumentStarts::from_starts(&name, &starts, tokens.len() as u64)?;
    TokenSource::from_tokens(&name, &tokens, tokenizer.vocab_size(), Some(bytes))?
        .with_document_starts(vec![starts])
}

fn open_split(
    dir: &Path,
    manifest: &Manifest,
    name: &str,
    split: &SplitRecord,
    options: OpenOptions,
) -> Result<TokenSource> {
    let manifest_path = dir.join(crate::manifest::MANIFEST_FILE);
    if split.shards.is_empty() || split.tokens == 0 {
        return Err(DataError::Empty {
            path: manifest_path,
            what: format!("the {name} split has no tokens"),
        });
    }
    let disagree_at = |path: &Path, what: String| DataError::Manifest {
        path: path.to_path_buf(),
        what: format!("{what} (manifest {})", manifest_path.display()),
    };
    let mut shards = Vec::with_capacity(split.shards.len());
    let mut document_starts = Vec::with_capacity(split.shards.len());
    for record in &split.shards {
        let path = dir.join(&record.file);
        let shard = Shard::open(&path)?;
        let disagree = |what: String| disagree_at(&path, what);
        if shard.len() != record.tokens {
            return Err(disagree(format!(
                "header says {} tokens, the manifest says {}",
                shard.len(),
                record.tokens
            )));
        }
        if shard.vocab_size() != Some(manifest.vocab_size) {
            return Err(disagree(format!(
                "header vocab size {:?} differs from the manifest's {}",
                shard.vocab_size(),
                manifest.vocab_size
            )));
        }
        shards.push(shard);
        if let Some(starts_record) = &record.document_starts {
            let path = dir.join(&starts_record.file);
            let starts = DocumentStarts::open(&path)?;
            if starts.len() != starts_record.starts {
                return Err(disagree_at(
                    &path,
                    format!(
                        "header says {} document starts, the manifest says {}",
                        starts.len(),
                        starts_record.starts
                    ),
                ));
            }
            document_starts.push(starts);
        }
    }
    if options.verify {
        let records = &split.shards;
        for_each_parallel(&shards, |index, shard| {
            check_sha256(shard.path(), &records[index].sha256, || shard.sha256())?;
            shard.check_range(manifest.vocab_size)?;
            match (document_starts.get(index), &records[index].document_starts) {
                (Some(starts), Some(record)) => {
                    check_sha256(starts.path(), &record.sha256, || starts.sha256())?;
                    starts.check_order()
                }
                _ => Ok(()),
            }
        })?;
    }
    let source = TokenSource::new(
        format!("{}/{name}", dir.display()),
        shards,
        Some(manifest.vocab_size),
        Some(split.source_bytes),
    )?;
    if manifest.has_document_starts() {
        source.with_document_starts(document_starts)
    } else {
        Ok(source)
    }
}

/// Errors unless the file at `path` hashes (`actual`) to the manifest's `expected` sha256.
fn check_sha256(path: &Path, expected: &str, actual: impl FnOnce() -> String) -> Result<()> {
    let actual = actual();
    if actual == expected {
        return Ok(());
    }
    Err(DataError::ChecksumMismatch {
        path: path.to_path_buf(),
        expected: expected.to_string(),
        actual,
    })
}

/// Bits per byte from a mean loss in nats per token: `nats * tokens / bytes / ln 2`, with
/// `bytes_per_token` = bytes / tokens of the evaluated text (see [`TokenSource::bytes_per_token`]).
pub fn bits_per_byte(nats_per_token: f64, bytes_per_token: f64) -> f64 {
    nats_per_token / bytes_per_token / std::f64::consts::LN_2
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::shard::write_shard;

    /// An in-memory source whose token at position i is i, in shards of the given lengths, with
    /// documents beginning at `documents` (positions in the whole source, increasing).
    pub(crate) fn positions_with_documents(shard_lens: &[u64], documents: &[u64]) -> TokenSource {
        let len: u64 = shard_lens.iter().sum();
        let (mut shards, mut starts) = (Vec::new(), Vec::new());
        let mut offset = 0;
        for (i, &n) in shard_lens.iter().enumerate() {
            let tokens: Vec<u32> = (offset..offset + n).map(|t| t as u32).collect();
            let name = format!("shard{i}");
            shards.push(Shard::from_tokens(&name, &tokens, len as u32).unwrap());
            let inside: Vec<u64> = documents
                .iter()
                .filter(|&&d| (offset..offset + n).contains(&d))
                .map(|d| d - offset)
                .collect();
            starts.push(DocumentStarts::from_starts(&name, &inside, n).unwrap());
            offset += n;
        }
        TokenSource::new("positions", shards, Some(len as u32), None)
            .unwrap()
            .with_document_starts(starts)
            .unwrap()
    }

    #[test]
    fn document_starts_of_any_range_across_shards() {
        // Shards of 5, 1 and 7 tokens (offsets 0, 5, 6); the document from 3 runs over the first
        // shard boundary, one begins at the second, and the last token begins the last document.
        let documents = [0, 3, 6, 9, 12];
        let source = positions_with_documents(&[5, 1, 7], &documents);
        assert_eq!(source.documents(), Some(5));
        for begin in 0..=13u64 {
            for end in begin..=13u64 {
                let want: Vec<u64> = documents
                    .iter()
                    .copied()
                    .filter(|d| (begin..end).contains(d))
                    .collect();
                assert_eq!(
                    source.document_starts(begin..end),
                    Some(want),
                    "{begin}..{end}"
                );
            }
        }
        let bare = TokenSource::from_tokens("bare", &[1, 2, 3], 4, None).unwrap();
        assert!(!bare.has_document_starts());
        assert_eq!((bare.document_starts(0..3), bare.documents()), (None, None));
        assert_eq!(bare.documents_per_window(2), None);
    }

    #[test]
    fn documents_per_window_is_the_mean_over_windows() {
        // Documents of 10 tokens: a window of 64 holds 1 + 63 / 10 of them on average.
        let documents: Vec<u64> = (0..100).map(|d| d * 10).collect();
        let source = positions_with_documents(&[400, 600], &documents);
        let mean = source.documents_per_window(64).unwrap();
        assert!((mean - 7.3).abs() < 1e-12, "{mean}");
        let windows = 0..=1000 - 64;
        let counted: usize = windows
            .clone()
            .map(|t| 1 + source.document_starts(t + 1..t + 64).unwrap().len())
            .sum();
        let measured = counted as f64 / windows.count() as f64;
        assert!((measured - mean).abs() < 0.01, "{measured} vs {mean}");
        assert_eq!(source.documents_per_window(1), Some(1.0));
    }

    #[test]
    fn document_starts_must_fit_their_shards() {
        let shard = || vec![Shard::from_tokens("s", &[1, 2, 3], 4).unwrap()];
        let source = || TokenSource::new("x", shard(), Some(4), None).unwrap();
        let starts = DocumentStarts::from_starts("s.docs", &[0], 4).unwrap();
        let err = source().with_document_starts(vec![starts]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "s.docs: bad document starts: they are for a shard of 4 tokens, but s holds 3"
        );
        let err = source().with_document_starts(Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains("0 document-starts files for 1 shards"),
            "{err}"
        );
    }

    #[test]
    fn reads_windows_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let mut shards = Vec::new();
        let mut all = Vec::new();
        for (i, n) in [5u32, 1, 7].into_iter().enumerate() {
            let toks: Vec<u32> = (0..n).map(|t| all.len() as u32 + t).collect();
            let path = dir.path().join(format!("s{i}.tokens"));
            write_shard(&path, &toks, 1000).unwrap();
            all.extend(toks);
            shards.push(Shard::open(&path).unwrap());
        }
        let source = TokenSource::new("test", shards, Some(1000), Some(26)).unwrap();
        assert_eq!(source.len(), 13);
        for start in 0..13u64 {
            for len in 0..=(13 - start) as usize {
                let mut out = vec![-1i64; len];
                source.read(start, &mut out);
                let want: Vec<i64> = all[start as usize..start as usize + len]
                    .iter()
                    .map(|&t| i64::from(t))
                    .collect();
                assert_eq!(out, want, "start {start} len {len}");
            }
        }
        assert_eq!(source.bytes_per_token(), Some(2.0));
        source.check_vocab(1000).unwrap();
        let err = source.check_vocab(10).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    position: 4,
                    token: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("s2.tokens"), "{err}");
    }

    #[test]
    fn headerless_bin_opens_as_a_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("val.bin");
        let raw: Vec<u8> = [10u16, 20, 30]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        std::fs::write(&path, raw).unwrap();
        let ds = Dataset::open(&path, OpenOptions::default()).unwrap();
        assert!(ds.valid.is_none());
        assert_eq!(ds.train.vocab_size(), None);
        let mut out = [0i64; 3];
        ds.train.read(0, &mut out);
        assert_eq!(out, [10, 20, 30]);
        assert!(ds.train.check_vocab(30).is_err());
        ds.train.check_vocab(31).unwrap();
        assert!(ds.tokenizer().unwrap().is_none());
    }

    #[test]
    fn embedded_byte_dataset_matches_the_text() {
        let ds = Dataset::embedded(&Tokenizer::Byte).unwrap();
        let valid = ds.valid.as_ref().unwrap();
        let text = embedded::valid_text().unwrap();
        // Each document begins where the one before it and its separator end.
        let mut expected = vec![0u64];
        for doc in split_documents(&text) {
            expected.push(expected.last().unwrap() + (doc.len() + DOCUMENT_SEPARATOR.len()) as u64);
        }
        assert_eq!(expected.pop(), Some(valid.len()));
        assert_eq!(valid.document_starts(0..valid.len()), Some(expected));
        assert_eq!(ds.train.documents(), Some(475));
        // Documents are re-joined with "\n\n": the same bytes as the file up to the final newline.
        assert_eq!(valid.len(), text.len() as u64 + 1);
        assert_eq!(valid.source_bytes(), Some(valid.len()));
        let mut head = vec![0i64; 40];
        valid.read(0, &mut head);
        let head: Vec<u8> = head.iter().map(|&t| t as u8).collect();
        assert_eq!(head, text.as_bytes()[..40]);
        assert!(ds.train.len() > 5_000_000);
    }

    #[test]
    fn bits_per_byte_formula() {
        // ln 2 nats per token at one byte per token is one bit per byte.
        assert!((bits_per_byte(std::f64::consts::LN_2, 1.0) - 1.0).abs() < 1e-12);
        assert!((bits_per_byte(2.0, 4.0) - 0.5 / std::f64::consts::LN_2).abs() < 1e-12);
    }
}
