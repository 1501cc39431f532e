//! Scalar metrics: TensorBoard event files (tensorboard-rs) under `<run>/tensorboard/` and the
//! same values as JSON lines in `<run>/metrics.jsonl` (`{"step": N, "<tag>": value, ...}`).
//!
//! On resume, lines of `metrics.jsonl` past the checkpoint's step (written by the interrupted
//! run after its last checkpoint) are dropped so the file reads like one uninterrupted run;
//! TensorBoard itself purges such orphaned steps when a lower step shows up.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glatrain_config::LoggingConfig;
use tensorboard_rs::summary_writer::SummaryWriter;

/// File name of the JSON-lines log in the run directory.
pub const JSONL_FILE: &str = "metrics.jsonl";
/// Directory of the TensorBoard event files in the run directory.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// Writes scalars to the enabled sinks.
pub struct MetricsLogger {
    tb: Option<SummaryWriter>,
    jsonl: Option<(PathBuf, File)>,
}

impl std::fmt::Debug for MetricsLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsLogger")
            .field("tensorboard", &self.tb.is_some())
            .field("jsonl", &self.jsonl.as_ref().map(|(p, _)| p))
            .finish()
    }
}

/// A failure to open or write a metrics file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot write metrics: {source}")]
pub struct MetricsError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl MetricsLogger {
    /// Opens the sinks `cfg` enables in `run_dir`. `resume_step`: the step a resumed run
    /// continues from (later JSON lines are dropped).
    pub fn open(
        run_dir: &Path,
        cfg: &LoggingConfig,
        resume_step: Option<u64>,
    ) -> Result<Self, MetricsError> {
        let tb = if cfg.tensorboard {
            let dir = run_dir.join(TENSORBOARD_DIR);
            fs::create_dir_all(&dir).map_err(|source| MetricsError {
                path: dir.clone(),
                source,
            })?;
            wait_for_fresh_event_file_name(&dir);
            Some(SummaryWriter::new(&dir))
        } else {
            None
        };
        let jsonl = if cfg.jsonl {
            let path = run_dir.join(JSONL_FILE);
            let err = |source| MetricsError {
                path: path.clone(),
                source,
            };
            match resume_step {
                Some(step) if path.exists() => truncate_after(&path, step).map_err(err)?,
                None if path.exists() => fs::remove_file(&path).map_err(err)?,
                _ => {}
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(err)?;
            Some((path, file))
        } else {
            None
        };
        Ok(Self { tb, jsonl })
    }

    /// Records `scalars` (tag, value) at `step` in every sink. Non-finite values are written to
    /// TensorBoard as they are and as `null` in JSON.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<(), MetricsError> {
        if let Some(tb) = &mut self.tb {
            for (tag, value) in scalars {
                tb.add_scalar(tag, *value as f32, step as usize);
            }
        }
        if let Some((path, file)) = &mut self.jsonl {
            let mut obj = serde_json::Map::new();
            obj.insert("step".into(), step.into());
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            obj.insert("time".into(), secs.into());
            for (tag, value) in scalars {
                obj.insert((*tag).to_string(), (*value).into());
            }
            let line = serde_json::Value::Object(obj).to_string();
            writeln!(file, "{line}").map_err(|source| MetricsError {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Pushes buffered events to disk.
    pub fn flush(&mut self) -> Result<(), MetricsError> {
        if let Some(tb) = &mut self.tb {
            tb.flush();
        }
        if let Some((path, file)) = &mut self.jsonl {
            file.flush().map_err(|source| MetricsError {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// tensorboard-rs names its file `events.out.tfevents.<unix seconds>.<host>.<pid>.0` and
/// truncates an existing one: a second writer opened by this process within the same second
/// (a resume in the same process) would erase the first. Wait for the next second then.
fn wait_for_fresh_event_file_name(dir: &Path) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = format!("events.out.tfevents.{:010}.", now.as_secs());
        let suffix = format!(".{}.0", std::process::id());
        let taken = fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(&suffix)
        });
        if !taken {
            return;
        }
        let to_next =
            Duration::from_secs(1).saturating_sub(Duration::from_nanos(now.subsec_nanos() as u64));
        std::thread::sleep(to_next + Duration::from_millis(5));
    }
}

/// Rewrites `path` atomically, keeping only the lines whose `step` is at most `step` (a line
/// that does not parse, such as one cut short by a kill, is dropped too).
fn truncate_after(path: &Path, step: u64) -> std::io::Result<()> {
    let text = fs::read(path)?;
    let mut kept = Vec::with_capacity(text.len());
    for line in text.split(|&b| b == b'\n') {
        let keep = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s <= step);
        if keep {
            kept.extend_from_slice(line);
            kept.push(b'\n');
        }
    }
    glatrain_fs::write_atomic(path, &kept)
}

/// Reading TensorBoard event files back: the TFRecord framing and the few protobuf fields of
/// `Event`/`Summary` that scalars use. Used by the tests (and useful to check a run by hand).
pub mod event_reader {
    use std::path::Path;

    /// One scalar found in an event file.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Scalar {
        pub step: i64,
        pub tag: String,
        pub value: f32,
    }

    /// CRC-32C (Castagnoli), bitwise.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// `bytes` as an array of exactly `N`.
    fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
        bytes
            .try_into()
            .map_err(|_| format!("expected {N} bytes, found {}", bytes.len()))
    }

    /// TFRecord's masked CRC.
    fn masked_crc(data: &[u8]) -> u32 {
        let c = crc32c(data);
        (c.rotate_right(15)).wrapping_add(0xa282_ead8)
    }

    /// Splits a TFRecord file into its records, checking both CRCs of each.
    pub fn records(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let header = bytes
                .get(pos..pos + 12)
                .ok_or(format!("truncated record header at byte {pos}"))?;
            let len = u64::from_le_bytes(fixed(&header[..8])?) as usize;
            let len_crc = u32::from_le_bytes(fixed(&header[8..12])?);
            if masked_crc(&header[..8]) != len_crc {
                return Err(format!("bad length CRC at byte {pos}"));
            }
            let data = bytes
                .get(pos + 12..pos + 12 + len)
                .ok_or(format!("truncated record at byte {pos}"))?;
            let crc_bytes = bytes
                .get(pos + 12 + len..pos + 16 + len)
                .ok_or(format!("missing data CRC at byte {pos}"))?;
            if masked_crc(data) != u32::from_le_bytes(fixed(crc_bytes)?) {
                return Err(format!("bad data CRC at byte {pos}"));
            }
            out.push(data);
            pos += 16 + len;
        }
        Ok(out)
    }

    fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *buf.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    /// One protobuf field: its number, wire type, and payload (bytes for length-delimited and
    /// fixed-width fields, the value for varints).
    struct Field<'a> {
        number: u64,
        wire: u8,
        bytes: &'a [u8],
        varint: u64,
    }

    /// The fields of a protobuf message, in order.
    fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let key = varint(buf, &mut pos)?;
            let (number, wire) = (key >> 3, (key & 7) as u8);
            let take = |len: usize, pos: &mut usize| -> Result<&[u8], String> {
                let bytes = buf.get(*pos..*pos + len).ok_or("truncated field")?;
                *pos += len;
                Ok(bytes)
            };
            let (bytes, value) = match wire {
                0 => (&buf[0..0], varint(buf, &mut pos)?),
                1 => (take(8, &mut pos)?, 0),
                2 => {
                    let len = varint(buf, &mut pos)? as usize;
                    (take(len, &mut pos)?, 0)
                }
                5 => (take(4, &mut pos)?, 0),
                w => return Err(format!("unsupported wire type {w}")),
            };
            out.push(Field {
                number,
                wire,
                bytes,
                varint: value,
            });
        }
        Ok(out)
    }

    /// Every `simple_value` scalar in an event file (`Event.step` = 2, `Event.summary` = 5,
    /// `Summary.value` = 1, `Value.tag` = 1, `Value.simple_value` = 2).
    pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut out = Vec::new();
        for rec in records(&bytes)? {
            let event = fields(rec)?;
            let step = event
                .iter()
                .find(|f| f.number == 2 && f.wire == 0)
                .map_or(0, |f| f.varint as i64);
            for summary in event.iter().filter(|f| f.number == 5 && f.wire == 2) {
                for value in fields(summary.bytes)?
                    .iter()
                    .filter(|f| f.number == 1 && f.wire == 2)
                {
                    let vf = fields(value.bytes)?;
                    let tag = vf.iter().find(|f| f.number == 1 && f.wire == 2);
                    let simple = vf.iter().find(|f| f.number == 2 && f.wire == 5);
                    if let (Some(tag), Some(simple)) = (tag, simple) {
                        out.push(Scalar {
                            step,
                            tag: String::from_utf8_lossy(tag.bytes).into_owned(),
                            value: f32::from_le_bytes(fixed(simple.bytes)?),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir.join(TENSORBOARD_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn event_files_and_jsonl_parse_back() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LoggingConfig::default();
        {
            let mut m = MetricsLogger::open(tmp.path(), &cfg, None).unwrap();
            m.log(1, &[("train/loss", 5.5), ("train/lr", 1e-3)])
                .unwrap();
            m.log(2, &[("train/loss", 4.25), ("eval/ppl", f64::NAN)])
                .unwrap();
            m.flush().unwrap();
        } // drop joins the writer thread
        let files = event_files(tmp.path());
        assert_eq!(files.len(), 1);
        let scalars = event_reader::read_scalars(&files[0]).unwrap();
        let expect = [
            (1, "train/loss", 5.5f32),
            (1, "train/lr", 1e-3),
            (2, "train/loss", 4.25),
        ];
        for (step, tag, value) in expect {
            assert!(
                scalars
                    .iter()
                    .any(|s| s.step == step && s.tag == tag && s.value == value),
                "missing {tag}@{step}={value} in {scalars:?}"
            );
        }
        assert!(scalars
            .iter()
            .any(|s| s.step == 2 && s.tag == "eval/ppl" && s.value.is_nan()));

        let text = fs::read_to_string(tmp.path().join(JSONL_FILE)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 1);
        assert_eq!(lines[0]["train/loss"], 5.5);
        assert_eq!(lines[1]["eval/ppl"], serde_json::Value::Null);
    }

    #[test]
    fn corrupted_record_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut m = MetricsLogger::open(tmp.path(), &LoggingConfig::default(), None).unwrap();
            m.log(3, &[("train/loss", 1.0)]).unwrap();
        }
        let file = &event_files(tmp.path())[0];
        let mut bytes = fs::read(file).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        fs::write(file, bytes).unwrap();
        let err = event_reader::read_scalars(file).unwrap_err();
        assert!(err.contains("CRC"), "{err}");
    }

    #[test]
    fn resume_drops_lines_past_the_checkpoint_and_keeps_event_files() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LoggingConfig::default();
        {
            let mut m = MetricsLogger::open(tmp.path(), &cfg, None).unwrap();
            for step in 1..=5 {
                m.log(step, &[("train/loss", step as f64)]).unwrap();
            }
        }
        // A line cut short by a kill.
        let mut file = OpenOptions::new()
            .append(true)
            .open(tmp.path().join(JSONL_FILE))
            .unwrap();
        file.write_all(b"{\"step\": 2, \"train/lo").unwrap();
        {
            let mut m = MetricsLogger::open(tmp.path(), &cfg, Some(3)).unwrap();
            m.log(4, &[("train/loss", 40.0)]).unwrap();
        }
        let text = fs::read_to_string(tmp.path().join(JSONL_FILE)).unwrap();
        let steps: Vec<(u64, f64)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    v["train/loss"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(steps, vec![(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]);
        // Two writers in one process: two event files, neither truncated.
        let files = event_files(tmp.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(event_reader::read_scalars(&files[0]).unwrap().len(), 5);
        assert_eq!(event_reader::read_scalars(&files[1]).unwrap().len(), 1);
    }

    #[test]
    fn fresh_run_replaces_an_old_jsonl() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(JSONL_FILE), "{\"step\": 9}\n").unwrap();
        let cfg = LoggingConfig {
            tensorboard: false,
            ..LoggingConfig::default()
        };
        let mut m = MetricsLogger::open(tmp.path(), &cfg, None).unwrap();
        m.log(1, &[("a", 1.0)]).unwrap();
        m.flush().unwrap();
        let text = fs::read_to_string(tmp.path().join(JSONL_FILE)).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(!tmp.path().join(TENSORBOARD_DIR).exists());
    }

    /// TensorBoard's own reader, when a Python with `tensorboard` is available (e.g.
    /// `pip install --target /tmp/tbpy tensorboard` and `PYTHONPATH=/tmp/tbpy`).
    #[test]
    fn tensorboard_python_reader_when_available() {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import tensorboard"])
            .output();
        if !matches!(probe, Ok(ref o) if o.status.success()) {
            eprintln!("skipped: python3 cannot import tensorboard");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut m = MetricsLogger::open(tmp.path(), &LoggingConfig::default(), None).unwrap();
            m.log(7, &[("train/loss", 2.5)]).unwrap();
        }
        let script = "import sys\n\
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
ea = EventAccumulator(sys.argv[1]); ea.Reload()\n\
for e in ea.Scalars('train/loss'): print(e.step, e.value)\n";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(tmp.path().join(TENSORBOARD_DIR))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7 2.5");
    }
}
