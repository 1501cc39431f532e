//! The streaming pipeline of `prepare`:
//!
//! ```text
//! reader thread: files in order -> decompress -> records -> batches of ~BATCH_BYTES
//!     | bounded channel (BATCHES_AHEAD batches: memory stays bounded whatever the input size)
//! workers (rayon pool): parse + tokenize the records of one batch in parallel
//!     | results in input order
//! this thread: bad records (stop or skip), train/valid split, shard files
//! ```
//!
//! Only the workers' share depends on the thread count, and their results are put back in
//! input order before anything is decided, so the output is the same for any thread count.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::{OnBadRecord, PrepareOptions, PrepareStats, BPE_TRAIN_MAX_BYTES};
use crate::document_starts::{self, DocumentStartsWriter};
use crate::documents::ValidSelector;
use crate::error::{DataError, Result};
use crate::inputs::{parse, read_file, BadRecord, InputFile, Location, Problem, Raw, RawRecord};
use crate::manifest::{DocumentStartsRecord, ShardRecord, SplitRecord};
use crate::progress::Progress;
use crate::shard::{ShardWriter, SHARD_EXTENSION};
use crate::source::DOCUMENT_SEPARATOR;
use crate::tokenizer::Tokenizer;

/// Records go from the reader to the workers in batches of about this many bytes.
const BATCH_BYTES: usize = 4 << 20;
/// Bytes a record counts for besides its text, so that batches of tiny records stay small.
const RECORD_OVERHEAD: usize = 64;
/// Batches the reader may be ahead of the workers.
const BATCHES_AHEAD: usize = 2;
/// Skipped bad records listed one by one; the rest are only counted.
const BAD_RECORDS_LISTED: usize = 20;

/// The two outputs of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Split {
    Train,
    Valid,
}

impl Split {
    pub(super) fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

/// The reader thread and the receiving end of its batches. Dropping it hangs up, which stops
/// the thread at its next batch, and waits for it.
struct Reader {
    batches: Option<Receiver<Vec<RawRecord>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Reader {
    /// Starts reading `files` in order; the bytes read from disk are added to `bytes_read`.
    fn spawn(files: &[InputFile], text_field: &str, bytes_read: &Arc<AtomicU64>) -> Result<Self> {
        let (send, batches) = sync_channel(BATCHES_AHEAD);
        let files = files.to_vec();
        let text_field = text_field.to_string();
        let bytes_read = Arc::clone(bytes_read);
        let thread = std::thread::Builder::new()
            .name("prepare-reader".into())
            .spawn(move || {
                let mut batch = Vec::new();
                let mut size = 0;
                for (index, file) in files.iter().enumerate() {
                    let flow = read_file(file, index, &text_field, &bytes_read, &mut |record| {
                        size += record.raw.len() + RECORD_OVERHEAD;
                        batch.push(record);
                        if size >= BATCH_BYTES {
                            size = 0;
                            if send.send(std::mem::take(&mut batch)).is_err() {
                                return ControlFlow::Break(());
                            }
                        }
                        ControlFlow::Continue(())
                    })?;
                    if flow.is_break() {
                        return Ok(());
                    }
                }
                if !batch.is_empty() {
                    // A hang-up here means the consumer stopped for its own reason.
                    let _ = send.send(batch);
                }
                Ok(())
            })
            .map_err(|e| DataError::Io {
                path: PathBuf::from("prepare-reader"),
                source: e,
            })?;
        Ok(Reader {
            batches: Some(batches),
            thread: Some(thread),
        })
    }

    /// The next batch; `None` when the reader is done or stopped (see [`Reader::finish`]).
    fn next(&self) -> Option<Vec<RawRecord>> {
        self.batches.as_ref()?.recv().ok()
    }

    /// Waits for the thread and returns its error, if it stopped on one.
    fn finish(mut self) -> Result<()> {
        self.batches = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            // Its result no longer matters: the consumer is returning an error of its own.
            let _ = thread.join();
        }
    }
}

/// What the workers made of one record.
enum Outcome {
    Document { bytes: u64, tokens: Vec<u32> },
    Empty,
    Bad(Problem),
}

/// The consumer side: tokenizes batches of records on the pool and writes the splits.
pub(super) struct Tokenizing<'a> {
    root: PathBuf,
    tokenizer: &'a Tokenizer,
    pool: &'a rayon::ThreadPool,
    options: &'a PrepareOptions,
    out_dir: &'a Path,
    train: SplitWriter,
    valid: SplitWriter,
    stats: PrepareStats,
    /// Nanoseconds the workers spent parsing and tokenizing, summed over workers.
    busy_nanos: AtomicU64,
    bytes_read: Arc<AtomicU64>,
    started: Instant,
}

impl<'a> Tokenizing<'a> {
    pub(super) fn new(
        root: &Path,
        tokenizer: &'a Tokenizer,
        pool: &'a rayon::ThreadPool,
        options: &'a PrepareOptions,
        out_dir: &'a Path,
        threads: usize,
    ) -> Result<Self> {
        let vocab_size = tokenizer.vocab_size();
        Ok(Tokenizing {
            root: root.to_path_buf(),
            tokenizer,
            pool,
            options,
            out_dir,
            train: SplitWriter::new(root, Split::Train, vocab_size, options.shard_tokens)?,
            valid: SplitWriter::new(root, Split::Valid, vocab_size, options.shard_tokens)?,
            stats: PrepareStats {
                threads,
                ..PrepareStats::default()
            },
            busy_nanos: AtomicU64::new(0),
            bytes_read: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        })
    }

    /// Tokenizes every document of `files`; `split` is asked for each document's split, in
    /// order.
    pub(super) fn run_files(
        &mut self,
        files: &[InputFile],
        split: &mut dyn FnMut() -> Split,
    ) -> Result<()> {
        let total: u64 = files.iter().map(|f| f.size).sum();
        let mut progress = Progress::new(self.options.progress, "tokenizing", total);
        let reader = Reader::spawn(files, &self.options.text_field, &self.bytes_read)?;
        while let Some(batch) = reader.next() {
            self.batch(files, batch, split, &progress)?;
            let bytes = self.bytes_read.load(Ordering::Relaxed);
            progress.update(bytes, || self.rates());
        }
        reader.finish()?;
        self.stats.files += files.len();
        self.stats.input_bytes += total;
        Ok(())
    }

    /// Tokenizes records already in memory (the embedded corpus).
    pub(super) fn run_records(
        &mut self,
        files: &[InputFile],
        records: Vec<RawRecord>,
        split: &mut dyn FnMut() -> Split,
    ) -> Result<()> {
        let progress = Progress::new(self.options.progress, "tokenizing", 0);
        self.batch(files, records, split, &progress)?;
        self.stats.files += files.len();
        self.stats.input_bytes += files.iter().map(|f| f.size).sum::<u64>();
        Ok(())
    }

    /// "10.2 MB/s of text, 2.3M tokens/s, 12,345 documents"
    fn rates(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        format!(
            "{:.1} MB/s of text, {} tokens/s, {} documents",
            self.stats.text_bytes as f64 / seconds / 1e6,
            super::stats::si(self.stats.tokens as f64 / seconds),
            super::stats::thousands(self.stats.documents)
        )
    }

    fn batch(
        &mut self,
        files: &[InputFile],
        records: Vec<RawRecord>,
        split: &mut dyn FnMut() -> Split,
        progress: &Progress,
    ) -> Result<()> {
        if let Some(interrupt) = &self.options.interrupt {
            if interrupt.load(Ordering::Relaxed) {
                return Err(DataError::Interrupted {
                    path: self.out_dir.to_path_buf(),
                });
            }
        }
        let (tokenizer, field, busy) = (self.tokenizer, &self.options.text_field, &self.busy_nanos);
        let outcomes: Vec<(usize, Location, Result<Outcome>)> = self.pool.install(|| {
            records
                .into_par_iter()
                .map(
                    |RawRecord {
                         file,
                         location,
                         raw,
                     }| {
                        let started = Instant::now();
                        let outcome = tokenize(raw, field, tokenizer);
                        busy.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        (file, location, outcome)
                    },
                )
                .collect()
        });
        for (file, location, outcome) in outcomes {
            match outcome? {
                Outcome::Document { bytes, tokens } => {
                    let writer = match split() {
                        Split::Train => &mut self.train,
                        Split::Valid => &mut self.valid,
                    };
                    writer.add(bytes, &tokens)?;
                    self.stats.documents += 1;
                    self.stats.text_bytes += bytes;
                    self.stats.tokens += tokens.len() as u64;
                }
                Outcome::Empty => self.stats.empty_documents += 1,
                Outcome::Bad(problem) => {
                    let bad = BadRecord {
                        path: files[file].path.clone(),
                        location,
                        problem,
                    };
                    self.bad_record(bad, progress)?;
                }
            }
        }
        Ok(())
    }

    fn bad_record(&mut self, record: BadRecord, progress: &Progress) -> Result<()> {
        if self.options.on_bad_record == OnBadRecord::Stop {
            return Err(DataError::BadRecord(record));
        }
        self.stats.bad_records += 1;
        *self
            .stats
            .bad_by_kind
            .entry(record.problem.kind())
            .or_default() += 1;
        if self.stats.bad_examples.len() < BAD_RECORDS_LISTED {
            progress.warn(&format!("skipped bad record: {record}"));
            self.stats.bad_examples.push(record);
            if self.stats.bad_examples.len() == BAD_RECORDS_LISTED {
                progress.warn("(further bad records are counted, not listed)");
            }
        }
        Ok(())
    }

    /// Closes the last shards; returns the train split, the valid split (`None` without
    /// documents, its directory removed) and the statistics.
    pub(super) fn finish(self) -> Result<(SplitRecord, Option<SplitRecord>, PrepareStats)> {
        let mut stats = self.stats;
        stats.elapsed = self.started.elapsed();
        stats.worker_busy = Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed));
        let train = self.train.finish()?;
        let valid = self.valid.finish()?;
        let valid = if valid.documents == 0 {
            let dir = self.root.join(Split::Valid.name());
            std::fs::remove_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
            None
        } else {
            Some(valid)
        };
        Ok((train, valid, stats))
    }
}

/// A record's document and tokens (the document followed by [`DOCUMENT_SEPARATOR`]; a document
/// without tokens is empty); an error only when the tokenizer fails.
fn tokenize(raw: Raw, field: &str, tokenizer: &Tokenizer) -> Result<Outcome> {
    let mut text = match parse(raw, field) {
        Ok(text) => text,
        Err(problem) => return Ok(Outcome::Bad(problem)),
    };
    if text.trim().is_empty() {
        return Ok(Outcome::Empty);
    }
    text.push_str(DOCUMENT_SEPARATOR);
    let mut tokens = Vec::with_capacity(text.len() / 3);
    tokenizer.encode_into(&text, &mut tokens)?;
    if tokens.is_empty() {
        return Ok(Outcome::Empty);
    }
    Ok(Outcome::Document {
        bytes: text.len() as u64,
        tokens,
    })
}

/// Cuts one split's tokens into shard files of `shard_tokens` each, each with the file of the
/// documents that begin in it (a document runs on into the next shard where one is full).
struct SplitWriter {
    root: PathBuf,
    split: Split,
    vocab_size: u32,
    shard_tokens: u64,
    shard: Option<OpenShard>,
    record: SplitRecord,
}

/// The shard being written and its document starts, with their paths inside the dataset.
struct OpenShard {
    file: String,
    tokens: ShardWriter,
    starts_file: String,
    starts: DocumentStartsWriter,
}

impl SplitWriter {
    fn new(root: &Path, split: Split, vocab_size: u32, shard_tokens: u64) -> Result<Self> {
        let dir = root.join(split.name());
        std::fs::create_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        Ok(SplitWriter {
            root: root.to_path_buf(),
            split,
            vocab_size,
            shard_tokens,
            shard: None,
            record: SplitRecord {
                documents: 0,
                source_bytes: 0,
                tokens: 0,
                shards: Vec::new(),
            },
        })
    }

    /// Adds one document: `bytes` of text, tokenized as `tokens` (at least one).
    fn add(&mut self, bytes: u64, mut tokens: &[u32]) -> Result<()> {
        self.record.documents += 1;
        self.record.source_bytes += bytes;
        let shard_tokens = self.shard_tokens;
        let shard = self.open_shard()?;
        shard.starts.push(shard.tokens.len())?;
        while !tokens.is_empty() {
            let shard = self.open_shard()?;
            let room = (shard_tokens - shard.tokens.len()) as usize;
            let (now, later) = tokens.split_at(room.min(tokens.len()));
            shard.tokens.push(now)?;
            tokens = later;
            if shard.tokens.len() == shard_tokens {
                self.close_shard()?;
            }
        }
        Ok(())
    }

    /// The shard being written, opened when there is none (the last one is full).
    fn open_shard(&mut self) -> Result<&mut OpenShard> {
        if self.shard.is_none() {
            let name = self.split.name();
            let stem = format!("{name}/{name}-{:06}", self.record.shards.len());
            let file = format!("{stem}.{SHARD_EXTENSION}");
            let starts_file = format!("{stem}.{}", document_starts::EXTENSION);
            self.shard = Some(OpenShard {
                tokens: ShardWriter::create(&self.root.join(&file), self.vocab_size)?,
                starts: DocumentStartsWriter::create(&self.root.join(&starts_file))?,
                file,
                starts_file,
            });
        }
        Ok(self.shard.as_mut().expect("opened above"))
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(shard) = self.shard.take() {
            let written = shard.tokens.finish()?;
            let starts = shard.starts.finish(written.tokens)?;
            self.record.tokens += written.tokens;
            self.record.shards.push(ShardRecord {
                file: shard.file,
                tokens: written.tokens,
                sha256: written.sha256,
                document_starts: Some(DocumentStartsRecord {
                    file: shard.starts_file,
                    starts: starts.starts,
                    sha256: starts.sha256,
                }),
            });
        }
        Ok(())
    }

    /// Closes the last shard and flushes the directory's entries.
    fn finish(mut self) -> Result<SplitRecord> {
        self.close_shard()?;
        let dir = self.root.join(self.split.name());
        glatrain_fs::fsync_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        Ok(self.record)
    }
}

/// Trains a `bpe:<vocab_size>` tokenizer on the first [`BPE_TRAIN_MAX_BYTES`] of training
/// documents of `files` (the documents the valid fraction leaves to training), streamed: memory
/// holds the trainer's word counts, not the text. Bad records stop the training under
/// [`OnBadRecord::Stop`] and are skipped silently otherwise (the tokenizing pass reports them).
pub(super) fn train_bpe_on_files(
    files: &[InputFile],
    vocab_size: u32,
    out_path: &Path,
    options: &PrepareOptions,
    pool: &rayon::ThreadPool,
    out_dir: &Path,
) -> Result<Tokenizer> {
    let bytes_read = Arc::new(AtomicU64::new(0));
    let reader = Reader::spawn(files, &options.text_field, &bytes_read)?;
    let (send, documents) = sync_channel::<String>(1024);
    let field = options.text_field.clone();
    let (policy, interrupt) = (options.on_bad_record, options.interrupt.clone());
    let files_for_errors: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
    let out_dir = out_dir.to_path_buf();
    let mut valid = ValidSelector::new(options.valid_fraction);
    let mut progress = Progress::new(options.progress, "training BPE", BPE_TRAIN_MAX_BYTES);
    let feeder = std::thread::spawn(move || -> Result<()> {
        let mut fed = 0u64;
        while let Some(batch) = reader.next() {
            if interrupt
                .as_ref()
                .is_some_and(|i| i.load(Ordering::Relaxed))
            {
                return Err(DataError::Interrupted { path: out_dir });
            }
            for record in batch {
                let text = match parse(record.raw, &field) {
                    Ok(text) => text,
                    Err(problem) if policy == OnBadRecord::Stop => {
                        return Err(DataError::BadRecord(BadRecord {
                            path: files_for_errors[record.file].clone(),
                            location: record.location,
                            problem,
                        }));
                    }
                    Err(_) => continue,
                };
                if text.trim().is_empty() || valid.next_is_valid() {
                    continue;
                }
                fed += text.len() as u64;
                if send.send(text).is_err() || fed >= BPE_TRAIN_MAX_BYTES {
                    return Ok(());
                }
            }
            progress.update(fed, || format!("{} MB of text", fed / 1_000_000));
        }
        reader.finish()
    });
    let trained =
        pool.install(|| crate::tokenizer::train_bpe(documents.into_iter(), vocab_size, out_path));
    let fed = feeder
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    // A reading error explains a failed or partial training better than the training's own.
    fed?;
    trained
}

/// Counts by kind, most frequent first: "2 invalid JSON, 1 not UTF-8".
pub(super) fn by_kind(counts: &BTreeMap<&'static str, u64>) -> String {
    let mut counts: Vec<(&&str, &u64)> = counts.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    counts
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect::<Vec<_>>()
        .join(", ")
}
