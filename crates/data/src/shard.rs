//! Token shard files: the glatrain format (written by `prepare`), plus reading llm.c shards and
//! nanoGPT's headerless u16 `.bin` files. Files are memory-mapped, never read whole.
//!
//! glatrain shard layout, all little-endian, 64-byte header then the tokens:
//!
//! | bytes  | field                                             |
//! |--------|---------------------------------------------------|
//! | 0..8   | magic `GLATOKNS`                                  |
//! | 8..12  | format version (u32, currently 1)                 |
//! | 12..16 | header size in bytes (u32, 64; tokens start here) |
//! | 16..20 | bytes per token (u32: 2 = u16, 4 = u32)           |
//! | 20..24 | vocab size (u32; every token is below it)         |
//! | 24..32 | token count (u64)                                 |
//! | 32..64 | zero (reserved)                                   |

use std::fs;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// First 8 bytes of every glatrain shard.
pub const MAGIC: [u8; 8] = *b"GLATOKNS";
/// The shard format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header this build writes.
pub const HEADER_BYTES: usize = 64;
/// File extension of glatrain shards (`.bin` is reserved for headerless nanoGPT files).
pub const SHARD_EXTENSION: &str = "tokens";

/// llm.c's shard magic (first i32 of a 256 x i32 header; version 1 = u16 tokens, 2 = u32).
const LLMC_MAGIC: u32 = 20240520;
const LLMC_HEADER_BYTES: u64 = 1024;

/// How token ids are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// u16 when every id of a `vocab_size` vocab fits, else u32.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    fn from_width(width: u32) -> Option<Self> {
        match width {
            2 => Some(TokenDtype::U16),
            4 => Some(TokenDtype::U32),
            _ => None,
        }
    }
}

/// Which on-disk format a shard was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFormat {
    /// glatrain's own format (this module's header).
    Glatrain,
    /// llm.c: 1024-byte header with magic 20240520, no vocab size.
    LlmC,
    /// nanoGPT: a `.bin` file of bare u16 tokens.
    Headerless,
    /// Built in memory (e.g. from the embedded corpus); never on disk.
    InMemory,
}

/// The bytes of a file: memory-mapped, or built in memory.
pub(crate) enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self {
            Storage::Mapped(_) => "mapped",
            Storage::Owned(_) => "in memory",
        };
        write!(f, "{} bytes {how}", self.bytes().len())
    }
}

impl Storage {
    /// Maps the file at `path` read-only.
    pub(crate) fn map(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        if file.metadata().map_err(|e| DataError::io(path, e))?.len() == 0 {
            // Nothing to map (and some platforms refuse empty maps).
            return Ok(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this process. Dataset files are written
        // once by `prepare` (into a temporary directory that is then renamed) and never modified
        // in place; a file changed by another program while mapped would show changed contents
        // (or SIGBUS if truncated), which is why the documentation asks not to edit datasets
        // during training.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        Ok(Storage::Mapped(map))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One shard: a run of token ids backed by a memory-mapped file (or memory).
pub struct Shard {
    path: PathBuf,
    storage: Storage,
    offset: usize,
    dtype: TokenDtype,
    len: u64,
    vocab_size: Option<u32>,
    format: ShardFormat,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("dtype", &self.dtype)
            .field("len", &self.len)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl Shard {
    /// Opens and maps a shard, checking its magic, version, header and size (not its contents:
    /// see [`Shard::sha256`] and [`Shard::check_range`]). glatrain shards are recognised by their
    /// magic, llm.c shards by theirs, and any other file ending in `.bin` is read as headerless
    /// u16 tokens; everything else is [`DataError::BadMagic`].
    pub fn open(path: &Path) -> Result<Self> {
        let storage = Storage::map(path)?;
        let bytes = storage.bytes();
        let size = bytes.len() as u64;
        if size == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                what: "the file is 0 bytes".into(),
            });
        }
        let layout = if bytes.starts_with(&MAGIC) {
            parse_glatrain_header(path, bytes)?
        } else if bytes.len() >= 12 && read_u32(bytes, 0) == LLMC_MAGIC {
            parse_llmc_header(path, bytes)?
        } else if path.extension().and_then(|e| e.to_str()) == Some("bin") {
            headerless_layout(path, size)?
        } else {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                found: bytes[..bytes.len().min(8)].to_vec(),
            });
        };
        if layout.len == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                what: "the shard holds 0 tokens".into(),
            });
        }
        Ok(Shard {
            path: path.to_path_buf(),
            storage,
            offset: layout.offset,
            dtype: layout.dtype,
            len: layout.len,
            vocab_size: layout.vocab_size,
            format: layout.format,
        })
    }

    /// Builds an in-memory shard; `name` stands in for the path in messages.
    pub fn from_tokens(name: &str, tokens: &[u32], vocab_size: u32) -> Result<Self> {
        let path = PathBuf::from(name);
        if tokens.is_empty() {
            return Err(DataError::Empty {
                path,
                what: "no tokens".into(),
            });
        }
        check_tokens(&path, 0, tokens, vocab_size)?;
        let dtype = TokenDtype::for_vocab(vocab_size);
        let len = tokens.len() as u64;
        let mut bytes = header(dtype, vocab_size, len).to_vec();
        encode_tokens(&mut bytes, dtype, tokens);
        Ok(Shard {
            path,
            dtype,
            len,
            storage: Storage::Owned(bytes),
            offset: HEADER_BYTES,
            vocab_size: Some(vocab_size),
            format: ShardFormat::InMemory,
        })
    }

    /// The file (or in-memory name) this shard was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: opening an empty shard is an error.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Vocab size from the header; `None` for headerless and llm.c files, which do not record it.
    pub fn vocab_size(&self) -> Option<u32> {
        self.vocab_size
    }

    /// Storage type of the tokens.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Which format the file was in.
    pub fn format(&self) -> ShardFormat {
        self.format
    }

    fn body(&self) -> &[u8] {
        let end = self.offset + self.len as usize * self.dtype.width();
        &self.storage.bytes()[self.offset..end]
    }

    /// Token `index`.
    ///
    /// # Panics
    /// If `index >= len()`.
    pub fn get(&self, index: u64) -> u32 {
        assert!(
            index < self.len,
            "{}: token {index} of {}",
            self.path.display(),
            self.len
        );
        let w = self.dtype.width();
        let at = index as usize * w;
        decode(self.dtype, &self.body()[at..at + w])
    }

    /// Copies tokens `start..start + out.len()` into `out` as i64.
    ///
    /// # Panics
    /// If the range runs past `len()`.
    pub fn copy_to(&self, start: u64, out: &mut [i64]) {
        let w = self.dtype.width();
        let from = start as usize * w;
        let bytes = &self.body()[from..from + out.len() * w];
        for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(w)) {
            *dst = i64::from(decode(self.dtype, src));
        }
    }

    /// Hex sha256 of the whole file, header included (what `sha256sum` prints).
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.storage.bytes()))
    }

    /// Errors on the first token `>= vocab_size`, naming the file and the position.
    pub fn check_range(&self, vocab_size: u32) -> Result<()> {
        let w = self.dtype.width();
        let hit = self
            .body()
            .chunks_exact(w)
            .map(|b| decode(self.dtype, b))
            .enumerate()
            .find(|&(_, t)| t >= vocab_size);
        match hit {
            None => Ok(()),
            Some((position, token)) => Err(DataError::TokenOutOfRange {
                path: self.path.clone(),
                position: position as u64,
                token,
                vocab_size,
            }),
        }
    }
}

fn decode(dtype: TokenDtype, b: &[u8]) -> u32 {
    match dtype {
        TokenDtype::U16 => u32::from(u16::from_le_bytes([b[0], b[1]])),
        TokenDtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

struct Layout {
    offset: usize,
    dtype: TokenDtype,
    len: u64,
    vocab_size: Option<u32>,
    format: ShardFormat,
}

fn bad_header(path: &Path, what: String) -> DataError {
    DataError::BadHeader {
        path: path.to_path_buf(),
        what,
    }
}

/// Errors unless the file's `actual` size is `header` bytes plus `count` items (`unit`) of
/// `width` bytes.
pub(crate) fn check_size(
    path: &Path,
    header: u64,
    count: u64,
    unit: &'static str,
    width: u64,
    actual: u64,
) -> Result<()> {
    let expected = count.checked_mul(width).and_then(|b| b.checked_add(header));
    if expected == Some(actual) {
        return Ok(());
    }
    Err(DataError::SizeMismatch {
        path: path.to_path_buf(),
        header_bytes: header,
        count,
        unit,
        width,
        expected: expected.unwrap_or(u64::MAX),
        actual,
    })
}

/// The header size of a file in one of glatrain's formats with a header (shards, document
/// starts), whose magic the caller has checked: bytes 8..12 hold its format version, which must
/// be `version` (checked first: another version may lay out the rest differently), and 12..16
/// the header size, at least `header_bytes` (the size this build writes).
pub(crate) fn header_size(
    path: &Path,
    bytes: &[u8],
    version: u32,
    header_bytes: usize,
) -> Result<usize> {
    if bytes.len() < 12 {
        return Err(bad_header(
            path,
            format!("the file is {} bytes, shorter than the header", bytes.len()),
        ));
    }
    let found = read_u32(bytes, 8);
    if found != version {
        return Err(DataError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            supported: version,
        });
    }
    if bytes.len() < header_bytes {
        return Err(bad_header(
            path,
            format!(
                "the file is {} bytes, shorter than the {header_bytes}-byte header",
                bytes.len()
            ),
        ));
    }
    let header = read_u32(bytes, 12) as usize;
    if header < header_bytes {
        return Err(bad_header(
            path,
            format!("header size {header} is below {header_bytes}"),
        ));
    }
    Ok(header)
}

fn parse_glatrain_header(path: &Path, bytes: &[u8]) -> Result<Layout> {
    let header = header_size(path, bytes, FORMAT_VERSION, HEADER_BYTES)?;
    let width = read_u32(bytes, 16);
    let vocab = read_u32(bytes, 20);
    let tokens = read_u64(bytes, 24);
    let dtype = TokenDtype::from_width(width)
        .ok_or_else(|| bad_header(path, format!("bytes per token = {width}, expected 2 or 4")))?;
    if vocab == 0 || (dtype == TokenDtype::U16 && vocab > 1 << 16) {
        return Err(bad_header(
            path,
            format!("vocab size {vocab} does not fit {dtype:?} tokens"),
        ));
    }
    check_size(
        path,
        header as u64,
        tokens,
        "tokens",
        u64::from(width),
        bytes.len() as u64,
    )?;
    Ok(Layout {
        offset: header,
        dtype,
        len: tokens,
        vocab_size: Some(vocab),
        format: ShardFormat::Glatrain,
    })
}

fn parse_llmc_header(path: &Path, bytes: &[u8]) -> Result<Layout> {
    if (bytes.len() as u64) < LLMC_HEADER_BYTES {
        return Err(bad_header(
            path,
            format!(
                "llm.c shard of {} bytes is shorter than its 1024-byte header",
                bytes.len()
            ),
        ));
    }
    let version = read_u32(bytes, 4);
    let dtype = match version {
        1 => TokenDtype::U16,
        2 => TokenDtype::U32,
        _ => {
            return Err(DataError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: 2,
            })
        }
    };
    let tokens = u64::from(read_u32(bytes, 8));
    check_size(
        path,
        LLMC_HEADER_BYTES,
        tokens,
        "tokens",
        dtype.width() as u64,
        bytes.len() as u64,
    )?;
    Ok(Layout {
        offset: LLMC_HEADER_BYTES as usize,
        dtype,
        len: tokens,
        vocab_size: None,
        format: ShardFormat::LlmC,
    })
}

fn headerless_layout(path: &Path, size: u64) -> Result<Layout> {
    check_size(path, 0, size / 2, "tokens", 2, size)?;
    Ok(Layout {
        offset: 0,
        dtype: TokenDtype::U16,
        len: size / 2,
        vocab_size: None,
        format: ShardFormat::Headerless,
    })
}

/// The 64-byte header of a glatrain shard.
fn header(dtype: TokenDtype, vocab_size: u32, len: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(dtype.width() as u32).to_le_bytes());
    header[20..24].copy_from_slice(&vocab_size.to_le_bytes());
    header[24..32].copy_from_slice(&len.to_le_bytes());
    header
}

/// Checks that every token is below `vocab_size`; `name` and `offset` (the position of
/// `tokens[0]` in the shard) go into the error.
fn check_tokens(name: &Path, offset: u64, tokens: &[u32], vocab_size: u32) -> Result<()> {
    match tokens.iter().position(|&t| t >= vocab_size) {
        None => Ok(()),
        Some(pos) => Err(DataError::TokenOutOfRange {
            path: name.to_path_buf(),
            position: offset + pos as u64,
            token: tokens[pos],
            vocab_size,
        }),
    }
}

/// Appends `tokens` to `out` in `dtype`'s little-endian encoding.
fn encode_tokens(out: &mut Vec<u8>, dtype: TokenDtype, tokens: &[u32]) {
    out.reserve(tokens.len() * dtype.width());
    match dtype {
        TokenDtype::U16 => {
            for &t in tokens {
                out.extend_from_slice(&(t as u16).to_le_bytes());
            }
        }
        TokenDtype::U32 => {
            for &t in tokens {
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
    }
}

/// What [`ShardWriter::finish`] reports about the file it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrittenShard {
    pub tokens: u64,
    pub sha256: String,
}

/// A file written behind a placeholder header that [`HeaderedWriter::finish`] replaces with the
/// real one: the body goes through a buffer, and the sha256 is computed by reading the finished
/// file back, so memory stays at the buffer however large the file is.
pub(crate) struct HeaderedWriter {
    path: PathBuf,
    file: BufWriter<fs::File>,
}

impl HeaderedWriter {
    /// Creates the file at `path` (which must not be read until [`HeaderedWriter::finish`]),
    /// starting with `placeholder`.
    pub(crate) fn create(path: &Path, placeholder: &[u8]) -> Result<Self> {
        let file = fs::File::create(path).map_err(|e| DataError::io(path, e))?;
        let mut writer = HeaderedWriter {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(1 << 20, file),
        };
        writer.write(placeholder)?;
        Ok(writer)
    }

    /// The file being written.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes` to the body.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| DataError::io(&self.path, e))
    }

    /// Writes `header` over the placeholder, flushes the file to disk and returns its hex sha256.
    pub(crate) fn finish(self, header: &[u8]) -> Result<String> {
        let path = &self.path;
        let io = |e| DataError::io(path, e);
        let mut file = self.file.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(header).map_err(io)?;
        file.sync_all().map_err(io)?;
        let mut hasher = Sha256::new();
        let mut reader = fs::File::open(path).map_err(io)?;
        std::io::copy(&mut reader, &mut hasher).map_err(io)?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// A shard written to disk as its tokens arrive.
pub(crate) struct ShardWriter {
    file: HeaderedWriter,
    dtype: TokenDtype,
    vocab_size: u32,
    len: u64,
    encoded: Vec<u8>,
}

impl ShardWriter {
    /// Creates the file at `path` (which must not be read until [`ShardWriter::finish`]).
    pub(crate) fn create(path: &Path, vocab_size: u32) -> Result<Self> {
        let dtype = TokenDtype::for_vocab(vocab_size);
        Ok(ShardWriter {
            file: HeaderedWriter::create(path, &header(dtype, vocab_size, 0))?,
            dtype,
            vocab_size,
            len: 0,
            encoded: Vec::new(),
        })
    }

    /// Tokens written so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends tokens (each must be below the vocab size).
    pub(crate) fn push(&mut self, tokens: &[u32]) -> Result<()> {
        check_tokens(self.file.path(), self.len, tokens, self.vocab_size)?;
        self.encoded.clear();
        encode_tokens(&mut self.encoded, self.dtype, tokens);
        self.file.write(&self.encoded)?;
        self.len += tokens.len() as u64;
        Ok(())
    }

    /// Writes the header, flushes the file to disk and returns its token count and sha256.
    pub(crate) fn finish(self) -> Result<WrittenShard> {
        let header = header(self.dtype, self.vocab_size, self.len);
        Ok(WrittenShard {
            tokens: self.len,
            sha256: self.file.finish(&header)?,
        })
    }
}

/// Writes `tokens` as one glatrain shard at `path` (dtype chosen from `vocab_size`) and returns its
/// hex sha256. Every token must be below `vocab_size`.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: u32) -> Result<String> {
    let mut writer = ShardWriter::create(path, vocab_size)?;
    if let Err(e) = writer.push(tokens) {
        drop(writer);
        // Best effort: the out-of-range token is the error to report.
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(writer.finish()?.sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, vocab: u32) -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2_654_435_761) % u64::from(vocab)) as u32)
            .collect()
    }

    fn read_all(shard: &Shard) -> Vec<u32> {
        let mut out = vec![0i64; shard.len() as usize];
        shard.copy_to(0, &mut out);
        out.into_iter().map(|t| t as u32).collect()
    }

    #[test]
    fn round_trip_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, dtype) in [
            (50_257, TokenDtype::U16),
            (65_536, TokenDtype::U16),
            (200_000, TokenDtype::U32),
        ] {
            let toks = tokens(1000, vocab);
            let path = dir.path().join(format!("v{vocab}.tokens"));
            let sha = write_shard(&path, &toks, vocab).unwrap();
            let size = fs::metadata(&path).unwrap().len();
            assert_eq!(size, (HEADER_BYTES + 1000 * dtype.width()) as u64);
            let shard = Shard::open(&path).unwrap();
            assert_eq!(shard.dtype(), dtype);
            assert_eq!(shard.format(), ShardFormat::Glatrain);
            assert_eq!(shard.vocab_size(), Some(vocab));
            assert_eq!(shard.len(), 1000);
            assert_eq!(shard.sha256(), sha);
            assert_eq!(read_all(&shard), toks);
            assert_eq!(shard.get(999), toks[999]);
            let mut window = [0i64; 3];
            shard.copy_to(500, &mut window);
            assert_eq!(window.map(|t| t as u32), [toks[500], toks[501], toks[502]]);
            shard.check_range(vocab).unwrap();
        }
    }

    #[test]
    fn a_shard_written_in_pieces_is_the_shard_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [50_257, 200_000] {
            let toks = tokens(1000, vocab);
            let whole = dir.path().join(format!("whole-{vocab}.tokens"));
            let sha = write_shard(&whole, &toks, vocab).unwrap();
            let pieces = dir.path().join(format!("pieces-{vocab}.tokens"));
            let mut writer = ShardWriter::create(&pieces, vocab).unwrap();
            for chunk in [&toks[..7], &toks[7..7], &toks[7..700], &toks[700..]] {
                writer.push(chunk).unwrap();
            }
            assert_eq!(writer.len(), 1000);
            let written = writer.finish().unwrap();
            assert_eq!(written.tokens, 1000);
            assert_eq!(written.sha256, sha);
            let bytes = fs::read(&pieces).unwrap();
            assert_eq!(bytes, fs::read(&whole).unwrap());
            assert_eq!(hex::encode(Sha256::digest(&bytes)), sha);
        }
    }

    #[test]
    fn header_is_little_endian_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tokens");
        write_shard(&path, &[1, 258], 300).unwrap();
        let b = fs::read(&path).unwrap();
        assert_eq!(&b[0..8], b"GLATOKNS");
        assert_eq!(b[8..12], 1u32.to_le_bytes());
        assert_eq!(b[12..16], 64u32.to_le_bytes());
        assert_eq!(b[16..20], 2u32.to_le_bytes());
        assert_eq!(b[20..24], 300u32.to_le_bytes());
        assert_eq!(b[24..32], 2u64.to_le_bytes());
        assert_eq!(&b[64..], &[1, 0, 2, 1]);
    }

    #[test]
    fn nanogpt_bin_and_llmc_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let toks: Vec<u16> = vec![5, 50_256, 0, 7, 65_535];
        let raw: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        let bin = dir.path().join("train.bin");
        fs::write(&bin, &raw).unwrap();
        let shard = Shard::open(&bin).unwrap();
        assert_eq!(shard.format(), ShardFormat::Headerless);
        assert_eq!(shard.vocab_size(), None);
        assert_eq!(
            read_all(&shard),
            toks.iter().map(|&t| u32::from(t)).collect::<Vec<_>>()
        );

        let mut llmc = vec![0u8; 1024];
        llmc[0..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
        llmc[4..8].copy_from_slice(&1u32.to_le_bytes());
        llmc[8..12].copy_from_slice(&5u32.to_le_bytes());
        llmc.extend_from_slice(&raw);
        let path = dir.path().join("fineweb_train_000001.bin");
        fs::write(&path, &llmc).unwrap();
        let shard = Shard::open(&path).unwrap();
        assert_eq!(shard.format(), ShardFormat::LlmC);
        assert_eq!(
            read_all(&shard),
            toks.iter().map(|&t| u32::from(t)).collect::<Vec<_>>()
        );

        let odd = dir.path().join("odd.bin");
        fs::write(&odd, [1u8, 2, 3]).unwrap();
        let err = Shard::open(&odd).unwrap_err();
        assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");
        assert!(err.to_string().starts_with(&odd.display().to_string()));
    }

    /// Writes a valid 10-token shard and returns its bytes for corrupting.
    fn valid_bytes(dir: &Path) -> Vec<u8> {
        let path = dir.join("valid.tokens");
        write_shard(&path, &tokens(10, 1000), 1000).unwrap();
        fs::read(path).unwrap()
    }

    fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, DataError) {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        let err = Shard::open(&path).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "error does not name the file: {err}"
        );
        (path, err)
    }

    #[test]
    fn each_bad_file_gives_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = valid_bytes(d);

        let err = Shard::open(&d.join("absent.tokens")).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("absent.tokens"));

        let (_, err) = open_bytes(d, "truncated.tokens", &good[..good.len() - 1]);
        assert!(
            matches!(
                err,
                DataError::SizeMismatch {
                    expected: 84,
                    actual: 83,
                    ..
                }
            ),
            "{err}"
        );

        let (_, err) = open_bytes(d, "padded.tokens", &[&good[..], &[0, 0]].concat());
        assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let (_, err) = open_bytes(d, "magic.tokens", &bad_magic);
        assert!(matches!(err, DataError::BadMagic { .. }), "{err}");

        let mut v2 = good.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let (_, err) = open_bytes(d, "v2.tokens", &v2);
        assert!(
            matches!(
                err,
                DataError::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );

        let mut width3 = good.clone();
        width3[16..20].copy_from_slice(&3u32.to_le_bytes());
        let (_, err) = open_bytes(d, "width.tokens", &width3);
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");

        let (_, err) = open_bytes(d, "short.tokens", &good[..40]);
        assert!(matches!(err, DataError::BadHeader { .. }), "{err}");

        let mut zero = good[..HEADER_BYTES].to_vec();
        zero[24..32].copy_from_slice(&0u64.to_le_bytes());
        let (_, err) = open_bytes(d, "zero.tokens", &zero);
        assert!(matches!(err, DataError::Empty { .. }), "{err}");

        let (_, err) = open_bytes(d, "nothing.bin", &[]);
        assert!(matches!(err, DataError::Empty { .. }), "{err}");

        // A token id at or above the header's vocab size, found by the content check.
        let mut big = good.clone();
        big[HEADER_BYTES + 2 * 7..HEADER_BYTES + 2 * 8].copy_from_slice(&1000u16.to_le_bytes());
        let path = d.join("range.tokens");
        fs::write(&path, &big).unwrap();
        let err = Shard::open(&path).unwrap().check_range(1000).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    position: 7,
                    token: 1000,
                    vocab_size: 1000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with(&path.display().to_string()));
    }

    #[test]
    fn writing_an_out_of_range_token_fails() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_shard(&dir.path().join("x.tokens"), &[1, 2, 256], 256).unwrap_err();
        assert!(!dir.path().join("x.tokens").exists());
        assert!(
            matches!(
                err,
                DataError::TokenOutOfRange {
                    position: 2,
                    token: 256,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn in_memory_shard() {
        let shard = Shard::from_tokens("embedded:brown/train", &[3, 1, 4], 256).unwrap();
        assert_eq!(shard.format(), ShardFormat::InMemory);
        assert_eq!(read_all(&shard), [3, 1, 4]);
        assert!(Shard::from_tokens("x", &[], 256).is_err());
    }
}
