//! Corpora as they are downloaded: finding the input files, telling their format from their
//! names, and reading them as a stream of raw records (one per document) with where each came
//! from, so that a bad record can be reported by file and line (or parquet row).
//!
//! | name                                         | records                                     |
//! |----------------------------------------------|---------------------------------------------|
//! | `*.txt`, `*.txt.gz`, `*.txt.zst`, other `.gz` / `.zst` | documents separated by blank lines |
//! | `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`, `*.json.gz`, `*.json.zst` | one JSON object per line  |
//! | `*.parquet`                                  | one row per document (row group by group)  |
//!
//! Reading is sequential per file and cheap (decompression, finding line ends); the per-record
//! work (UTF-8 checks, JSON parsing) is [`parse`], which the caller runs in parallel.

mod json_lines;
mod parquet_file;
mod text;

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{DataError, Result};

/// How a file's records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// UTF-8 text; documents are separated by blank lines.
    Text,
    /// JSON Lines: one object per line, the document in a string field.
    JsonLines,
    /// Apache Parquet: one row per document, the document in a string column.
    Parquet,
}

/// How a text or JSON Lines file is compressed (parquet compresses inside the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One input file and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: InputFormat,
    pub compression: Compression,
    /// Size on disk, for progress.
    pub size: u64,
}

impl InputFile {
    /// The format a file name implies, for files found in a directory; `None` for names that
    /// are not inputs (a plain `.json` is more often metadata than JSON Lines there).
    fn format_of(name: &str) -> Option<(InputFormat, Compression)> {
        let name = name.to_ascii_lowercase();
        let (stem, compression) = if let Some(stem) = name.strip_suffix(".gz") {
            (stem, Compression::Gzip)
        } else if let Some(stem) = name.strip_suffix(".zst") {
            (stem, Compression::Zstd)
        } else {
            (name.as_str(), Compression::None)
        };
        let extension = Path::new(stem).extension().and_then(|e| e.to_str());
        let format = match (extension, compression) {
            (Some("jsonl" | "ndjson"), _) => InputFormat::JsonLines,
            (Some("json"), Compression::Gzip | Compression::Zstd) => InputFormat::JsonLines,
            (Some("parquet"), Compression::None) => InputFormat::Parquet,
            (Some("txt"), _) => InputFormat::Text,
            (_, Compression::Gzip | Compression::Zstd) => InputFormat::Text,
            _ => return None,
        };
        Some((format, compression))
    }

    /// A file the user named: its name's format, a plain `.json` as JSON Lines, anything else
    /// as (possibly compressed) text.
    fn named(path: &Path, size: u64) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (format, compression) = Self::format_of(&name).unwrap_or_else(|| {
            let json = name.to_ascii_lowercase().ends_with(".json");
            let format = if json {
                InputFormat::JsonLines
            } else {
                InputFormat::Text
            };
            (format, Compression::None)
        });
        InputFile {
            path: path.to_path_buf(),
            format,
            compression,
            size,
        }
    }
}

/// Expands `inputs` into the files to read, in a deterministic order: each input in the order
/// given; a directory walked recursively in sorted order for input files (see the module docs),
/// skipping hidden entries (names starting with `.`). A file named directly is always read.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| DataError::io(input, e))?;
        if meta.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                return Err(DataError::NoInputs {
                    path: input.clone(),
                });
            }
        } else {
            files.push(InputFile::named(input, meta.len()));
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<InputFile>) -> Result<()> {
    let mut entries = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let meta = fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, files)?;
        } else if let Some((format, compression)) = InputFile::format_of(&name) {
            files.push(InputFile {
                path,
                format,
                compression,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

/// Where a record is in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A line (1-based): a JSON Lines record, or the first line of a text document.
    Line(u64),
    /// A parquet row: row group and row within it, both 0-based (as pyarrow counts).
    Row { group: usize, row: u64 },
    /// The file as a whole (it cannot be opened as its format).
    File,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(line) => write!(f, "line {line}"),
            Location::Row { group, row } => write!(f, "row group {group}, row {row}"),
            Location::File => f.write_str("whole file"),
        }
    }
}

/// What is wrong with a bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Bytes that are not UTF-8.
    NotUtf8,
    /// A line that is not JSON (serde_json's message, with the column).
    InvalidJson(String),
    /// A JSON value other than an object (`kind`: "an array", "a string", ...).
    NotAnObject(&'static str),
    /// An object without the text field.
    MissingField(String),
    /// The text field holds something else than a string (`kind`: "a number", "null", ...).
    NotAString { field: String, kind: &'static str },
    /// Data that cannot be decoded: a corrupt or truncated compressed stream (the rest of the
    /// file is lost), a file that is not parquet, an unreadable row group (the rest of the
    /// group is lost).
    Unreadable(String),
}

impl Problem {
    /// A short name for counting problems by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::NotUtf8 => "not UTF-8",
            Problem::InvalidJson(_) => "invalid JSON",
            Problem::NotAnObject(_) => "not a JSON object",
            Problem::MissingField(_) => "missing text field",
            Problem::NotAString { .. } => "text field not a string",
            Problem::Unreadable(_) => "unreadable data",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotUtf8 => f.write_str("not valid UTF-8"),
            Problem::InvalidJson(what) => write!(f, "invalid JSON: {what}"),
            Problem::NotAnObject(kind) => write!(f, "{kind}, not a JSON object"),
            Problem::MissingField(field) => write!(
                f,
                "no field {field:?} (--text-field names the field that holds the text)"
            ),
            Problem::NotAString { field, kind } => {
                write!(f, "field {field:?} is {kind}, not a string")
            }
            Problem::Unreadable(what) => f.write_str(what),
        }
    }
}

/// A record that is not a document, with its file and place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub path: PathBuf,
    pub location: Location,
    pub problem: Problem,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Location::File => write!(f, "{}: {}", self.path.display(), self.problem),
            location => write!(f, "{}: {location}: {}", self.path.display(), self.problem),
        }
    }
}

/// A record as read, before [`parse`].
#[derive(Debug)]
pub(crate) enum Raw {
    /// A text document (already checked UTF-8).
    Text(String),
    /// A JSON Lines line, without its line ending.
    JsonLine(Vec<u8>),
    /// A parquet string value.
    Value(Vec<u8>),
    /// A record known to be bad while reading.
    Bad(Problem),
}

impl Raw {
    /// Bytes held, for sizing batches.
    pub(crate) fn len(&self) -> usize {
        match self {
            Raw::Text(s) => s.len(),
            Raw::JsonLine(b) | Raw::Value(b) => b.len(),
            Raw::Bad(_) => 0,
        }
    }
}

/// One record: which input file (an index into the list), where in it, and what was read.
#[derive(Debug)]
pub(crate) struct RawRecord {
    pub file: usize,
    pub location: Location,
    pub raw: Raw,
}

/// The document text of a raw record, or what is wrong with it. `field` is the JSON field that
/// holds the text.
pub(crate) fn parse(raw: Raw, field: &str) -> std::result::Result<String, Problem> {
    match raw {
        Raw::Text(text) => Ok(text),
        Raw::JsonLine(line) => {
            let line = std::str::from_utf8(&line).map_err(|_| Problem::NotUtf8)?;
            json_lines::text_field(line, field)
        }
        Raw::Value(bytes) => String::from_utf8(bytes).map_err(|_| Problem::NotUtf8),
        Raw::Bad(problem) => Err(problem),
    }
}

/// Counts the bytes read from a file into a shared counter, and tells a failed read of the
/// file itself (an I/O error: the machine's problem) from a failed decompression of what was
/// read (the data's problem).
struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.counter.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// A decompressed byte stream of a text or JSON Lines file.
struct Stream {
    reader: Box<dyn Read + Send>,
    errors: StreamErrors,
}

/// What a [`Stream`] needs to sort its read errors.
struct StreamErrors {
    compression: Compression,
    read_failed: Arc<AtomicBool>,
    path: PathBuf,
}

impl Stream {
    fn open(file: &InputFile, counter: &Arc<AtomicU64>) -> Result<Self> {
        let raw = fs::File::open(&file.path).map_err(|e| DataError::io(&file.path, e))?;
        let read_failed = Arc::new(AtomicBool::new(false));
        let counted = CountingReader {
            inner: raw,
            counter: Arc::clone(counter),
            failed: Arc::clone(&read_failed),
        };
        let reader: Box<dyn Read + Send> = match file.compression {
            Compression::None => Box::new(counted),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(counted)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(counted)
                    .map_err(|e| DataError::io(&file.path, e))?,
            ),
        };
        Ok(Stream {
            reader,
            errors: StreamErrors {
                compression: file.compression,
                read_failed,
                path: file.path.clone(),
            },
        })
    }

    /// Hands each line (numbered from 1, with its line ending) to `record` and emits the record
    /// it makes of it, if any. `None` at the end of the stream; otherwise how the reading stopped
    /// early: `emit` broke, or the stream stopped decompressing (a bad record at the line being
    /// read ends the file).
    fn for_each_line(
        self,
        emit: &mut dyn FnMut(Location, Raw) -> ControlFlow<()>,
        mut record: impl FnMut(u64, &mut Vec<u8>) -> Option<(Location, Raw)>,
    ) -> Result<Option<ControlFlow<()>>> {
        let Stream { reader, errors } = self;
        let mut reader = BufReader::with_capacity(1 << 20, reader);
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return Ok(None),
                Ok(_) => number += 1,
                Err(e) => {
                    let problem = errors.classify(e, REST_SKIPPED)?;
                    return Ok(Some(emit(Location::Line(number + 1), Raw::Bad(problem))));
                }
            }
            if let Some((location, raw)) = record(number, &mut line) {
                if emit(location, raw).is_break() {
                    return Ok(Some(ControlFlow::Break(())));
                }
            }
        }
    }
}

impl StreamErrors {
    /// Sorts a read error: the file could not be read (an error to return), or what was read
    /// does not decompress (a bad record whose message ends with `consequence`).
    fn classify(&self, e: io::Error, consequence: &str) -> Result<Problem> {
        if self.read_failed.load(Ordering::Relaxed) || self.compression == Compression::None {
            return Err(DataError::io(&self.path, e));
        }
        let codec = match self.compression {
            Compression::Gzip => "gzip",
            _ => "zstd",
        };
        Ok(Problem::Unreadable(format!(
            "corrupt or truncated {codec} data ({e}){consequence}"
        )))
    }
}

/// What happens to a file whose compressed stream breaks while it is read record by record.
pub(crate) const REST_SKIPPED: &str = "; the rest of the file is skipped";

/// Reads every record of `file` (number `index` in the input list) in order and hands each to
/// `sink`, which can stop the reading. Adds the bytes read from disk to `bytes_read`. Errors are
/// failures to read the file (I/O) and a parquet file without the text column; everything wrong
/// with the data itself becomes a [`Raw::Bad`] record.
pub(crate) fn read_file(
    file: &InputFile,
    index: usize,
    text_field: &str,
    bytes_read: &Arc<AtomicU64>,
    sink: &mut dyn FnMut(RawRecord) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let before = bytes_read.load(Ordering::Relaxed);
    let mut emit = |location: Location, raw: Raw| {
        sink(RawRecord {
            file: index,
            location,
            raw,
        })
    };
    let flow = match file.format {
        InputFormat::Text => text::read(Stream::open(file, bytes_read)?, &mut emit)?,
        InputFormat::JsonLines => json_lines::read(Stream::open(file, bytes_read)?, &mut emit)?,
        InputFormat::Parquet => parquet_file::read(file, text_field, bytes_read, &mut emit)?,
    };
    // Whatever part of the file a stop or an unreadable stream left unread counts as done.
    let counted = bytes_read.load(Ordering::Relaxed) - before;
    bytes_read.fetch_add(file.size.saturating_sub(counted), Ordering::Relaxed);
    Ok(flow)
}

/// The whole text of one file the user named, for evaluation on it: a text file (compressed or
/// not) as it is, JSON Lines and parquet records' `text_field` strings joined by blank lines,
/// in order. The first bad record is an error naming the file and its place.
pub fn read_whole_text(path: &Path, text_field: &str) -> Result<String> {
    let size = fs::metadata(path)
        .map_err(|e| DataError::io(path, e))?
        .len();
    let file = InputFile::named(path, size);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let bad = |location: Location, problem: Problem| {
        DataError::BadTextRecord(BadRecord {
            path: path.to_path_buf(),
            location,
            problem,
        })
    };
    if file.format == InputFormat::Text {
        let mut stream = Stream::open(&file, &bytes_read)?;
        let mut bytes = Vec::new();
        if let Err(e) = stream.reader.read_to_end(&mut bytes) {
            return Err(bad(Location::File, stream.errors.classify(e, "")?));
        }
        return String::from_utf8(bytes).map_err(|_| bad(Location::File, Problem::NotUtf8));
    }
    let mut documents = Vec::new();
    let mut first_bad = None;
    // A stop is the first bad record, returned below.
    let _stopped = read_file(
        &file,
        0,
        text_field,
        &bytes_read,
        &mut |record| match parse(record.raw, text_field) {
            Ok(text) => {
                documents.push(text);
                ControlFlow::Continue(())
            }
            Err(problem) => {
                first_bad = Some(bad(record.location, problem));
                ControlFlow::Break(())
            }
        },
    )?;
    match first_bad {
        Some(error) => Err(error),
        None => Ok(documents.join("\n\n")),
    }
}

#[cfg(test)]
pub(crate) mod tests;
