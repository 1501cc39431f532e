//! Atomic writes: a reader (or a crash) sees the old content or the whole new one, never a torn
//! file or a half-filled directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A name for a temporary sibling of `target` that no other writer uses: the process id and a
/// counter of this process, behind `.<target>.tmp-` (so listings can tell temporaries apart).
pub fn temporary_name(target: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}{TMP_MARK}{}-{n}", std::process::id()))
}

const TMP_MARK: &str = ".tmp-";

/// Whether `name` is one of [`temporary_name`]'s: `.<target>.tmp-<pid>-<n>`.
pub fn is_temporary_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    rest.rsplit_once(TMP_MARK).is_some_and(|(target, tail)| {
        let numbers: Vec<&str> = tail.split('-').collect();
        !target.is_empty()
            && numbers.len() == 2
            && numbers
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Deletes the temporaries ([`is_temporary_name`]) directly in `dir`, files or directories, and
/// returns them. Only for a process that knows no other writer uses `dir` (it holds the
/// directory's [`crate::DirLock`]): what it removes are the leftovers of writers that died.
pub fn remove_temporaries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !is_temporary_name(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
        removed.push(path);
    }
    Ok(removed)
}

/// The directory a path lives in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a directory's entries (a rename into it) to disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path`: a temporary file next to it, flushed to disk, renamed over `path`,
/// and the rename flushed. Creates the parent directory. On error nothing is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir)?;
    let tmp = temporary_name(path);
    let written = File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the temporary file is useless now; the write error is what matters.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Moves the finished directory `tmp` to `dst` in one rename (after flushing `tmp`'s entries),
/// replacing a `dst` that exists: that one is moved aside first (rename cannot replace a
/// non-empty directory), put back if the move in fails, and deleted after. `tmp` and `dst` must
/// share a file system.
pub fn publish_dir(tmp: &Path, dst: &Path) -> io::Result<()> {
    fsync_dir(tmp)?;
    if dst.exists() {
        let old = temporary_name(dst);
        fs::rename(dst, &old)?;
        if let Err(e) = fs::rename(tmp, dst) {
            // Best effort: the error of the move in is what the caller needs to hear.
            let _ = fs::rename(&old, dst);
            return Err(e);
        }
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(tmp, dst)?;
    }
    fsync_dir(parent(dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sorted_names;

    #[test]
    fn writes_replace_the_file_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(sorted_names(&dir.path().join("sub")).unwrap(), ["x.json"]);
        // A directory in the way: an error, nothing left behind.
        fs::create_dir(dir.path().join("blocked")).unwrap();
        assert!(write_atomic(&dir.path().join("blocked"), b"x").is_err());
        assert_eq!(sorted_names(dir.path()).unwrap(), ["blocked", "sub"]);
    }

    #[test]
    fn temporary_names_differ_and_are_hidden() {
        let a = temporary_name(Path::new("runs/x/step-5"));
        let b = temporary_name(Path::new("runs/x/step-5"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("runs/x")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".step-5.tmp-"), "{name}");
        assert!(name.contains(&std::process::id().to_string()), "{name}");
    }

    #[test]
    fn temporaries_are_recognised_and_removed_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("step-5");
        let tmp_dir = temporary_name(&target);
        fs::create_dir(&tmp_dir).unwrap();
        fs::write(tmp_dir.join("weights"), "partial").unwrap();
        let tmp_file = temporary_name(&dir.path().join("config.toml"));
        fs::write(&tmp_file, "partial").unwrap();
        for keep in [
            "step-5",
            ".hidden",
            ".x.tmp-",
            ".x.tmp-12",
            ".x.tmp-a-1",
            "x.tmp-1-2",
        ] {
            assert!(!is_temporary_name(keep), "{keep}");
            fs::write(dir.path().join(keep), "keep").unwrap();
        }
        let mut removed = remove_temporaries(dir.path()).unwrap();
        removed.sort();
        let mut expected = vec![tmp_dir, tmp_file];
        expected.sort();
        assert_eq!(removed, expected);
        assert_eq!(sorted_names(dir.path()).unwrap().len(), 6);
        assert!(remove_temporaries(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn publishing_replaces_a_directory_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        for content in ["first", "second"] {
            let tmp = temporary_name(&dst);
            fs::create_dir(&tmp).unwrap();
            fs::write(tmp.join("f"), content).unwrap();
            publish_dir(&tmp, &dst).unwrap();
            assert_eq!(fs::read_to_string(dst.join("f")).unwrap(), content);
        }
        assert_eq!(sorted_names(dir.path()).unwrap(), ["out"]);
    }
}
