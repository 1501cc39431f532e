//! The default corpus compiled into the binary: the Brown corpus, detokenized English prose, split
//! by document into train (475 documents) and validation (25 documents). See data/README.md for how
//! the gzip files were made (scripts/make-corpus.py) and their statistics.
//!
//! Documents are separated by one blank line; paragraphs inside a document by one newline.

use std::io::Read;

use crate::error::{DataError, Result};

static TRAIN_GZ: &[u8] = include_bytes!("../../../data/brown-train.txt.gz");
static VALID_GZ: &[u8] = include_bytes!("../../../data/brown-valid.txt.gz");

/// Name of the embedded corpus as it appears in manifests and messages.
pub const NAME: &str = "brown";

/// The training split as text (about 5.7 MB, decompressed on every call).
pub fn train_text() -> Result<String> {
    decompress("brown-train.txt.gz", TRAIN_GZ)
}

/// The validation split as text (about 0.3 MB, decompressed on every call).
pub fn valid_text() -> Result<String> {
    decompress("brown-valid.txt.gz", VALID_GZ)
}

fn decompress(name: &'static str, bytes: &[u8]) -> Result<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .map_err(|e| DataError::Embedded {
            name,
            what: e.to_string(),
        })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::documents::split_documents;

    #[test]
    fn corpus_decompresses_and_is_real_english() {
        let train = train_text().unwrap();
        let valid = valid_text().unwrap();
        assert!(train.len() > 5_000_000, "train is {} bytes", train.len());
        assert!(valid.len() > 200_000, "valid is {} bytes", valid.len());
        assert_eq!(split_documents(&train).len(), 475);
        assert_eq!(split_documents(&valid).len(), 25);
        assert!(train.starts_with("The Fulton County Grand Jury said Friday"));
        // Tags are gone and quotes are detokenized.
        assert!(!train.contains("/at "));
        assert!(!train.contains("``"));
        let words = train.split_whitespace().count();
        let the = train.split_whitespace().filter(|w| *w == "the").count();
        assert!(the * 30 > words, "'the' is {the} of {words} words");
    }

    #[test]
    fn splits_share_no_document() {
        let train = train_text().unwrap();
        let valid = valid_text().unwrap();
        for doc in split_documents(&valid) {
            let first_line = doc.lines().next().unwrap();
            assert!(first_line.len() > 10);
            assert!(
                !train.contains(&doc),
                "validation document {first_line:?} is in train"
            );
        }
    }
}
