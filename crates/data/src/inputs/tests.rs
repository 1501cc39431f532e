//! Every input format gives the same documents; broken files give bad records at the right
//! place. The helpers write small corpora in each format (parquet with the parquet crate's own
//! writer) for `prepare`'s tests too.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::*;

/// Documents with what a corpus has: several lines, quotes and backslashes (escaped in JSON),
/// non-ASCII text, a tab. No blank lines, so that text files hold them too.
pub(crate) fn sample_documents(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Document {i}: \"quoted\", a back\\slash, caf\u{e9} \u{4e2d}\u{6587}.\n\
                 \tSecond line of {i}, longer than the first one."
            )
        })
        .collect()
}

/// One JSON object per document, with fields before and after the text.
pub(crate) fn jsonl_text(docs: &[String]) -> String {
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            serde_json::json!({"id": i, "text": d, "meta": {"lang": "en", "tags": [1, 2]}})
                .to_string()
                + "\n"
        })
        .collect()
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

pub(crate) fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).unwrap()
}

/// A parquet file with an `id` column and a `text` column, with `rows_per_group` rows per row
/// group. The text column is `optional` when some text is `None` (a null), else `required`
/// (pyarrow writes the one, Spark often the other).
pub(crate) fn write_parquet(
    path: &Path,
    texts: &[Option<&str>],
    rows_per_group: usize,
    compression: ParquetCompression,
) {
    let nullable = texts.iter().any(Option::is_none);
    let repetition = if nullable { "optional" } else { "required" };
    let schema = Arc::new(
        parse_message_type(&format!(
            "message document {{ required binary id (UTF8); {repetition} binary text (UTF8); }}"
        ))
        .unwrap(),
    );
    let properties = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(fs::File::create(path).unwrap(), schema, properties).unwrap();
    for (g, group) in texts.chunks(rows_per_group).enumerate() {
        let mut row_group = writer.next_row_group().unwrap();
        let ids: Vec<ByteArray> = (0..group.len())
            .map(|i| ByteArray::from(format!("{g}-{i}").as_str()))
            .collect();
        let mut column = row_group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&ids, None, None)
            .unwrap();
        column.close().unwrap();
        let values: Vec<ByteArray> = group.iter().flatten().map(|&t| t.into()).collect();
        let definitions: Vec<i16> = group.iter().map(|t| i16::from(t.is_some())).collect();
        let mut column = row_group.next_column().unwrap().unwrap();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, nullable.then_some(&definitions[..]), None)
            .unwrap();
        column.close().unwrap();
        row_group.close().unwrap();
    }
    writer.close().unwrap();
}

/// Every record of `files`, in order, parsed: (file index, location, text or problem).
type Parsed = (usize, Location, std::result::Result<String, Problem>);

fn read_all(files: &[InputFile]) -> Result<Vec<Parsed>> {
    let counter = Arc::new(AtomicU64::new(0));
    let mut out = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let flow = read_file(file, index, "text", &counter, &mut |record| {
            out.push((record.file, record.location, parse(record.raw, "text")));
            ControlFlow::Continue(())
        })?;
        assert!(flow.is_continue());
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    assert_eq!(counter.load(Ordering::Relaxed), total, "bytes read");
    Ok(out)
}

fn texts(parsed: &[Parsed]) -> Vec<String> {
    parsed
        .iter()
        .map(|(_, _, r)| r.clone().unwrap_or_else(|p| panic!("{p}")))
        .collect()
}

fn named(path: &Path) -> Vec<InputFile> {
    input_files(&[path.to_path_buf()]).unwrap()
}

#[test]
fn names_tell_the_format() {
    use Compression::*;
    use InputFormat::*;
    let cases = [
        ("a.txt", Some((Text, None))),
        ("a.TXT.gz", Some((Text, Gzip))),
        ("a.gz", Some((Text, Gzip))),
        ("a.txt.zst", Some((Text, Zstd))),
        ("a.jsonl", Some((JsonLines, None))),
        ("a.ndjson", Some((JsonLines, None))),
        ("c4-train.00000-of-01024.json.gz", Some((JsonLines, Gzip))),
        ("example_train_0.jsonl.zst", Some((JsonLines, Zstd))),
        ("000_00000.parquet", Some((Parquet, None))),
        ("dataset_info.json", Option::None),
        ("README.md", Option::None),
        ("a.parquet.gz", Some((Text, Gzip))),
    ];
    for (name, expected) in cases {
        assert_eq!(InputFile::format_of(name), expected, "{name}");
    }
    // Named directly: a plain .json is JSON Lines, anything else is text.
    let json = InputFile::named(Path::new("d/x.json"), 0);
    assert_eq!((json.format, json.compression), (JsonLines, None));
    let other = InputFile::named(Path::new("d/notes.md"), 0);
    assert_eq!((other.format, other.compression), (Text, None));
}

#[test]
fn every_format_gives_the_same_documents() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let docs = sample_documents(25);
    let jsonl = jsonl_text(&docs);
    let text = docs.join("\n\n") + "\n";
    fs::write(root.join("a.txt"), &text).unwrap();
    fs::write(root.join("a.txt.gz"), gzip(text.as_bytes())).unwrap();
    fs::write(root.join("a.txt.zst"), zstd(text.as_bytes())).unwrap();
    fs::write(root.join("a.jsonl"), &jsonl).unwrap();
    fs::write(root.join("a.jsonl.gz"), gzip(jsonl.as_bytes())).unwrap();
    fs::write(root.join("a.jsonl.zst"), zstd(jsonl.as_bytes())).unwrap();
    let rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    write_parquet(
        &root.join("snappy.parquet"),
        &rows,
        7,
        ParquetCompression::SNAPPY,
    );
    let zstd_level = ZstdLevel::try_new(3).unwrap();
    write_parquet(
        &root.join("zstd.parquet"),
        &rows,
        10,
        ParquetCompression::ZSTD(zstd_level),
    );
    let gzip_parquet = ParquetCompression::GZIP(Default::default());
    write_parquet(&root.join("gzip.parquet"), &rows, 25, gzip_parquet);
    for name in [
        "a.txt",
        "a.txt.gz",
        "a.txt.zst",
        "a.jsonl",
        "a.jsonl.gz",
        "a.jsonl.zst",
        "snappy.parquet",
        "zstd.parquet",
        "gzip.parquet",
    ] {
        let parsed = read_all(&named(&root.join(name))).unwrap();
        assert_eq!(texts(&parsed), docs, "{name}");
    }
    // A directory: all of them, sorted by name.
    let all = named(root);
    let names: Vec<String> = all
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "a.jsonl",
            "a.jsonl.gz",
            "a.jsonl.zst",
            "a.txt",
            "a.txt.gz",
            "a.txt.zst",
            "gzip.parquet",
            "snappy.parquet",
            "zstd.parquet"
        ]
    );
    assert_eq!(read_all(&all).unwrap().len(), 9 * docs.len());
    // Parquet rows are located by row group and row.
    let parsed = read_all(&named(&root.join("snappy.parquet"))).unwrap();
    assert_eq!(parsed[8].1, Location::Row { group: 1, row: 1 });
    let parsed = read_all(&named(&root.join("a.txt"))).unwrap();
    assert_eq!(parsed[1].1, Location::Line(4));
}

#[test]
fn directories_are_walked_sorted_skipping_hidden_and_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("sub/.hidden")).unwrap();
    fs::write(root.join("b.txt"), "b1\n\nb2\n").unwrap();
    fs::write(root.join("notes.md"), "skipped").unwrap();
    fs::write(root.join("dataset_info.json"), "{}").unwrap();
    fs::write(root.join("sub/.hidden/x.txt"), "skipped").unwrap();
    fs::write(root.join(".y.jsonl"), "{}").unwrap();
    fs::write(root.join("sub/a.jsonl"), "{\"text\": \"j1\"}\n").unwrap();
    fs::write(root.join("a.txt"), "a1").unwrap();
    let files = input_files(&[root.to_path_buf(), root.join("dataset_info.json")]).unwrap();
    let names: Vec<_> = files
        .iter()
        .map(|f| {
            f.path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        ["a.txt", "b.txt", "sub/a.jsonl", "dataset_info.json"]
    );
    let parsed = read_all(&files[..3]).unwrap();
    assert_eq!(texts(&parsed), ["a1", "b1", "b2", "j1"]);
    // The named .json is JSON Lines; `{}` has no text field.
    let parsed = read_all(&files[3..]).unwrap();
    assert_eq!(parsed[0].2, Err(Problem::MissingField("text".into())));
}

#[test]
fn missing_and_empty_inputs_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let err = input_files(std::slice::from_ref(&missing)).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("nope.jsonl"));
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = input_files(std::slice::from_ref(&empty)).unwrap_err();
    assert!(matches!(err, DataError::NoInputs { .. }), "{err}");
    assert!(err.is_bad_input());
}

#[test]
fn bad_json_lines_are_located_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"text\": \"good one\"}\n");
    bytes.extend_from_slice(b"{\"text\": \"unterminated}\n");
    bytes.extend_from_slice(b"{\"id\": 3}\n");
    bytes.extend_from_slice(b"{\"text\": 42}\n");
    bytes.extend_from_slice(b"{\"text\": null}\r\n");
    bytes.extend_from_slice(b"[\"text\"]\n");
    bytes.extend_from_slice(b"{\"text\": \"caf\xe9\"}\n");
    bytes.extend_from_slice(b"   \n");
    bytes.extend_from_slice(b"{\"text\": \"first\", \"text\": 7, \"x\": {\"text\": 1}}\n");
    bytes.extend_from_slice(b"{\"text\": \"trailing\"} x\n");
    bytes.extend_from_slice(b"{\"text\": \"no final newline\"}");
    fs::write(&path, bytes).unwrap();
    let parsed = read_all(&named(&path)).unwrap();
    let got: Vec<(Location, std::result::Result<String, Problem>)> =
        parsed.into_iter().map(|(_, l, r)| (l, r)).collect();
    let not_a_string = |kind| Problem::NotAString {
        field: "text".into(),
        kind,
    };
    assert_eq!(got[0], (Location::Line(1), Ok("good one".into())));
    assert!(
        matches!(&got[1], (Location::Line(2), Err(Problem::InvalidJson(m))) if m.contains("EOF while parsing a string at column")),
        "{:?}",
        got[1]
    );
    assert_eq!(
        got[2],
        (Location::Line(3), Err(Problem::MissingField("text".into())))
    );
    assert_eq!(got[3], (Location::Line(4), Err(not_a_string("a number"))));
    assert_eq!(got[4], (Location::Line(5), Err(not_a_string("null"))));
    assert_eq!(
        got[5],
        (Location::Line(6), Err(Problem::NotAnObject("an array")))
    );
    assert_eq!(got[6], (Location::Line(7), Err(Problem::NotUtf8)));
    // Line 8 is blank: no record.
    assert_eq!(got[7], (Location::Line(9), Ok("first".into())));
    assert!(
        matches!(&got[8], (Location::Line(10), Err(Problem::InvalidJson(m))) if m.contains("trailing characters")),
        "{:?}",
        got[8]
    );
    assert_eq!(got[9], (Location::Line(11), Ok("no final newline".into())));
    assert_eq!(got.len(), 10);
    let shown = BadRecord {
        path: path.clone(),
        location: got[3].0,
        problem: got[3].1.clone().unwrap_err(),
    }
    .to_string();
    assert_eq!(
        shown,
        format!(
            "{}: line 4: field \"text\" is a number, not a string",
            path.display()
        )
    );
}

#[test]
fn text_documents_with_bad_bytes_are_bad_records_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.txt");
    fs::write(
        &path,
        b"ok one\n\nfine\ncaf\xe9 au lait\nand more\n\nlast\r\n",
    )
    .unwrap();
    let parsed = read_all(&named(&path)).unwrap();
    let got: Vec<_> = parsed.into_iter().map(|(_, l, r)| (l, r)).collect();
    assert_eq!(
        got,
        [
            (Location::Line(1), Ok("ok one".to_string())),
            (Location::Line(4), Err(Problem::NotUtf8)),
            (Location::Line(7), Ok("last".to_string())),
        ]
    );
}

#[test]
fn truncated_compressed_files_end_in_one_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    // Over 128 KiB, zstd's block size: a cut block cannot be decoded at all.
    let docs = sample_documents(4000);
    let jsonl = jsonl_text(&docs);
    for (name, bytes) in [
        ("cut.jsonl.gz", gzip(jsonl.as_bytes())),
        ("cut.jsonl.zst", zstd(jsonl.as_bytes())),
        ("cut.txt.gz", gzip((docs.join("\n\n") + "\n").as_bytes())),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let parsed = read_all(&named(&path)).unwrap();
        let (last, good) = parsed.split_last().unwrap();
        assert!(
            matches!(&last.2, Err(Problem::Unreadable(m)) if m.contains("corrupt or truncated")),
            "{name}: {:?}",
            last.2
        );
        // Every record before it is a whole document, in order.
        assert!(good.len() > 10, "{name}: {}", good.len());
        assert_eq!(texts(good), docs[..good.len()], "{name}");
        let Location::Line(line) = last.1 else {
            panic!("{name}: {:?}", last.1)
        };
        let expected_line = if name.ends_with(".txt.gz") {
            3 * good.len() as u64 + 1
        } else {
            good.len() as u64 + 1
        };
        assert!(line >= expected_line, "{name}: line {line}");
    }
    // Not compressed at all.
    let path = dir.path().join("garbage.jsonl.zst");
    fs::write(&path, b"this is not zstd").unwrap();
    let parsed = read_all(&named(&path)).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].1, Location::Line(1));
}

#[test]
fn broken_parquet_files_are_bad_records_or_column_errors() {
    let dir = tempfile::tempdir().unwrap();
    let docs = sample_documents(30);
    let mut rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    rows[12] = None;
    let path = dir.path().join("nulls.parquet");
    write_parquet(&path, &rows, 10, ParquetCompression::SNAPPY);
    let parsed = read_all(&named(&path)).unwrap();
    assert_eq!(parsed.len(), 30);
    assert_eq!(
        (parsed[12].1, parsed[12].2.clone()),
        (
            Location::Row { group: 1, row: 2 },
            Err(Problem::NotAString {
                field: "text".into(),
                kind: "null"
            })
        )
    );

    // Not parquet at all: one bad record for the file.
    let garbage = dir.path().join("garbage.parquet");
    fs::write(&garbage, b"PAR1 and then nothing useful").unwrap();
    let parsed = read_all(&named(&garbage)).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].1, Location::File);
    assert!(
        matches!(&parsed[0].2, Err(Problem::Unreadable(m)) if m.starts_with("not a readable parquet file")),
        "{:?}",
        parsed[0].2
    );

    // A damaged row group: its page header overwritten. The other groups still read.
    let damaged = dir.path().join("damaged.parquet");
    let full: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    write_parquet(&damaged, &full, 10, ParquetCompression::SNAPPY);
    let offset = {
        let reader = SerializedFileReader::new(fs::File::open(&damaged).unwrap()).unwrap();
        reader.metadata().row_group(1).column(1).data_page_offset() as usize
    };
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[offset..offset + 16].fill(0xff);
    fs::write(&damaged, bytes).unwrap();
    let parsed = read_all(&named(&damaged)).unwrap();
    let bad: Vec<_> = parsed.iter().filter(|(_, _, r)| r.is_err()).collect();
    assert_eq!(bad.len(), 1, "{parsed:?}");
    assert_eq!(bad[0].1, Location::Row { group: 1, row: 0 });
    assert!(
        matches!(&bad[0].2, Err(Problem::Unreadable(m)) if m.starts_with("unreadable row group")),
        "{:?}",
        bad[0].2
    );
    assert_eq!(parsed.len(), 21);

    // No such column: an error naming the columns there are.
    let counter = Arc::new(AtomicU64::new(0));
    let err = read_file(&named(&path)[0], 0, "content", &counter, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(err.is_bad_input());
    assert_eq!(
        err.to_string(),
        format!(
            "{}: column \"content\": no such column (columns: id, text); --text-field names \
             the column that holds the text",
            path.display()
        )
    );
}

#[test]
fn whole_text_joins_records_and_stops_at_the_first_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let docs = sample_documents(25);
    let joined = docs.join("\n\n");
    let rows: Vec<Option<&str>> = docs.iter().map(|d| Some(d.as_str())).collect();
    let parquet = dir.path().join("docs.parquet");
    write_parquet(&parquet, &rows, 10, ParquetCompression::SNAPPY);
    assert_eq!(read_whole_text(&parquet, "text").unwrap(), joined);
    let jsonl = dir.path().join("docs.jsonl.gz");
    fs::write(&jsonl, gzip(jsonl_text(&docs).as_bytes())).unwrap();
    assert_eq!(read_whole_text(&jsonl, "text").unwrap(), joined);
    // A text file is one document, its blank lines kept as they are.
    let text = dir.path().join("wiki.txt.zst");
    let raw = " = A = \n\n\n x \n";
    fs::write(&text, zstd(raw.as_bytes())).unwrap();
    assert_eq!(read_whole_text(&text, "text").unwrap(), raw);

    let mut with_null = rows.clone();
    with_null[13] = None;
    write_parquet(&parquet, &with_null, 10, ParquetCompression::SNAPPY);
    let err = read_whole_text(&parquet, "text").unwrap_err().to_string();
    assert!(
        err.ends_with("docs.parquet: row group 1, row 3: field \"text\" is null, not a string"),
        "{err}"
    );
    let err = read_whole_text(&parquet, "body").unwrap_err().to_string();
    assert!(
        err.contains("docs.parquet") && err.contains("body"),
        "{err}"
    );
    fs::write(&text, b"not zstd").unwrap();
    let err = read_whole_text(&text, "text").unwrap_err().to_string();
    assert!(
        err.contains("wiki.txt.zst: corrupt or truncated zstd"),
        "{err}"
    );
}
