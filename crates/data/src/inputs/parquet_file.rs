//! Parquet files: one row per document, the text in a top-level string column, read row group
//! by row group and a batch of rows at a time (memory holds one batch of values).

use std::fs;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::{InputFile, Location, Problem, Raw};
use crate::error::{DataError, Result};

/// Rows decoded per call.
const ROWS_PER_READ: usize = 1024;

/// Reads the text column of every row. A file that is not parquet is one bad record (the whole
/// file); a row group that fails to decode is one bad record at the row where it failed (the
/// rest of the group is skipped); a null is a bad record. A file without the column, or with a
/// column that is not a plain string column, is an error: that is the wrong `--text-field`,
/// not bad data.
pub(super) fn read(
    file: &InputFile,
    field: &str,
    bytes_read: &Arc<AtomicU64>,
    emit: &mut dyn FnMut(Location, Raw) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let handle = fs::File::open(&file.path).map_err(|e| DataError::io(&file.path, e))?;
    let reader = match SerializedFileReader::new(handle) {
        Ok(reader) => reader,
        Err(e) => {
            let problem = Problem::Unreadable(format!("not a readable parquet file: {e}"));
            return Ok(emit(Location::File, Raw::Bad(problem)));
        }
    };
    let metadata = reader.metadata();
    let schema = metadata.file_metadata().schema_descr();
    let bad_column = |what: String| DataError::ParquetColumn {
        path: file.path.clone(),
        field: field.to_string(),
        what,
    };
    let Some(column) = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == [field])
    else {
        let names: Vec<String> = schema
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        return Err(bad_column(format!(
            "no such column (columns: {}); --text-field names the column that holds the text",
            names.join(", ")
        )));
    };
    let descr = schema.column(column);
    if descr.physical_type() != PhysicalType::BYTE_ARRAY || descr.max_rep_level() > 0 {
        return Err(bad_column(format!(
            "not a string column (physical type {}{})",
            descr.physical_type(),
            if descr.max_rep_level() > 0 {
                ", repeated"
            } else {
                ""
            }
        )));
    }
    let max_def = descr.max_def_level();
    let mut definitions = Vec::new();
    let mut values = Vec::new();
    for group in 0..reader.num_row_groups() {
        let mut row = 0u64;
        let column_reader = reader
            .get_row_group(group)
            .and_then(|g| g.get_column_reader(column));
        let mut strings = match column_reader {
            Ok(ColumnReader::ByteArrayColumnReader(r)) => r,
            Ok(_) => return Err(bad_column("not a byte array column".into())),
            Err(e) => {
                let problem = Problem::Unreadable(format!("unreadable row group: {e}"));
                if emit(Location::Row { group, row }, Raw::Bad(problem)).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
                continue;
            }
        };
        loop {
            definitions.clear();
            values.clear();
            let read =
                strings.read_records(ROWS_PER_READ, Some(&mut definitions), None, &mut values);
            let rows = match read {
                Ok((0, _, _)) => break,
                Ok((rows, _, _)) => rows,
                Err(e) => {
                    let problem = Problem::Unreadable(format!(
                        "unreadable row group: {e}; the rest of the group is skipped"
                    ));
                    if emit(Location::Row { group, row }, Raw::Bad(problem)).is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                    break;
                }
            };
            // Values come only for non-null rows; definition levels only for a nullable column.
            let mut next_value = values.iter();
            let mut levels = definitions.iter();
            for _ in 0..rows {
                let location = Location::Row { group, row };
                row += 1;
                let present = max_def == 0 || levels.next() == Some(&max_def);
                let raw = match present.then(|| next_value.next()) {
                    Some(Some(value)) => Raw::Value(value.data().to_vec()),
                    Some(None) => Raw::Bad(Problem::Unreadable(
                        "unreadable row group: fewer values than rows".into(),
                    )),
                    None => Raw::Bad(Problem::NotAString {
                        field: field.to_string(),
                        kind: "null",
                    }),
                };
                if emit(location, raw).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        let size = metadata.row_group(group).compressed_size();
        bytes_read.fetch_add(u64::try_from(size).unwrap_or(0), Ordering::Relaxed);
    }
    Ok(ControlFlow::Continue(()))
}
