//! Atomic checkpoints: `<run>/checkpoints/step-<N>/` holding
//!
//! - `weights.safetensors`: the fp32 master weights, keys = VarStore paths;
//! - `optimizer.safetensors`: AdamW moments, keys `exp_avg.<name>` / `exp_avg_sq.<name>`;
//! - `state.json`: step, tokens, loss scaler, loader position, skips, seed, elapsed time, ...;
//! - `config.toml`: the resolved config of the run;
//! - `manifest.json`: sha256 and size of each file above, written last.
//!
//! A checkpoint is written into a temporary directory beside its final one, named by the writing
//! process (`.step-<N>.tmp-<pid>-<n>`, [`glatrain_fs::temporary_name`]), every file and the
//! directory are fsynced, then the directory is renamed to `step-<N>` (atomic on POSIX) and the
//! parent fsynced ([`glatrain_fs::publish_dir`]). A write that fails removes its temporary
//! directory; one cut short by a kill leaves it, and the trainer removes such leftovers when it
//! starts, holding the run directory's lock. A checkpoint without a manifest, or whose files do
//! not match it, is never loaded: [`find_latest`] reports it by name and falls back to an older
//! one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// Version of the checkpoint layout, in the manifest.
pub const FORMAT_VERSION: u32 = 1;
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The files every complete checkpoint lists in its manifest.
pub const REQUIRED_FILES: [&str; 4] = [WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE];

/// Errors reading or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: cannot write checkpoint file: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: incomplete checkpoint (no {MANIFEST_FILE}: its write did not finish)")]
    Incomplete { dir: PathBuf },
    #[error("{dir}: corrupt checkpoint: {reason}")]
    Corrupt { dir: PathBuf, reason: String },
    #[error("{path}: cannot write tensors: {message}")]
    WriteTensors { path: PathBuf, message: String },
    #[error("{path}: cannot read tensors: {message}")]
    ReadTensors { path: PathBuf, message: String },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{dir}: no checkpoint to resume from{}", list_rejected(.rejected))]
    NoCheckpoint { dir: PathBuf, rejected: Vec<String> },
    #[error("{dir}: no complete checkpoint in it{}", list_rejected(.rejected))]
    NothingToLoad { dir: PathBuf, rejected: Vec<String> },
    #[error("{path}: no such checkpoint or run directory")]
    NotFound { path: PathBuf },
}

fn list_rejected(rejected: &[String]) -> String {
    if rejected.is_empty() {
        String::new()
    } else {
        format!(" (rejected: {})", rejected.join("; "))
    }
}

impl CheckpointError {
    /// Every error about an existing checkpoint is the user's input; failing to write one is not.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            CheckpointError::Write { .. } | CheckpointError::WriteTensors { .. }
        )
    }
}

/// One file's entry in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub files: BTreeMap<String, FileEntry>,
}

/// What goes into a checkpoint.
#[derive(Debug)]
pub struct CheckpointContents<'a, S: Serialize> {
    pub step: u64,
    pub weights: &'a [(String, Tensor)],
    pub optimizer: &'a [(String, Tensor)],
    pub state: &'a S,
    pub config_toml: &'a str,
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct LoadedCheckpoint<S> {
    pub dir: PathBuf,
    pub step: u64,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub state: S,
    pub config_toml: String,
}

/// `step-<N>` directory name.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_path(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(write_err(path))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(write_err(path))?;
    f.write_all(bytes).map_err(write_err(path))?;
    f.sync_all().map_err(write_err(path))
}

/// Writes `tensors` (moved to CPU, made contiguous) as safetensors and fsyncs the file.
fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let failed = |e: tch::TchError| CheckpointError::WriteTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let cpu = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
            Ok((name.as_str(), t))
        })
        .collect::<Result<Vec<(&str, Tensor)>, tch::TchError>>()
        .map_err(failed)?;
    Tensor::write_safetensors(&cpu, path).map_err(failed)?;
    fsync_path(path)
}

/// Reads a safetensors file into a name -> CPU tensor map.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| CheckpointError::ReadTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(tensors.into_iter().collect())
}

/// sha256 (hex) and size of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<FileEntry, CheckpointError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(read_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        sha256: hex::encode(hasher.finalize()),
        bytes,
    })
}

/// Writes a checkpoint atomically under `root` (the run's `checkpoints/` directory) and returns
/// its final path. A checkpoint of the same step that already exists (for example a corrupt one
/// a resume skipped) is replaced. On error nothing of this write is left behind, and the error
/// names the path that failed.
pub fn save<S: Serialize>(
    root: &Path,
    contents: &CheckpointContents<'_, S>,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(root).map_err(write_err(root))?;
    let dst = root.join(step_dir_name(contents.step));
    let tmp = glatrain_fs::temporary_name(&dst);
    fs::create_dir(&tmp).map_err(write_err(&tmp))?;
    let written = write_files(&tmp, contents)
        .and_then(|()| glatrain_fs::publish_dir(&tmp, &dst).map_err(write_err(&dst)));
    if let Err(e) = written {
        // Best effort: the write's own error is what matters; a leftover is removed by the
        // next run that locks the directory.
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(dst)
}

/// The checkpoint's files in `dir`, the manifest last.
fn write_files<S: Serialize>(
    dir: &Path,
    contents: &CheckpointContents<'_, S>,
) -> Result<(), CheckpointError> {
    write_tensors(&dir.join(WEIGHTS_FILE), contents.weights)?;
    write_tensors(&dir.join(OPTIMIZER_FILE), contents.optimizer)?;
    write_json(&dir.join(STATE_FILE), contents.state)?;
    write_file(&dir.join(CONFIG_FILE), contents.config_toml.as_bytes())?;
    // Hash what is on disk, not what was meant to be written.
    let mut files = BTreeMap::new();
    for name in REQUIRED_FILES {
        files.insert(name.to_string(), sha256_file(&dir.join(name))?);
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: contents.step,
        files,
    };
    write_json(&dir.join(MANIFEST_FILE), &manifest)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), CheckpointError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| CheckpointError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_file(path, &json)
}

/// `step-<N>` directories under `root`, newest first. Temporary directories are not listed.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(root).map_err(read_err(root))? {
        let entry = entry.map_err(read_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step_dir(&name) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(out)
}

/// Reads and checks `dir`'s manifest against the files on disk: every required file present,
/// sizes and sha256 equal.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        dir: dir.to_path_buf(),
        reason,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.exists() {
        return Err(CheckpointError::Incomplete {
            dir: dir.to_path_buf(),
        });
    }
    let text = fs::read_to_string(&manifest_path).map_err(read_err(&manifest_path))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| corrupt(format!("{MANIFEST_FILE} does not parse: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "{MANIFEST_FILE} has format_version {}, this build reads {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    for name in REQUIRED_FILES {
        if !manifest.files.contains_key(name) {
            return Err(corrupt(format!("{MANIFEST_FILE} does not list {name}")));
        }
    }
    for (name, want) in &manifest.files {
        let path = dir.join(name);
        if !path.exists() {
            return Err(corrupt(format!("{name} is missing")));
        }
        let got = sha256_file(&path)?;
        if got.bytes != want.bytes {
            return Err(corrupt(format!(
                "{name} has {} bytes, the manifest says {}",
                got.bytes, want.bytes
            )));
        }
        if got.sha256 != want.sha256 {
            return Err(corrupt(format!(
                "{name} sha256 {} does not match the manifest's {}",
                got.sha256, want.sha256
            )));
        }
    }
    Ok(manifest)
}

/// The newest checkpoint under `root` that verifies, and a message for each newer one that
/// did not (named, with the reason). `Ok((None, rejected))` when none verifies.
pub fn find_latest(root: &Path) -> Result<(Option<PathBuf>, Vec<String>), CheckpointError> {
    let mut rejected = Vec::new();
    for (_, dir) in list(root)? {
        match verify(&dir) {
            Ok(_) => return Ok((Some(dir), rejected)),
            Err(e) => rejected.push(e.to_string()),
        }
    }
    Ok((None, rejected))
}

/// Verifies `dir` and reads everything in it.
pub fn load<S: DeserializeOwned>(dir: &Path) -> Result<LoadedCheckpoint<S>, CheckpointError> {
    let manifest = verify(dir)?;
    let state_path = dir.join(STATE_FILE);
    let state_text = fs::read_to_string(&state_path).map_err(read_err(&state_path))?;
    let state = serde_json::from_str(&state_text).map_err(|e| CheckpointError::Json {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    let config_path = dir.join(CONFIG_FILE);
    let config_toml = fs::read_to_string(&config_path).map_err(read_err(&config_path))?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        step: manifest.step,
        weights: read_tensors(&dir.join(WEIGHTS_FILE))?,
        optimizer: read_tensors(&dir.join(OPTIMIZER_FILE))?,
        state,
        config_toml,
    })
}

/// Deletes the oldest complete checkpoints (those with a manifest) beyond the newest `keep`.
/// Incomplete ones are left for a person to look at; they are never loaded.
pub fn prune(root: &Path, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let complete: Vec<PathBuf> = list(root)?
        .into_iter()
        .map(|(_, dir)| dir)
        .filter(|dir| dir.join(MANIFEST_FILE).exists())
        .collect();
    let mut removed = Vec::new();
    for dir in complete.into_iter().skip(keep.max(1)) {
        fs::remove_dir_all(&dir).map_err(write_err(&dir))?;
        removed.push(dir);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct St {
        step: u64,
        note: String,
    }

    fn save_step(root: &Path, step: u64) -> PathBuf {
        let w = vec![(
            "layer.weight".to_string(),
            Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) * step as f64,
        )];
        let o = vec![(
            "exp_avg.layer.weight".to_string(),
            Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
        )];
        let st = St {
            step,
            note: "hi".into(),
        };
        save(
            root,
            &CheckpointContents {
                step,
                weights: &w,
                optimizer: &o,
                state: &st,
                config_toml: "[model]\ntype = \"gla\"\n",
            },
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = save_step(tmp.path(), 7);
        assert_eq!(dir, tmp.path().join("step-7"));
        let ck: LoadedCheckpoint<St> = load(&dir).unwrap();
        assert_eq!(ck.step, 7);
        assert_eq!(ck.state.note, "hi");
        assert!(ck.config_toml.contains("gla"));
        let w = &ck.weights["layer.weight"];
        assert_eq!(w.size(), vec![2, 3]);
        assert_eq!(w.double_value(&[1, 2]), 35.0);
        assert!(ck.optimizer.contains_key("exp_avg.layer.weight"));
        // Nothing temporary is left behind.
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step-7".to_string()]);
    }

    #[test]
    fn interrupted_writes_are_skipped_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        save_step(root, 10);
        // A crash before the rename leaves only a temporary directory.
        fs::create_dir(root.join(".step-30.tmp-999-0")).unwrap();
        fs::write(
            root.join(".step-30.tmp-999-0/weights.safetensors"),
            b"partial",
        )
        .unwrap();
        // A directory without manifest.
        let s20 = save_step(root, 20);
        fs::remove_file(s20.join(MANIFEST_FILE)).unwrap();
        // A corrupted file (same size, one byte flipped).
        let s25 = save_step(root, 25);
        let mut bytes = fs::read(s25.join(WEIGHTS_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(s25.join(WEIGHTS_FILE), &bytes).unwrap();
        // A missing file.
        let s27 = save_step(root, 27);
        fs::remove_file(s27.join(OPTIMIZER_FILE)).unwrap();

        let (found, rejected) = find_latest(root).unwrap();
        assert_eq!(found.unwrap(), root.join("step-10"));
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(
            rejected[0].contains("step-27")
                && rejected[0].contains("optimizer.safetensors is missing")
        );
        assert!(rejected[1].contains("step-25") && rejected[1].contains("sha256"));
        assert!(rejected[2].contains("step-20") && rejected[2].contains("incomplete"));
        // Each bad one is refused by load too.
        for dir in [&s20, &s25, &s27] {
            let err = load::<St>(dir).unwrap_err();
            assert!(err.is_bad_input());
            assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
        }
        let ok: LoadedCheckpoint<St> = load(&root.join("step-10")).unwrap();
        assert_eq!(ok.state.step, 10);
    }

    #[test]
    fn truncated_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = save_step(tmp.path(), 3);
        let bytes = fs::read(dir.join(STATE_FILE)).unwrap();
        fs::write(dir.join(STATE_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("bytes"), "{err}");
    }

    /// Saving replaces a bad checkpoint of its step, and never touches another writer's
    /// temporary directory (that writer may be alive; leftovers are removed under the lock).
    #[test]
    fn saving_replaces_a_bad_checkpoint_and_leaves_other_writers_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let s5 = save_step(root, 5);
        fs::remove_file(s5.join(MANIFEST_FILE)).unwrap();
        let theirs = root.join(".step-9.tmp-1-0");
        fs::create_dir(&theirs).unwrap();
        save_step(root, 5);
        verify(&s5).unwrap();
        assert!(theirs.exists());
    }

    /// State that cannot be serialized: a write that fails half-way.
    struct Unwritable;

    impl Serialize for Unwritable {
        fn serialize<Ser: serde::Serializer>(&self, _: Ser) -> Result<Ser::Ok, Ser::Error> {
            Err(serde::ser::Error::custom("refused"))
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let w = vec![(
            "w".to_string(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        )];
        let err = save(
            root,
            &CheckpointContents {
                step: 3,
                weights: &w,
                optimizer: &w,
                state: &Unwritable,
                config_toml: "",
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&*root.to_string_lossy()) && msg.contains("state.json: invalid JSON"),
            "{msg}"
        );
        assert_eq!(fs::read_dir(root).unwrap().count(), 0, "left behind");
    }

    #[test]
    fn prune_keeps_the_newest_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for step in [1, 2, 3, 4] {
            save_step(root, step);
        }
        let s5 = save_step(root, 5);
        fs::remove_file(s5.join(MANIFEST_FILE)).unwrap();
        let removed = prune(root, 2).unwrap();
        assert_eq!(removed, vec![root.join("step-2"), root.join("step-1")]);
        let left: Vec<u64> = list(root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, vec![5, 4, 3]);
    }

    #[test]
    fn no_checkpoint_lists_rejections() {
        let err = CheckpointError::NoCheckpoint {
            dir: "runs/x/checkpoints".into(),
            rejected: vec!["runs/x/checkpoints/step-3: incomplete".into()],
        };
        let msg = err.to_string();
        assert!(
            msg.contains("runs/x/checkpoints") && msg.contains("step-3"),
            "{msg}"
        );
    }
}
