//! Documents: cutting text into documents at blank lines, and the deterministic
//! train/validation assignment of documents.

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
}
