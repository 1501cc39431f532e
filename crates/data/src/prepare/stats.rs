//! How a `prepare` run went: sizes, counts, time, bad records; and its summary line.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::inputs::BadRecord;

/// Counts and times of one [`super::prepare`] run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareStats {
    /// Input files read.
    pub files: usize,
    /// Their size on disk (compressed, for compressed files).
    pub input_bytes: u64,
    /// UTF-8 bytes of the documents tokenized, separators included (both splits).
    pub text_bytes: u64,
    /// Documents tokenized.
    pub documents: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Documents skipped for being empty or all whitespace.
    pub empty_documents: u64,
    /// Bad records skipped (`OnBadRecord::Skip`).
    pub bad_records: u64,
    /// Those by [`crate::inputs::Problem::kind`].
    pub bad_by_kind: BTreeMap<&'static str, u64>,
    /// The first skipped bad records.
    pub bad_examples: Vec<BadRecord>,
    /// Worker threads.
    pub threads: usize,
    /// Wall time of the tokenizing pass (reading, parsing, tokenizing, writing).
    pub elapsed: Duration,
    /// Time the workers spent parsing and tokenizing, summed over workers.
    pub worker_busy: Duration,
    /// Wall time of BPE training, for `bpe:<vocab>`.
    pub bpe_training: Option<Duration>,
}

impl PrepareStats {
    /// The end-of-run summary, one fact per line.
    pub fn summary(&self) -> String {
        let seconds = self.elapsed.as_secs_f64().max(1e-9);
        let mut lines = vec![format!(
            "tokenized {} of text in {}: {:.1} MB/s, {} tokens/s; {} documents, {} tokens",
            bytes(self.text_bytes),
            duration(self.elapsed),
            self.text_bytes as f64 / seconds / 1e6,
            si(self.tokens as f64 / seconds),
            thousands(self.documents),
            thousands(self.tokens),
        )];
        lines.push(format!(
            "read {} from {} file{}; {} worker thread{}, busy parsing and tokenizing {:.0}% of \
             the time",
            bytes(self.input_bytes),
            self.files,
            if self.files == 1 { "" } else { "s" },
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            100.0 * self.worker_busy.as_secs_f64() / (seconds * self.threads.max(1) as f64)
        ));
        if let Some(training) = self.bpe_training {
            lines.push(format!(
                "trained the BPE tokenizer in {} (before tokenizing)",
                duration(training)
            ));
        }
        if self.empty_documents > 0 {
            lines.push(format!(
                "skipped {}",
                count(self.empty_documents, "empty document")
            ));
        }
        if self.bad_records > 0 {
            lines.push(format!(
                "skipped {}: {}",
                count(self.bad_records, "bad record"),
                super::pipeline::by_kind(&self.bad_by_kind)
            ));
        }
        lines.join("\n")
    }
}

/// `1 bad record`, `1,204 bad records`
fn count(n: u64, what: &str) -> String {
    let plural = if n == 1 { "" } else { "s" };
    format!("{} {what}{plural}", thousands(n))
}

/// `1,234,567`
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `2.31M`, `850K`, `12`
pub(super) fn si(x: f64) -> String {
    scaled(
        x,
        &[(1e9, 2, "G"), (1e6, 2, "M"), (1e3, 0, "K"), (1.0, 0, "")],
    )
}

/// `5.00 GB`, `12.3 MB`, `512 bytes` (decimal units, as MB/s is)
fn bytes(n: u64) -> String {
    let units = [
        (1e9, 2, " GB"),
        (1e6, 1, " MB"),
        (1e3, 1, " KB"),
        (1.0, 0, " bytes"),
    ];
    scaled(n as f64, &units)
}

/// `x` in the first of `units` (size, decimals, suffix; largest first, the last of size 1) that
/// it reaches, else in the last.
fn scaled(x: f64, units: &[(f64, usize, &str)]) -> String {
    let &(size, decimals, suffix) = units
        .iter()
        .find(|(size, ..)| x >= *size)
        .unwrap_or(&units[units.len() - 1]);
    format!("{:.*}{suffix}", decimals, x / size)
}

/// `8m 12s`, `3.4s`
fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m {:02}s", (s / 60.0).floor(), (s % 60.0).floor())
    } else {
        format!("{s:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(si(2_310_000.0), "2.31M");
        assert_eq!(si(850_400.0), "850K");
        assert_eq!(si(12.4), "12");
        assert_eq!(bytes(5_000_000_000), "5.00 GB");
        assert_eq!(bytes(12_345_678), "12.3 MB");
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(duration(Duration::from_secs(492)), "8m 12s");
        assert_eq!(duration(Duration::from_millis(3400)), "3.4s");
    }

    #[test]
    fn summary_reports_rates_and_skips() {
        let mut by_kind = BTreeMap::new();
        by_kind.insert("invalid JSON", 2);
        by_kind.insert("not UTF-8", 1);
        let stats = PrepareStats {
            files: 1,
            input_bytes: 3_000_000,
            text_bytes: 10_000_000,
            documents: 1000,
            tokens: 2_000_000,
            bad_records: 3,
            bad_by_kind: by_kind,
            threads: 2,
            elapsed: Duration::from_secs(2),
            worker_busy: Duration::from_secs(3),
            ..PrepareStats::default()
        };
        let summary = stats.summary();
        assert!(
            summary.starts_with(
                "tokenized 10.0 MB of text in 2.0s: 5.0 MB/s, 1.00M tokens/s; 1,000 documents, \
                 2,000,000 tokens\nread 3.0 MB from 1 file; 2 worker threads, busy parsing and \
                 tokenizing 75% of the time"
            ),
            "{summary}"
        );
        assert!(
            summary.ends_with("skipped 3 bad records: 2 invalid JSON, 1 not UTF-8"),
            "{summary}"
        );
    }
}
