//! Text inputs as documents: finding input files, reading them line by line (plain or gzip),
//! cutting documents at blank lines, and the deterministic train/validation assignment.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Accumulates lines into documents; a blank (empty or whitespace-only) line ends a document.
#[derive(Default)]
pub(crate) struct DocumentSplitter {
    current: String,
}

impl DocumentSplitter {
    /// Feeds one line (without its line ending); returns the document it completed, if any.
    pub(crate) fn push_line(&mut self, line: &str) -> Option<String> {
        if line.trim().is_empty() {
            return self.take();
        }
        if !self.current.is_empty() {
            self.current.push('\n');
        }
        self.current.push_str(line);
        None
    }

    /// Ends the input; returns the last document, if any.
    pub(crate) fn finish(mut self) -> Option<String> {
        self.take()
    }

    fn take(&mut self) -> Option<String> {
        (!self.current.is_empty()).then(|| std::mem::take(&mut self.current))
    }
}

/// Splits text into documents at blank lines (empty or whitespace-only lines). Documents keep their
/// inner newlines; `\r\n` line endings become `\n`.
pub fn split_documents(text: &str) -> Vec<String> {
    let mut splitter = DocumentSplitter::default();
    let mut docs: Vec<String> = text
        .lines()
        .filter_map(|line| splitter.push_line(line))
        .collect();
    docs.extend(splitter.finish());
    docs
}

/// Expands `inputs` into the list of text files to read, in a deterministic order.
///
/// A file named directly is always read (gzip-decompressed when it ends in `.gz`). A directory is
/// walked recursively, in sorted order, for files ending in `.txt` or `.gz`, skipping hidden entries
/// (names starting with `.`).
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
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
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        let meta = fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, files)?;
        } else if matches!(extension(&path), Some("txt" | "gz")) {
            files.push(path);
        }
    }
    Ok(())
}

fn extension(path: &Path) -> Option<&str> {
    path.extension().and_then(|e| e.to_str())
}

/// Calls `f` on every document of one text file, in order, streaming (memory holds one document).
pub(crate) fn for_each_document(
    path: &Path,
    f: &mut dyn FnMut(String) -> Result<()>,
) -> Result<()> {
    let file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let gzip = extension(path) == Some("gz");
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut splitter = DocumentSplitter::default();
    let mut line = String::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| read_error(path, gzip, line_no + 1, e))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = line.trim_end_matches(['\n', '\r']);
        if let Some(doc) = splitter.push_line(text) {
            f(doc)?;
        }
    }
    if let Some(doc) = splitter.finish() {
        f(doc)?;
    }
    Ok(())
}

fn read_error(path: &Path, gzip: bool, line: u64, e: std::io::Error) -> DataError {
    use std::io::ErrorKind;
    match e.kind() {
        // read_line reports invalid UTF-8 as InvalidData; flate2 reports corrupt gzip as
        // InvalidInput / InvalidData / UnexpectedEof.
        ErrorKind::InvalidData if e.to_string().contains("UTF-8") => DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
        },
        ErrorKind::InvalidInput | ErrorKind::InvalidData | ErrorKind::UnexpectedEof if gzip => {
            DataError::BadGzip {
                path: path.to_path_buf(),
                what: e.to_string(),
            }
        }
        _ => DataError::io(path, e),
    }
}

/// Deterministic assignment of documents to the validation split: document `i` (counting from 0
/// over all inputs, in order) is validation when `round((i + 1) f)` exceeds `round(i f)`. That puts
/// `round(n f)` of `n` documents in validation, evenly spaced, the first near index `0.5 / f`.
#[derive(Debug, Clone)]
pub(crate) struct ValidSelector {
    fraction: f64,
    index: u64,
}

impl ValidSelector {
    pub(crate) fn new(fraction: f64) -> Self {
        ValidSelector { fraction, index: 0 }
    }

    /// Whether the next document goes to validation.
    pub(crate) fn next_is_valid(&mut self) -> bool {
        let i = self.index as f64;
        self.index += 1;
        let rounded = |x: f64| (x * self.fraction + 0.5).floor();
        rounded(i + 1.0) > rounded(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn documents_split_at_blank_lines_only() {
        let docs = split_documents("a\r\nb\n\n\nc\n  \n\td\n\n");
        assert_eq!(docs, ["a\nb", "c", "\td"]);
    }

    #[test]
    fn valid_selector_takes_the_fraction_evenly() {
        let mut sel = ValidSelector::new(0.05);
        let picks: Vec<u64> = (0..200).filter(|_| sel.next_is_valid()).collect();
        assert_eq!(picks, [9, 29, 49, 69, 89, 109, 129, 149, 169, 189]);
        let mut none = ValidSelector::new(0.0);
        assert!((0..1000).all(|_| !none.next_is_valid()));
    }

    #[test]
    fn walks_directories_sorted_and_reads_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("sub/.hidden")).unwrap();
        fs::write(root.join("b.txt"), "b1\n\nb2\n").unwrap();
        fs::write(root.join("notes.md"), "skipped").unwrap();
        fs::write(root.join("sub/.hidden/x.txt"), "skipped").unwrap();
        let mut gz = flate2::write::GzEncoder::new(
            fs::File::create(root.join("sub/a.txt.gz")).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"g1 line\ng1 more\n\ng2\n").unwrap();
        gz.finish().unwrap();
        fs::write(root.join("a.txt"), "a1").unwrap();

        let files = input_files(&[root.to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "b.txt", "sub/a.txt.gz"]);

        let mut docs = Vec::new();
        for file in &files {
            for_each_document(file, &mut |d| {
                docs.push(d);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(docs, ["a1", "b1", "b2", "g1 line\ng1 more", "g2"]);
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let err = input_files(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(err, DataError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("nope.txt"));

        let empty_dir = dir.path().join("empty");
        fs::create_dir(&empty_dir).unwrap();
        let err = input_files(std::slice::from_ref(&empty_dir)).unwrap_err();
        assert!(matches!(err, DataError::NoInputs { .. }), "{err}");

        let latin1 = dir.path().join("latin1.txt");
        fs::write(&latin1, b"ok\ncaf\xe9\n").unwrap();
        let err = for_each_document(&latin1, &mut |_| Ok(())).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            format!("{}: not valid UTF-8 text near line 2", latin1.display())
        );

        let bad_gz = dir.path().join("bad.gz");
        fs::write(&bad_gz, b"\x1f\x8b\x08\x00garbage-garbage").unwrap();
        let err = for_each_document(&bad_gz, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, DataError::BadGzip { .. }), "{err}");
        assert!(err.to_string().contains("bad.gz"));
    }
}
