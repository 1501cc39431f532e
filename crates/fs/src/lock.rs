//! One writer per directory: an exclusive lock held for as long as a process works in it.
//!
//! The lock is the operating system's (`flock` through [`File::try_lock`]) on `<dir>/lock`, so a
//! process that dies, even by SIGKILL, releases it with its file descriptors and a stale lock
//! never blocks anyone. The file also names the holder (pid and host) for the message a refused
//! process prints; where the file system cannot lock files, that record is the lock: a holder
//! that is not running any more on this host is taken over.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// File name of the lock inside the locked directory.
pub const LOCK_FILE: &str = "lock";

/// The process recorded in a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
}

impl Holder {
    /// This process.
    fn me() -> Self {
        Holder {
            pid: std::process::id(),
            host: host_name(),
        }
    }

    /// Whether the holder may still be running: a process of this host is checked by its pid,
    /// one of another host cannot be.
    fn may_be_running(&self) -> bool {
        self.host != host_name() || Path::new("/proc").join(self.pid.to_string()).exists()
    }

    fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .map(str::trim)
        };
        Some(Holder {
            pid: field("pid")?.parse().ok()?,
            host: field("host")?.to_string(),
        })
    }

    fn to_text(&self) -> String {
        format!("pid={}\nhost={}\n", self.pid, self.host)
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "process {} on {}", self.pid, self.host)
    }
}

/// The host name (`/proc/sys/kernel/hostname`), or `unknown host`.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// Why a directory could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock; `holder` is what its lock file says, when readable.
    Held {
        dir: PathBuf,
        holder: Option<Holder>,
    },
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { dir, holder } => {
                let who = holder
                    .as_ref()
                    .map_or_else(|| "another process".to_string(), Holder::to_string);
                write!(
                    f,
                    "{} is in use by {who} (lock file {}): one run directory has one writer; wait \
                     for that process to finish or stop it (a --resume continues its run \
                     afterwards), or choose another run.name",
                    dir.display(),
                    dir.join(LOCK_FILE).display()
                )
            }
            LockError::Io { path, source } => {
                write!(f, "{}: cannot lock: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Held { .. } => None,
            LockError::Io { source, .. } => Some(source),
        }
    }
}

/// An exclusive lock on a directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    dir: PathBuf,
    /// A holder recorded by a process that ended without releasing the lock.
    stale: Option<Holder>,
}

impl DirLock {
    /// Locks `dir` (created if missing) or says who holds it. Never waits.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        loop {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path))?;
            let recorded = read_holder(&mut file);
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(LockError::Held {
                        dir: dir.to_path_buf(),
                        holder: recorded,
                    })
                }
                // No locks on this file system: the record is the lock.
                Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
                    if let Some(holder) = recorded.as_ref().filter(|h| h.may_be_running()) {
                        return Err(LockError::Held {
                            dir: dir.to_path_buf(),
                            holder: Some(holder.clone()),
                        });
                    }
                }
                Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
            }
            // A holder that removed the lock file (with the directory it had created) between
            // our open and our lock left us locking an orphan: open the path again.
            let same = fs::metadata(&path).is_ok_and(|on_disk| {
                file.metadata()
                    .is_ok_and(|ours| ours.ino() == on_disk.ino() && ours.dev() == on_disk.dev())
            });
            if !same {
                continue;
            }
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(Holder::me().to_text().as_bytes()))
                .and_then(|()| file.sync_data())
                .map_err(io_err(&path))?;
            return Ok(DirLock {
                file,
                dir: dir.to_path_buf(),
                stale: recorded,
            });
        }
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process a lock file still named when this lock was taken: one that ended without
    /// releasing it (killed, or crashed).
    pub fn stale_holder(&self) -> Option<&Holder> {
        self.stale.as_ref()
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // An empty record means "free"; closing the file releases the OS lock. Best effort: a
        // record left behind is recognised as stale by the next process.
        let _ = self.file.set_len(0);
    }
}

/// The holder named by a lock file (empty or unreadable: none).
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Holder::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runs/x");
        let first = DirLock::acquire(&dir).unwrap();
        assert_eq!(first.dir(), dir);
        assert_eq!(first.stale_holder(), None);
        let err = DirLock::acquire(&dir).unwrap_err();
        let LockError::Held { holder, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(holder.as_ref(), Some(&Holder::me()));
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("process {}", std::process::id()))
                && msg.contains(&*dir.join(LOCK_FILE).to_string_lossy()),
            "{msg}"
        );
        drop(first);
        let again = DirLock::acquire(&dir).unwrap();
        assert_eq!(again.stale_holder(), None, "a released lock is not stale");
    }

    #[test]
    fn the_record_of_a_dead_process_is_taken_over_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        // What a process killed while holding the lock leaves: its record, no OS lock.
        let dead = Holder {
            pid: u32::MAX,
            host: host_name(),
        };
        fs::write(tmp.path().join(LOCK_FILE), dead.to_text()).unwrap();
        assert!(!dead.may_be_running());
        let lock = DirLock::acquire(tmp.path()).unwrap();
        assert_eq!(lock.stale_holder(), Some(&dead));
        let text = fs::read_to_string(tmp.path().join(LOCK_FILE)).unwrap();
        assert_eq!(Holder::parse(&text), Some(Holder::me()));
        drop(lock);
        assert_eq!(fs::read_to_string(tmp.path().join(LOCK_FILE)).unwrap(), "");
    }

    #[test]
    fn holders_of_other_hosts_may_be_running() {
        let other = Holder {
            pid: u32::MAX,
            host: format!("not-{}", host_name()),
        };
        assert!(other.may_be_running());
        assert!(Holder::me().may_be_running());
        assert_eq!(Holder::parse("garbage"), None);
    }

    #[test]
    fn an_unusable_directory_is_an_io_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = DirLock::acquire(&file.join("run")).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(err.to_string().contains("file/run"), "{err}");
    }
}
