//! Document starts: where each document's first token lies in a token shard, kept by `prepare`
//! in a file beside each shard (`train/train-000000.docs` for `train/train-000000.tokens`), so
//! that training can keep documents apart inside its windows. Documents run on from one shard
//! file into the next (`prepare` cuts shards every `shard_tokens` tokens), so a shard's position
//! 0 begins a document only when its file lists 0.
//!
//! Layout, all little-endian, a 32-byte header then the starts:
//!
//! | bytes  | field                                                               |
//! |--------|---------------------------------------------------------------------|
//! | 0..8   | magic `GLADOCST`                                                    |
//! | 8..12  | format version (u32, currently 1)                                   |
//! | 12..16 | header size in bytes (u32, 32; the starts begin here)               |
//! | 16..24 | number of starts (u64)                                              |
//! | 24..32 | tokens of the shard they belong to (u64)                            |
//! | 32..   | the starts: u64 positions in the shard, increasing, each below that |
//!
//! Files are memory-mapped; the starts inside a window are found by binary search.

use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::shard::{check_size, header_size, read_u64, HeaderedWriter, Storage};

/// First 8 bytes of every document-starts file.
pub const MAGIC: [u8; 8] = *b"GLADOCST";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header this build writes.
pub const HEADER_BYTES: usize = 32;
/// File extension of document-starts files.
pub const EXTENSION: &str = "docs";
/// Bytes per start.
const WIDTH: usize = 8;

/// One shard's document starts, from a memory-mapped file (or memory).
#[derive(Debug)]
pub struct DocumentStarts {
    path: PathBuf,
    storage: Storage,
    offset: usize,
    len: u64,
    shard_tokens: u64,
}

impl DocumentStarts {
    /// Opens and maps a document-starts file, checking its magic, version, header and size (not
    /// its starts: see [`DocumentStarts::check_order`] and [`DocumentStarts::sha256`]).
    pub fn open(path: &Path) -> Result<Self> {
        let storage = Storage::map(path)?;
        let bytes = storage.bytes();
        if !bytes.starts_with(&MAGIC) {
            return Err(DataError::BadDocumentStarts {
                path: path.to_path_buf(),
                what: format!(
                    "wrong magic bytes {:02x?}: not a glatrain document-starts file (expected {:?})",
                    &bytes[..bytes.len().min(8)],
                    String::from_utf8_lossy(&MAGIC)
                ),
            });
        }
        let header = header_size(path, bytes, FORMAT_VERSION, HEADER_BYTES)?;
        let len = read_u64(bytes, 16);
        let shard_tokens = read_u64(bytes, 24);
        check_size(
            path,
            header as u64,
            len,
            "starts",
            WIDTH as u64,
            bytes.len() as u64,
        )?;
        Ok(DocumentStarts {
            path: path.to_path_buf(),
            storage,
            offset: header,
            len,
            shard_tokens,
        })
    }

    /// In-memory starts of a shard of `shard_tokens` tokens; `name` stands in for the path in
    /// messages. Errors unless `starts` increase and stay below `shard_tokens`.
    pub fn from_starts(name: &str, starts: &[u64], shard_tokens: u64) -> Result<Self> {
        let len = starts.len() as u64;
        let mut bytes = header(len, shard_tokens).to_vec();
        for s in starts {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        let built = DocumentStarts {
            path: PathBuf::from(name),
            storage: Storage::Owned(bytes),
            offset: HEADER_BYTES,
            len,
            shard_tokens,
        };
        built.check_order()?;
        Ok(built)
    }

    /// The file (or in-memory name) the starts were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of documents that begin in the shard.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no document begins in the shard (it lies inside one document).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens of the shard the starts belong to, as the header records them.
    pub fn shard_tokens(&self) -> u64 {
        self.shard_tokens
    }

    /// Start `index`.
    ///
    /// # Panics
    /// If `index >= len()`.
    pub fn get(&self, index: u64) -> u64 {
        assert!(
            index < self.len,
            "{}: start {index} of {}",
            self.path.display(),
            self.len
        );
        read_u64(self.storage.bytes(), self.offset + index as usize * WIDTH)
    }

    /// The starts inside `range` of the shard's positions, in order.
    pub fn in_range(&self, range: Range<u64>) -> impl Iterator<Item = u64> + '_ {
        // Binary search for the first start at or after `range.start`.
        let (mut low, mut high) = (0, self.len);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.get(middle) < range.start {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        (low..self.len)
            .map(|i| self.get(i))
            .take_while(move |&s| s < range.end)
    }

    /// Hex sha256 of the whole file, header included (what `sha256sum` prints).
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.storage.bytes()))
    }

    /// Errors on the first start that does not exceed the one before it or is not below the
    /// shard's token count, naming the file and the start's index.
    pub fn check_order(&self) -> Result<()> {
        let mut previous = None;
        for index in 0..self.len {
            let start = self.get(index);
            let what = if previous.is_some_and(|p| start <= p) {
                format!("start {index} is {start}, not above the one before it")
            } else if start >= self.shard_tokens {
                format!(
                    "start {index} is {start}, past the shard's {} tokens",
                    self.shard_tokens
                )
            } else {
                previous = Some(start);
                continue;
            };
            return Err(DataError::BadDocumentStarts {
                path: self.path.clone(),
                what,
            });
        }
        Ok(())
    }
}

/// The 32-byte header of a document-starts file.
fn header(len: u64, shard_tokens: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    header[16..24].copy_from_slice(&len.to_le_bytes());
    header[24..32].copy_from_slice(&shard_tokens.to_le_bytes());
    header
}

/// What [`DocumentStartsWriter::finish`] reports about the file it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrittenStarts {
    pub starts: u64,
    pub sha256: String,
}

/// A document-starts file written as its shard is.
pub(crate) struct DocumentStartsWriter {
    file: HeaderedWriter,
    len: u64,
}

impl DocumentStartsWriter {
    /// Creates the file at `path`.
    pub(crate) fn create(path: &Path) -> Result<Self> {
        Ok(DocumentStartsWriter {
            file: HeaderedWriter::create(path, &header(0, 0))?,
            len: 0,
        })
    }

    /// Appends a start (above the previous one).
    pub(crate) fn push(&mut self, start: u64) -> Result<()> {
        self.file.write(&start.to_le_bytes())?;
        self.len += 1;
        Ok(())
    }

    /// Writes the header for a shard of `shard_tokens` tokens, flushes the file to disk and
    /// returns its start count and sha256.
    pub(crate) fn finish(self, shard_tokens: u64) -> Result<WrittenStarts> {
        let header = header(self.len, shard_tokens);
        Ok(WrittenStarts {
            starts: self.len,
            sha256: self.file.finish(&header)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;

    fn write(path: &Path, starts: &[u64], shard_tokens: u64) -> WrittenStarts {
        let mut writer = DocumentStartsWriter::create(path).unwrap();
        for &s in starts {
            writer.push(s).unwrap();
        }
        writer.finish(shard_tokens).unwrap()
    }

    #[test]
    fn written_starts_read_back_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.docs");
        let written = write(&path, &[0, 7, 300], 301);
        assert_eq!(written.starts, 3);
        let b = fs::read(&path).unwrap();
        assert_eq!(&b[0..8], b"GLADOCST");
        assert_eq!(b[8..12], 1u32.to_le_bytes());
        assert_eq!(b[12..16], 32u32.to_le_bytes());
        assert_eq!(b[16..24], 3u64.to_le_bytes());
        assert_eq!(b[24..32], 301u64.to_le_bytes());
        assert_eq!(b[40..48], 7u64.to_le_bytes());
        assert_eq!(b.len(), 32 + 3 * 8);
        let starts = DocumentStarts::open(&path).unwrap();
        assert_eq!((starts.len(), starts.shard_tokens()), (3, 301));
        assert_eq!(starts.sha256(), written.sha256);
        starts.check_order().unwrap();
        let in_memory = DocumentStarts::from_starts("memory", &[0, 7, 300], 301).unwrap();
        assert_eq!(in_memory.sha256(), written.sha256);

        // A shard inside one document has no starts.
        let empty = dir.path().join("empty.docs");
        write(&empty, &[], 50);
        let starts = DocumentStarts::open(&empty).unwrap();
        assert!(starts.is_empty());
        assert_eq!(starts.in_range(0..50).count(), 0);
    }

    #[test]
    fn in_range_finds_the_starts_of_any_window() {
        let all = [0u64, 1, 5, 6, 20, 33, 34, 99];
        let starts = DocumentStarts::from_starts("memory", &all, 100).unwrap();
        for begin in 0..=100 {
            for end in begin..=100 {
                let want: Vec<u64> = all
                    .iter()
                    .copied()
                    .filter(|s| (begin..end).contains(s))
                    .collect();
                let got: Vec<u64> = starts.in_range(begin..end).collect();
                assert_eq!(got, want, "{begin}..{end}");
            }
        }
    }

    #[test]
    fn bad_files_name_themselves_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let good_path = dir.path().join("good.docs");
        write(&good_path, &[2, 4, 9], 10);
        let good = fs::read(&good_path).unwrap();
        let open = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            let err = DocumentStarts::open(&path)
                .and_then(|s| s.check_order())
                .unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            let msg = err.to_string();
            assert!(msg.starts_with(&path.display().to_string()), "{msg}");
            msg
        };
        let with = |at: usize, value: &[u8]| {
            let mut bytes = good.clone();
            bytes[at..at + value.len()].copy_from_slice(value);
            bytes
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("truncated.docs", good[..good.len() - 1].to_vec(), "size 55 bytes does not match its header: 32 header bytes + 3 starts x 8 bytes = 56 bytes"),
            ("magic.docs", with(0, b"X"), "wrong magic bytes"),
            ("version.docs", with(8, &2u32.to_le_bytes()), "format version 2 is not supported"),
            ("short.docs", good[..20].to_vec(), "bad header: the file is 20 bytes, shorter than the 32-byte header"),
            ("order.docs", with(40, &2u64.to_le_bytes()), "start 1 is 2, not above the one before it"),
            ("past.docs", with(48, &10u64.to_le_bytes()), "start 2 is 10, past the shard's 10 tokens"),
            ("empty.docs", Vec::new(), "wrong magic bytes []"),
        ];
        for (name, bytes, needle) in cases {
            let msg = open(name, &bytes);
            assert!(msg.contains(needle), "{name}: {msg}");
        }
        let err = DocumentStarts::from_starts("memory", &[3, 3], 10).unwrap_err();
        assert!(err.to_string().contains("start 1 is 3"), "{err}");
    }
}
