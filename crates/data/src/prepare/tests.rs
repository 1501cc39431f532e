//! `prepare` end to end: formats, splits, shards, tokenizers, bad records, threads, and that a
//! failed or stopped run leaves nothing behind.

use glatrain_fs::sorted_names;
use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::document_starts;
use crate::documents::{split_documents, ValidSelector};
use crate::inputs::tests::{gzip, jsonl_text, sample_documents, write_parquet, zstd};
use crate::manifest::Manifest;
use crate::source::{Dataset, OpenOptions, DOCUMENT_SEPARATOR};
use crate::tokenizer::train_bpe;

fn options(tokenizer: &str, shard_tokens: u64, valid_fraction: f64) -> PrepareOptions {
    PrepareOptions {
        tokenizer: tokenizer.into(),
        shard_tokens,
        valid_fraction,
        ..PrepareOptions::default()
    }
}

/// [`prepare`] with the options that vary most.
fn prep(
    inputs: &[PathBuf],
    tokenizer: &str,
    out: &Path,
    shard_tokens: u64,
    valid_fraction: f64,
) -> Result<Manifest> {
    prepare(
        inputs,
        out,
        &options(tokenizer, shard_tokens, valid_fraction),
    )
    .map(|r| r.manifest)
}

/// Three small files: 12 documents in all.
fn write_inputs(dir: &Path) -> PathBuf {
    let input = dir.join("input");
    fs::create_dir_all(input.join("more")).unwrap();
    for f in 0..3 {
        let docs: Vec<String> = (0..4)
            .map(|d| format!("Document {d} of file {f}.\nIt has two lines, the second longer."))
            .collect();
        let path = if f == 2 {
            input.join("more/c.txt")
        } else {
            input.join(format!("{f}.txt"))
        };
        fs::write(path, docs.join("\n\n")).unwrap();
    }
    input
}

/// The inputs of [`write_inputs`] prepared with the byte tokenizer into `ds/` of the returned
/// directory, in shards of `shard_tokens`, a quarter of the documents for validation.
fn byte_dataset(shard_tokens: u64) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(dir.path());
    let manifest = prep(&[input], "byte", &dir.path().join("ds"), shard_tokens, 0.25).unwrap();
    (dir, manifest)
}

fn read_all(source: &crate::source::TokenSource) -> Vec<u32> {
    let mut out = vec![0i64; source.len() as usize];
    source.read(0, &mut out);
    out.into_iter().map(|t| t as u32).collect()
}

#[test]
fn byte_prepare_round_trips_the_text() {
    let (dir, manifest) = byte_dataset(100);
    let out = dir.path().join("ds");
    assert_eq!(manifest.vocab_size, 256);
    assert_eq!(manifest.train.documents, 9);
    let valid = manifest.valid.as_ref().unwrap();
    assert_eq!(valid.documents, 3);
    assert!(manifest.train.shards.len() > 3, "100-token shards");
    assert!(manifest.train.shards[..manifest.train.shards.len() - 1]
        .iter()
        .all(|s| s.tokens == 100));
    assert_eq!(manifest.train.tokens, manifest.train.source_bytes);
    assert!(!out.join(TOKENIZER_FILE).exists());

    let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
    let bytes: Vec<u8> = read_all(&ds.train).iter().map(|&t| t as u8).collect();
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.starts_with("Document 0 of file 0.\nIt has two lines"));
    assert_eq!(text.matches("Document").count(), 9);
    let valid_text: Vec<u8> = read_all(ds.valid.as_ref().unwrap())
        .iter()
        .map(|&t| t as u8)
        .collect();
    // Documents 1, 5 and 9 (round((i+1)/4) > round(i/4)) are validation.
    assert_eq!(
        String::from_utf8(valid_text)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("Doc"))
            .collect::<Vec<_>>(),
        [
            "Document 1 of file 0.",
            "Document 1 of file 1.",
            "Document 1 of file 2."
        ]
    );
    assert_eq!(ds.train.bytes_per_token(), Some(1.0));
    assert!(matches!(ds.tokenizer().unwrap(), Some(Tokenizer::Byte)));
    // Nothing but the dataset is left next to it.
    let siblings: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings.len(), 2, "{siblings:?}");

    let err = prep(&[dir.path().join("input")], "byte", &out, 100, 0.0).unwrap_err();
    assert!(matches!(err, DataError::OutputExists { .. }), "{err}");
}

#[test]
fn embedded_prepare_keeps_the_corpus_split() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("brown");
    let manifest = prepare_embedded(&out, &options("byte", 1 << 21, 0.0))
        .unwrap()
        .manifest;
    assert_eq!(manifest.source, "embedded:brown");
    assert_eq!(manifest.train.documents, 475);
    assert_eq!(manifest.train.shards.len(), 3);
    let valid = manifest.valid.as_ref().unwrap();
    assert_eq!(valid.documents, 25);
    let valid_text = embedded::valid_text().unwrap();
    assert_eq!(valid.tokens, valid_text.len() as u64 + 1);
    let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
    let embedded = Dataset::embedded(&Tokenizer::Byte).unwrap();
    assert_eq!(ds.train.len(), embedded.train.len());
    assert_eq!(ds.train.source_bytes(), embedded.train.source_bytes());
    let all = 0..ds.train.len();
    assert_eq!(
        ds.train.document_starts(all.clone()),
        embedded.train.document_starts(all)
    );
}

#[test]
fn bpe_prepare_copies_the_tokenizer_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("brown-valid.txt");
    fs::write(&input, embedded::valid_text().unwrap()).unwrap();
    let out = dir.path().join("brown-bpe");
    let manifest = prep(std::slice::from_ref(&input), "bpe:300", &out, 50_000, 0.2).unwrap();
    assert_eq!(manifest.vocab_size, 300);
    assert_eq!(manifest.dtype, TokenDtype::U16);
    assert_eq!(manifest.tokenizer.spec, "bpe:300");
    assert_eq!(manifest.tokenizer.file.as_deref(), Some(TOKENIZER_FILE));
    assert_eq!(
        (
            manifest.train.documents,
            manifest.valid.as_ref().unwrap().documents
        ),
        (20, 5)
    );
    assert!(manifest.train.tokens * 11 < manifest.train.source_bytes * 10);

    let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
    let tokenizer = ds.tokenizer().unwrap().unwrap();
    assert_eq!(tokenizer.vocab_size(), 300);
    let valid = ds.valid.as_ref().unwrap();
    let mut selector = ValidSelector::new(0.2);
    let expected: Vec<String> = split_documents(&embedded::valid_text().unwrap())
        .into_iter()
        .filter(|_| selector.next_is_valid())
        .map(|d| d + DOCUMENT_SEPARATOR)
        .collect();
    // Cut at the recorded starts, the tokens decode to the documents one by one.
    let tokens = read_all(valid);
    let mut bounds = valid.document_starts(0..valid.len()).unwrap();
    bounds.push(valid.len());
    let decoded: Vec<String> = bounds
        .windows(2)
        .map(|w| {
            tokenizer
                .decode(&tokens[w[0] as usize..w[1] as usize])
                .unwrap()
        })
        .collect();
    assert_eq!(decoded, expected);
    assert_eq!(valid.source_bytes(), Some(expected.concat().len() as u64));
}

#[test]
fn tokenizer_file_spec_and_u32_shards() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(dir.path());
    // A tokenizer with a vocab above 65536 needs u32 shards: pad a trained one with added
    // tokens.
    let trained = dir.path().join("small.json");
    let docs = split_documents(&embedded::valid_text().unwrap());
    let Tokenizer::HuggingFace { mut inner, .. } =
        train_bpe(docs.iter().take(3), 300, &trained).unwrap()
    else {
        panic!("train_bpe returns a Hugging Face tokenizer");
    };
    let extra: Vec<tokenizers::AddedToken> = (0..65_300)
        .map(|i| tokenizers::AddedToken::from(format!("<extra_{i}>"), true))
        .collect();
    inner.add_special_tokens(&extra);
    let big = dir.path().join("big.json");
    inner.save(&big, false).unwrap();

    let out = dir.path().join("ds32");
    let manifest = prep(&[input], big.to_str().unwrap(), &out, 1000, 0.0).unwrap();
    assert_eq!(manifest.vocab_size, 65_600);
    assert_eq!(manifest.dtype, TokenDtype::U32);
    assert!(manifest.valid.is_none());
    assert!(!out.join("valid").exists());
    let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
    assert_eq!(ds.train.shards()[0].dtype(), TokenDtype::U32);
    let text = ds
        .tokenizer()
        .unwrap()
        .unwrap()
        .decode(&read_all(&ds.train))
        .unwrap();
    assert!(text.starts_with("Document 0 of file 0.\n"));
}

#[test]
fn failures_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    fs::create_dir(&input).unwrap();
    fs::write(input.join("a.txt"), "fine text\n\nmore").unwrap();
    fs::write(input.join("b.txt"), b"bad \xff byte").unwrap();
    let out = dir.path().join("out");
    let err = prep(std::slice::from_ref(&input), "byte", &out, 4, 0.0).unwrap_err();
    assert!(matches!(err, DataError::BadRecord(_)), "{err}");
    assert!(err.is_bad_input());
    assert!(
        err.to_string().starts_with(&format!(
            "{}: line 1: not valid UTF-8\n",
            input.join("b.txt").display()
        )),
        "{err}"
    );
    assert_eq!(sorted_names(dir.path()).unwrap(), ["in"]);

    let err = prep(
        std::slice::from_ref(&input),
        "missing/tokenizer.json",
        &out,
        4,
        0.0,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("missing/tokenizer.json"),
        "{err}"
    );
    assert!(!out.exists());

    let err = prep(std::slice::from_ref(&input), "byte", &out, 4, 1.0).unwrap_err();
    assert_eq!(err.to_string(), "valid_fraction = 1: must be in [0, 1)");

    let blank = dir.path().join("blank.txt");
    fs::write(&blank, "\n  \n").unwrap();
    let err = prep(&[blank], "byte", &out, 4, 0.0).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    assert!(!out.exists());
}

#[test]
fn corrupted_datasets_are_refused_on_open() {
    let (dir, manifest) = byte_dataset(50);
    let out = dir.path().join("ds");
    let shard = out.join(&manifest.train.shards[1].file);
    let mut bytes = fs::read(&shard).unwrap();
    bytes[70] ^= 1;
    fs::write(&shard, &bytes).unwrap();
    let err = Dataset::open(&out, OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&shard.display().to_string()),
        "{err}"
    );
    // Without verification the flipped byte goes unnoticed (sizes still match).
    Dataset::open(&out, OpenOptions { verify: false }).unwrap();

    fs::remove_file(&shard).unwrap();
    let err = Dataset::open(&out, OpenOptions { verify: false }).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("train-000001.tokens"), "{err}");
}

#[test]
fn corrupted_document_starts_are_refused_on_open() {
    let (dir, manifest) = byte_dataset(50);
    let out = dir.path().join("ds");
    let record = manifest.train.shards[2].document_starts.clone().unwrap();
    assert!(record.starts > 0);
    let path = out.join(&record.file);
    let good = fs::read(&path).unwrap();
    let refused = |bytes: &[u8], verify: bool| {
        fs::write(&path, bytes).unwrap();
        let err = Dataset::open(&out, OpenOptions { verify }).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        msg
    };
    // A start moved past its shard: the checksum finds it, and the order check does once the
    // manifest agrees with the file.
    let mut past = good.clone();
    let at = document_starts::HEADER_BYTES;
    past[at..at + 8].copy_from_slice(&50u64.to_le_bytes());
    let msg = refused(&past, true);
    assert!(msg.contains("does not match the manifest's"), "{msg}");
    let mut agreeing = manifest.clone();
    agreeing.train.shards[2]
        .document_starts
        .as_mut()
        .unwrap()
        .sha256 = document_starts::DocumentStarts::open(&path)
        .unwrap()
        .sha256();
    agreeing.save(&out).unwrap();
    let msg = refused(&past, true);
    assert!(
        msg.contains("bad document starts: start 0 is 50, past the shard's 50 tokens"),
        "{msg}"
    );
    manifest.save(&out).unwrap();

    let msg = refused(&good[..good.len() - 3], false);
    assert!(
        msg.contains("size 37 bytes does not match its header"),
        "{msg}"
    );
    let mut count = good.clone();
    count[16..24].copy_from_slice(&(record.starts - 1).to_le_bytes());
    count.truncate(count.len() - 8);
    let msg = refused(&count, false);
    assert!(
        msg.contains(&format!(
            "header says {} document starts, the manifest says {}",
            record.starts - 1,
            record.starts
        )),
        "{msg}"
    );

    fs::remove_file(&path).unwrap();
    let err = Dataset::open(&out, OpenOptions { verify: false }).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains(&record.file), "{err}");
}

#[test]
fn version_1_datasets_load_without_document_starts() {
    let (dir, manifest) = byte_dataset(100);
    let out = dir.path().join("ds");
    let mut old = manifest.clone();
    old.format_version = 1;
    for split in [&mut old.train, old.valid.as_mut().unwrap()] {
        for shard in &mut split.shards {
            let starts = shard.document_starts.take().unwrap();
            fs::remove_file(out.join(starts.file)).unwrap();
        }
    }
    old.save(&out).unwrap();
    let ds = Dataset::open(&out, OpenOptions::default()).unwrap();
    assert_eq!(ds.manifest.as_ref().unwrap().format_version, 1);
    assert!(!ds.train.has_document_starts());
    assert_eq!(ds.train.documents(), None);
    assert_eq!(ds.train.len(), manifest.train.tokens);
}

/// Every file of a dataset directory with its bytes, for comparing two runs.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in sorted_names(dir).unwrap() {
        let path = dir.join(&name);
        if path.is_dir() {
            for (inner, bytes) in contents(&path) {
                out.push((format!("{name}/{inner}"), bytes));
            }
        } else {
            out.push((name, fs::read(&path).unwrap()));
        }
    }
    out
}

fn shard_hashes(manifest: &Manifest) -> Vec<String> {
    manifest
        .splits()
        .flat_map(|(_, split)| split.shards.iter().map(|s| s.sha256.clone()))
        .collect()
}

#[test]
fn every_format_prepares_the_same_shards() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let docs = sample_documents(40);
    let jsonl = jsonl_text(&docs);
    let text = docs.join("\n\n");
    let rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    fs::write(root.join("all.txt"), &text).unwrap();
    fs::write(root.join("all.txt.gz"), gzip(text.as_bytes())).unwrap();
    fs::write(root.join("all.jsonl"), &jsonl).unwrap();
    fs::write(root.join("all.jsonl.gz"), gzip(jsonl.as_bytes())).unwrap();
    fs::write(root.join("all.jsonl.zst"), zstd(jsonl.as_bytes())).unwrap();
    write_parquet(
        &root.join("all.parquet"),
        &rows,
        16,
        parquet::basic::Compression::SNAPPY,
    );
    // The same documents over three files of three formats, in a directory.
    let mixed = root.join("mixed");
    fs::create_dir_all(mixed.join("b")).unwrap();
    fs::write(mixed.join("a.jsonl"), jsonl_text(&docs[..10])).unwrap();
    write_parquet(
        &mixed.join("b/c.parquet"),
        &rows[10..25],
        4,
        parquet::basic::Compression::ZSTD(Default::default()),
    );
    fs::write(
        mixed.join("d.txt.zst"),
        zstd(docs[25..].join("\n\n").as_bytes()),
    )
    .unwrap();

    let reference = prep(
        &[root.join("all.txt")],
        "byte",
        &root.join("out-txt"),
        300,
        0.1,
    )
    .unwrap();
    assert_eq!(
        reference.train.documents + reference.valid.as_ref().unwrap().documents,
        40
    );
    for (i, input) in [
        "all.txt.gz",
        "all.jsonl",
        "all.jsonl.gz",
        "all.jsonl.zst",
        "all.parquet",
        "mixed",
    ]
    .iter()
    .enumerate()
    {
        let out = root.join(format!("out-{i}"));
        let manifest = prep(&[root.join(input)], "byte", &out, 300, 0.1).unwrap();
        assert_eq!(shard_hashes(&manifest), shard_hashes(&reference), "{input}");
        assert_eq!(manifest.train, reference.train, "{input}");
    }

    // And the shards hold exactly the documents, each followed by the separator, and record
    // where each begins (a byte a token), across the shard files.
    let ds = Dataset::open(&root.join("out-txt"), OpenOptions::default()).unwrap();
    let mut selector = ValidSelector::new(0.1);
    let (valid, train): (Vec<&String>, Vec<&String>) =
        docs.iter().partition(|_| selector.next_is_valid());
    for (source, documents) in [(&ds.train, train), (ds.valid.as_ref().unwrap(), valid)] {
        let bytes: Vec<u8> = read_all(source).iter().map(|&t| t as u8).collect();
        let texts: Vec<String> = documents
            .iter()
            .map(|d| format!("{d}{DOCUMENT_SEPARATOR}"))
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), texts.concat());
        let mut starts = vec![0u64];
        for text in &texts {
            starts.push(starts.last().unwrap() + text.len() as u64);
        }
        assert_eq!(starts.pop(), Some(source.len()));
        assert_eq!(source.document_starts(0..source.len()), Some(starts));
        assert_eq!(source.documents(), Some(documents.len() as u64));
    }
    assert!(ds.train.shards().len() > 3);
}

#[test]
fn the_thread_count_does_not_change_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let docs = split_documents(&embedded::valid_text().unwrap());
    let input = dir.path().join("brown.jsonl.zst");
    fs::write(&input, zstd(jsonl_text(&docs).as_bytes())).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    train_bpe(docs.iter().take(5), 600, &tokenizer).unwrap();
    let mut outputs = Vec::new();
    for threads in [1, 2, 5] {
        let out = dir.path().join(format!("out-{threads}"));
        let report = prepare(
            std::slice::from_ref(&input),
            &out,
            &PrepareOptions {
                threads,
                ..options(tokenizer.to_str().unwrap(), 20_000, 0.1)
            },
        )
        .unwrap();
        assert_eq!(report.stats.threads, threads);
        assert!(report.manifest.train.shards.len() > 2);
        outputs.push(contents(&out));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

/// A directory with good documents and every kind of bad record; returns it and the number of
/// good documents.
fn broken_corpus(root: &Path) -> (PathBuf, u64) {
    let input = root.join("corpus");
    fs::create_dir(&input).unwrap();
    let docs = sample_documents(200);
    // a.jsonl: 10 good lines, then invalid JSON (line 11), a missing field (12), a number (13),
    // bad UTF-8 (14), and a good line (15).
    let mut a = jsonl_text(&docs[..10]).into_bytes();
    a.extend_from_slice(b"{\"text\": \n{\"id\": 1}\n{\"text\": 1.5}\n{\"text\": \"\xff\"}\n");
    a.extend_from_slice(jsonl_text(&docs[10..11]).as_bytes());
    fs::write(input.join("a.jsonl"), a).unwrap();
    // b.jsonl.zst: cut short; some documents, then one unreadable record.
    let whole = zstd(jsonl_text(&docs[11..200]).as_bytes());
    fs::write(input.join("b.jsonl.zst"), &whole[..whole.len() / 2]).unwrap();
    // c.parquet: not parquet. d.parquet: one null among 5 rows.
    fs::write(input.join("c.parquet"), b"not parquet").unwrap();
    let rows = [Some("one"), None, Some("three"), Some("four"), Some("five")];
    write_parquet(
        &input.join("d.parquet"),
        &rows,
        2,
        parquet::basic::Compression::SNAPPY,
    );
    // e.txt: a document with a Latin-1 byte between two good ones.
    fs::write(input.join("e.txt"), b"good\n\ncaf\xe9\n\nalso good\n").unwrap();
    let b_docs = {
        let mut stream = zstd::stream::read::Decoder::new(&whole[..whole.len() / 2]).unwrap();
        let mut text = Vec::new();
        // The error at the cut is expected; the complete lines before it are the documents.
        let _ = std::io::Read::read_to_end(&mut stream, &mut text);
        text.iter().filter(|&&b| b == b'\n').count() as u64
    };
    (input, 11 + b_docs + 4 + 2)
}

#[test]
fn bad_records_are_skipped_and_counted_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (input, good) = broken_corpus(dir.path());
    let out = dir.path().join("out");
    let report = prepare(
        &[input],
        &out,
        &PrepareOptions {
            on_bad_record: OnBadRecord::Skip,
            ..options("byte", 1000, 0.0)
        },
    )
    .unwrap();
    let stats = &report.stats;
    assert_eq!(stats.documents, good);
    assert_eq!(report.manifest.train.documents, good);
    assert_eq!(stats.bad_records, 8);
    let kinds: Vec<(&str, u64)> = stats.bad_by_kind.iter().map(|(k, n)| (*k, *n)).collect();
    assert_eq!(
        kinds,
        [
            ("invalid JSON", 1),
            ("missing text field", 1),
            ("not UTF-8", 2),
            ("text field not a string", 2),
            ("unreadable data", 2),
        ]
    );
    let listed: Vec<String> = stats
        .bad_examples
        .iter()
        .map(|b| {
            let name = b.path.file_name().unwrap().to_string_lossy().into_owned();
            format!("{name}: {}", b.location)
        })
        .collect();
    assert_eq!(
        &listed[..4],
        [
            "a.jsonl: line 11",
            "a.jsonl: line 12",
            "a.jsonl: line 13",
            "a.jsonl: line 14"
        ]
    );
    assert!(listed[4].starts_with("b.jsonl.zst: line "), "{listed:?}");
    assert_eq!(
        &listed[5..],
        [
            "c.parquet: whole file",
            "d.parquet: row group 0, row 1",
            "e.txt: line 3"
        ]
    );
    assert!(stats.summary().contains("skipped 8 bad records: 2 not UTF-8, 2 text field not a string, 2 unreadable data, 1 invalid JSON, 1 missing text field"), "{}", stats.summary());
    Dataset::open(&out, OpenOptions::default()).unwrap();
}

#[test]
fn a_bad_record_stops_the_run_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = broken_corpus(dir.path());
    for tokenizer in ["byte", "bpe:300"] {
        let out = dir.path().join("out");
        let err = prep(std::slice::from_ref(&input), tokenizer, &out, 1000, 0.0).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 11: invalid JSON: EOF while parsing a value at column 9\n(to skip bad \
                 records instead, counting and listing them, pass --on-bad-record skip)",
                input.join("a.jsonl").display()
            ),
            "{tokenizer}"
        );
        assert_eq!(sorted_names(dir.path()).unwrap(), ["corpus"], "{tokenizer}");
    }

    // A parquet file without the text column stops whatever the policy.
    let err = prepare(
        &[input.join("d.parquet")],
        &dir.path().join("out"),
        &PrepareOptions {
            text_field: "content".into(),
            on_bad_record: OnBadRecord::Skip,
            ..PrepareOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::ParquetColumn { .. }), "{err}");
    assert_eq!(sorted_names(dir.path()).unwrap(), ["corpus"]);
}

#[test]
fn an_interrupted_run_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(dir.path());
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let out = dir.path().join("out");
    let err = prepare(
        &[input],
        &out,
        &PrepareOptions {
            interrupt: Some(interrupt),
            ..PrepareOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Interrupted { .. }), "{err}");
    assert!(!err.is_bad_input());
    assert_eq!(sorted_names(dir.path()).unwrap(), ["input"]);
}
