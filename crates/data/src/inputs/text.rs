//! Text files: documents separated by blank (empty or whitespace-only) lines.

use std::ops::ControlFlow;

use super::{Location, Problem, Raw, Stream};
use crate::documents::DocumentSplitter;
use crate::error::Result;

/// Reads the documents of a text stream. A document with a line that is not UTF-8 is one bad
/// record, reported at that line; a stream that stops decompressing ends the file with a bad
/// record at the line being read (the document in progress is dropped).
pub(super) fn read(
    stream: Stream,
    emit: &mut dyn FnMut(Location, Raw) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let mut document = Pending::default();
    let stopped = stream.for_each_line(emit, |number, line| {
        let bytes = line.strip_suffix(b"\n").unwrap_or(line);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        document.push(number, bytes)
    })?;
    if let Some(flow) = stopped {
        return Ok(flow);
    }
    Ok(match document.finish() {
        Some((location, raw)) => emit(location, raw),
        None => ControlFlow::Continue(()),
    })
}

/// The document being read.
#[derive(Default)]
struct Pending {
    splitter: DocumentSplitter,
    first_line: Option<u64>,
    /// Its first line that is not UTF-8.
    bad_line: Option<u64>,
}

impl Pending {
    /// Feeds line `number` (without its line ending); returns the record a blank line completed.
    fn push(&mut self, number: u64, bytes: &[u8]) -> Option<(Location, Raw)> {
        match std::str::from_utf8(bytes) {
            Ok(text) if text.trim().is_empty() => {
                let doc = self.splitter.push_line(text);
                self.complete(doc)
            }
            Ok(text) => {
                self.first_line.get_or_insert(number);
                self.splitter.push_line(text);
                None
            }
            Err(_) => {
                self.first_line.get_or_insert(number);
                self.bad_line.get_or_insert(number);
                None
            }
        }
    }

    /// Ends the input; returns the last record, if any.
    fn finish(mut self) -> Option<(Location, Raw)> {
        let doc = std::mem::take(&mut self.splitter).finish();
        self.complete(doc)
    }

    fn complete(&mut self, doc: Option<String>) -> Option<(Location, Raw)> {
        let start = self.first_line.take();
        if let Some(bad) = self.bad_line.take() {
            return Some((Location::Line(bad), Raw::Bad(Problem::NotUtf8)));
        }
        Some((Location::Line(start?), Raw::Text(doc?)))
    }
}
