//! The crate's error type: every variant names the file (or the embedded corpus) it is about.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong reading, writing or tokenizing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory the user named does not exist.
    #[error("{}: no such file or directory", path.display())]
    Missing { path: PathBuf },

    /// A config's `data.train` / `data.valid` names a path that does not exist; `message` names
    /// the key and value, `remedy` the commands that make the data or do without it.
    #[error("{origin}: {message}\n{remedy}")]
    MissingData {
        origin: String,
        message: String,
        remedy: String,
    },

    /// An I/O failure other than a missing file (disk full, permissions, ...).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the shard magic and is not a headerless `.bin`.
    #[error(
        "{}: wrong magic bytes {found:02x?}: not a glatrain token shard (expected {:?}), \
         and only files ending in .bin are read as headerless nanoGPT u16 tokens",
        path.display(),
        String::from_utf8_lossy(&crate::shard::MAGIC)
    )]
    BadMagic { path: PathBuf, found: Vec<u8> },

    /// A shard, document-starts file or manifest written by a format version this build cannot
    /// read; `supported` is the newest it reads.
    #[error("{}: format version {found} is not supported (this build reads versions up to {supported})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    /// A header field with an impossible value.
    #[error("{}: bad header: {what}", path.display())]
    BadHeader { path: PathBuf, what: String },

    /// The file size does not match the count in its header (truncated or padded).
    #[error(
        "{}: size {actual} bytes does not match its header: {header_bytes} header bytes + \
         {count} {unit} x {width} bytes = {expected} bytes (truncated or corrupted)",
        path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        header_bytes: u64,
        /// Items the header counts, of `width` bytes each: `unit` (tokens, starts).
        count: u64,
        unit: &'static str,
        width: u64,
        expected: u64,
        actual: u64,
    },

    /// The shard's sha256 differs from the one the manifest recorded.
    #[error("{}: sha256 {actual} does not match the manifest's {expected}", path.display())]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    /// A token id that does not fit the vocabulary.
    #[error("{}: token {token} at position {position} is out of range for vocab size {vocab_size}", path.display())]
    TokenOutOfRange {
        path: PathBuf,
        position: u64,
        token: u32,
        vocab_size: u32,
    },

    /// A document-starts file that is not one, is truncated, or whose starts are out of order or
    /// outside its shard.
    #[error("{}: bad document starts: {what}", path.display())]
    BadDocumentStarts { path: PathBuf, what: String },

    /// A file, split or corpus with no tokens (or no text).
    #[error("{}: empty: {what}", path.display())]
    Empty { path: PathBuf, what: String },

    /// manifest.json is unreadable JSON or disagrees with the files it lists.
    #[error("{}: {what}", path.display())]
    Manifest { path: PathBuf, what: String },

    /// A record of an input file that is not a document, when `prepare` stops at bad records.
    #[error(
        "{0}\n(to skip bad records instead, counting and listing them, pass --on-bad-record skip)"
    )]
    BadRecord(crate::inputs::BadRecord),

    /// A record of a file read whole (evaluation text) that is not a document.
    #[error("{0}")]
    BadTextRecord(crate::inputs::BadRecord),

    /// A parquet input without the text column, or whose text column does not hold strings.
    #[error("{}: column {field:?}: {what}", path.display())]
    ParquetColumn {
        path: PathBuf,
        field: String,
        what: String,
    },

    /// A directory given to `prepare` that holds no input files.
    #[error(
        "{}: no input files found (.txt, .jsonl, .parquet, or these compressed: .txt.gz, \
         .jsonl.gz, .jsonl.zst, .json.gz, .json.zst, ...)",
        path.display()
    )]
    NoInputs { path: PathBuf },

    /// `prepare` was interrupted (Ctrl-C); nothing was written.
    #[error("interrupted: {} was not written", path.display())]
    Interrupted { path: PathBuf },

    /// `prepare` refuses to overwrite an existing output directory.
    #[error("{}: output directory already exists; remove it or choose another --out", path.display())]
    OutputExists { path: PathBuf },

    /// An argument out of its range (e.g. `prepare`'s valid fraction).
    #[error("{name} = {value}: {what}")]
    InvalidArgument {
        name: &'static str,
        value: String,
        what: String,
    },

    /// A malformed tokenizer spec (`bpe:100`, `bpe:x`, empty); specs are `byte`, `bpe:<vocab>` or a path.
    #[error("tokenizer {spec:?}: {what}")]
    TokenizerSpec { spec: String, what: String },

    /// A tokenizer.json that cannot be read or parsed.
    #[error("{}: cannot load tokenizer: {what}", path.display())]
    TokenizerFile { path: PathBuf, what: String },

    /// Encoding, decoding or training failed inside the tokenizers crate.
    #[error("{context}: tokenizer error: {what}")]
    Tokenizer { context: String, what: String },

    /// Loader settings that do not fit the token source (e.g. seq_len longer than the data).
    #[error("{source_name}: {what}")]
    Loader { source_name: String, what: String },

    /// A saved loader state that belongs to another source or loader configuration.
    #[error("{source_name}: cannot resume loader: {what}")]
    LoaderState { source_name: String, what: String },

    /// The embedded corpus failed to decompress (a broken build, not a user error).
    #[error("embedded corpus {name}: {what}")]
    Embedded { name: &'static str, what: String },
}

impl DataError {
    /// True when the error comes from the user's data, files, flags or checkpoint (the CLI exits 2);
    /// false for failures of the machine or of this program (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            DataError::Io { .. }
            | DataError::Tokenizer { .. }
            | DataError::Embedded { .. }
            | DataError::Interrupted { .. } => false,
            DataError::Missing { .. }
            | DataError::MissingData { .. }
            | DataError::BadMagic { .. }
            | DataError::UnsupportedVersion { .. }
            | DataError::BadHeader { .. }
            | DataError::BadDocumentStarts { .. }
            | DataError::SizeMismatch { .. }
            | DataError::ChecksumMismatch { .. }
            | DataError::TokenOutOfRange { .. }
            | DataError::Empty { .. }
            | DataError::Manifest { .. }
            | DataError::BadRecord(_)
            | DataError::BadTextRecord(_)
            | DataError::ParquetColumn { .. }
            | DataError::NoInputs { .. }
            | DataError::OutputExists { .. }
            | DataError::InvalidArgument { .. }
            | DataError::TokenizerSpec { .. }
            | DataError::TokenizerFile { .. }
            | DataError::Loader { .. }
            | DataError::LoaderState { .. } => true,
        }
    }

    /// Wraps an I/O error on `path`, turning "not found" into [`DataError::Missing`].
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_becomes_missing_and_is_bad_input() {
        let err = DataError::io(
            Path::new("x/y.tokens"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert!(matches!(err, DataError::Missing { .. }));
        assert!(err.is_bad_input());
        assert_eq!(err.to_string(), "x/y.tokens: no such file or directory");
    }

    #[test]
    fn other_io_errors_are_not_bad_input() {
        let err = DataError::io(Path::new("out/a"), std::io::Error::other("disk full"));
        assert!(!err.is_bad_input());
        assert!(err.to_string().starts_with("out/a: "));
    }
}
