//! Directory listings in a fixed order.

use std::fs;
use std::io;
use std::path::Path;

/// The names of the entries of `dir`, sorted (as UTF-8, lossily), whatever order the file
/// system lists them in.
pub fn sorted_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<String>>>()?;
    names.sort();
    Ok(names)
}
