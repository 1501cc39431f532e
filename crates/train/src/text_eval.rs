//! Perplexity of a text file, computed the way published WikiText-style numbers are: the whole
//! file is one token stream (a JSON Lines or parquet file: the text fields of its records,
//! joined by blank lines), cut into non-overlapping windows of `data.seq_len` predicted tokens.
//!
//! Window `i` feeds tokens `i*L .. i*L+L` and predicts tokens `i*L+1 ..= i*L+L`, each window
//! from a fresh state (nothing is carried between windows); the last window is shorter when the
//! stream does not divide evenly, so every token but the first is predicted exactly once (the
//! first has no context: glatrain's models have no beginning-of-text token). This is
//! lm-evaluation-harness's rolling log-likelihood without its end-of-text prefix. Bits per byte
//! are the total nats / ln 2 / the text's UTF-8 bytes.

use std::fmt;
use std::path::{Path, PathBuf};

use glatrain_models::CausalLm;
use serde::Serialize;
use tch::{Device, Kind, Reduction, Tensor};

use crate::boundary::catch_torch;
use crate::datasets::open_tokenizer;
use crate::error::TrainError;
use crate::eval::load_for_inference;
use crate::precision::MixedPrecision;

/// The result of evaluating a text file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextEvalReport {
    pub path: PathBuf,
    /// Training step of the weights.
    pub step: u64,
    /// UTF-8 bytes of the text (for `.jsonl`: of the joined documents).
    pub bytes: u64,
    /// Tokens of the whole stream.
    pub tokens: u64,
    /// Tokens predicted: all but the first.
    pub predicted: u64,
    /// Windows evaluated (the last may be shorter than `seq_len`).
    pub windows: u64,
    /// Predicted tokens per full window: `data.seq_len`.
    pub seq_len: usize,
    /// Summed loss over every predicted token, in nats.
    pub nats: f64,
    /// Mean loss per predicted token, in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// `nats / ln 2 / bytes`.
    pub bits_per_byte: f64,
}

impl fmt::Display for TextEvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "evaluation at step {} on {} ({} UTF-8 bytes, {} tokens)",
            self.step,
            self.path.display(),
            self.bytes,
            self.tokens
        )?;
        writeln!(
            f,
            "  {} non-overlapping windows of up to {} predicted tokens, each from a fresh state: \
             every token but the first predicted once ({} tokens)",
            self.windows, self.seq_len, self.predicted
        )?;
        writeln!(
            f,
            "  loss {:.6} nats/token | perplexity {:.4} | bits per byte {:.6}",
            self.loss, self.perplexity, self.bits_per_byte
        )
    }
}

/// The text of `path`: a text file (`.txt`, or gzip/zstd-compressed) as it is; a JSON Lines
/// (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) or parquet file's `field` strings joined by blank
/// lines. Errors name the file (and the line or row of a bad record).
pub fn read_text(path: &Path, field: &str) -> Result<String, TrainError> {
    glatrain_data::inputs::read_whole_text(path, field)
        .map_err(|e| TrainError::BadArgument(format!("--text {e}")))
}

/// The evaluation windows of a stream of `tokens` tokens, as `(start, predicted)`: window `i`
/// starts at `i * seq_len` and predicts `predicted` tokens (`seq_len`, or fewer for the last).
pub fn windows(tokens: usize, seq_len: usize) -> Vec<(usize, usize)> {
    let predicted = tokens.saturating_sub(1);
    (0..predicted.div_ceil(seq_len))
        .map(|i| {
            let start = i * seq_len;
            (start, seq_len.min(predicted - start))
        })
        .collect()
}

/// The summed loss (nats, accumulated in f64) of `model` predicting every token of `tokens` but
/// the first, over [`windows`] of `seq_len`, full windows `micro_batch` at a time. No gradients
/// are kept.
pub fn evaluate_tokens(
    model: &dyn CausalLm,
    precision: &MixedPrecision,
    device: Device,
    tokens: &[u32],
    seq_len: usize,
    micro_batch: usize,
) -> Result<f64, TrainError> {
    let vocab = model.config().vocab_size() as i64;
    let _guard = tch::no_grad_guard();
    let batch_nats = |batch: &[(usize, usize)]| -> Result<f64, TrainError> {
        let (rows, t) = (batch.len() as i64, batch[0].1 as i64);
        let window = |offset: usize| -> Vec<i64> {
            batch
                .iter()
                .flat_map(|&(start, len)| &tokens[start + offset..start + offset + len])
                .map(|&id| i64::from(id))
                .collect()
        };
        let (inputs, targets) = (window(0), window(1));
        catch_torch("evaluating the text", || {
            let inputs = Tensor::f_from_slice(&inputs)?
                .f_view([rows, t])?
                .f_to_device(device)?;
            let targets = Tensor::f_from_slice(&targets)?.f_to_device(device)?;
            let logits = precision.run(|| model.forward(&inputs)); // [rows, t, vocab]
            logits
                .f_to_kind(Kind::Float)?
                .f_view([-1, vocab])?
                .f_cross_entropy_loss::<Tensor>(&targets, None, Reduction::None, -100, 0.0)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])
        })
    };
    let all = windows(tokens.len(), seq_len);
    let (full, tail): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| w.1 == seq_len);
    let mut nats = 0f64;
    for batch in full.chunks(micro_batch.max(1)).chain(tail.chunks(1)) {
        nats += batch_nats(batch)?;
    }
    Ok(nats)
}

/// Evaluates the checkpoint at `checkpoint` (a `step-N` directory or a run directory: its
/// newest complete checkpoint) on the text file `text` (`field` names a JSON Lines or parquet
/// file's text field), tokenized with the run's tokenizer; see the module docs for the windowing.
pub fn evaluate_text(
    checkpoint: &Path,
    text: &Path,
    field: &str,
) -> Result<TextEvalReport, TrainError> {
    let content = read_text(text, field)?;
    let m = load_for_inference(checkpoint)?;
    let tokenizer = open_tokenizer(&m.cfg)?;
    let tokens = tokenizer.encode(&content)?;
    if tokens.len() < 2 {
        return Err(TrainError::BadArgument(format!(
            "--text {}: {} token(s): at least two are needed (one to predict from, one to predict)",
            text.display(),
            tokens.len()
        )));
    }
    let vocab = m.cfg.config.model.vocab_size();
    if let Some((position, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(TrainError::BadArgument(format!(
            "--text {}: token {id} at position {position} ({}) is outside the model's vocabulary \
             (model.vocab_size = {vocab})",
            text.display(),
            tokenizer.describe()
        )));
    }
    let seq_len = m.cfg.config.data.seq_len;
    let nats = evaluate_tokens(
        m.built.model.as_ref(),
        &m.precision,
        m.device,
        &tokens,
        seq_len,
        m.cfg.config.train.micro_batch_size,
    )?;
    let predicted = tokens.len() as u64 - 1;
    let bytes = content.len() as u64;
    let loss = nats / predicted as f64;
    Ok(TextEvalReport {
        path: text.to_path_buf(),
        step: m.state.step,
        bytes,
        tokens: tokens.len() as u64,
        predicted,
        windows: windows(tokens.len(), seq_len).len() as u64,
        seq_len,
        nats,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_predict_every_token_but_the_first_once() {
        assert_eq!(windows(9, 4), [(0, 4), (4, 4)]);
        assert_eq!(windows(11, 4), [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(windows(2, 4), [(0, 1)]);
        assert_eq!(windows(1, 4), []);
        for n in 2..40 {
            for l in 1..9 {
                let w = windows(n, l);
                let mut next = 0;
                for &(start, len) in &w {
                    assert!(start == next && len >= 1 && len <= l, "{n} {l} {w:?}");
                    next = start + len;
                }
                assert_eq!(next, n - 1, "{n} {l}");
            }
        }
    }

    #[test]
    fn jsonl_documents_join_with_blank_lines_and_bad_records_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        let lines = "{\"text\": \"one\", \"id\": 1}\n\n{\"text\": \"two\\nlines\"}\n";
        std::fs::write(&path, lines).unwrap();
        assert_eq!(read_text(&path, "text").unwrap(), "one\n\ntwo\nlines");
        let zst = dir.path().join("docs.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(lines.as_bytes(), 3).unwrap()).unwrap();
        assert_eq!(read_text(&zst, "text").unwrap(), "one\n\ntwo\nlines");
        let err = read_text(&path, "body").unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string()
                .contains("docs.jsonl: line 1: no field \"body\""),
            "{err}"
        );
        std::fs::write(&path, "{\"text\": \"ok\"}\n{\"text\": 3}\nnot json\n").unwrap();
        let err = read_text(&path, "text").unwrap_err().to_string();
        assert!(
            err.ends_with("line 2: field \"text\" is a number, not a string"),
            "{err}"
        );
    }

    #[test]
    fn text_files_are_read_whole_and_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        let text = " = Title = \n\n\n\nBody {\"text\": 1}\n";
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_text(&path, "text").unwrap(), text);
        let gz = dir.path().join("a.txt.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, text.as_bytes()).unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        assert_eq!(read_text(&gz, "text").unwrap(), text);
        std::fs::write(&path, b"ok\xff").unwrap();
        let err = read_text(&path, "text").unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("a.txt: not valid UTF-8"), "{err}");
        let err = read_text(&dir.path().join("none.txt"), "text")
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.txt: "), "{err}");
        let parquet = dir.path().join("x.parquet");
        std::fs::write(&parquet, "not parquet").unwrap();
        let err = read_text(&parquet, "text").unwrap_err().to_string();
        assert!(err.contains("x.parquet"), "{err}");
    }
}
