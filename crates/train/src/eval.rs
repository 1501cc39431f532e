//! Evaluation: token-weighted validation loss, perplexity, bits per byte and the loss by
//! position in the context (buckets along the sequence), as a table and a PNG chart.

use std::fmt;
use std::path::{Path, PathBuf};

use glatrain_config::{Precision, ResolvedConfig};
use glatrain_data::{Batch, EvalBatches, TokenSource};
use glatrain_models::{CausalLm, Documents};
use serde::Serialize;
use tch::{Device, Kind, Reduction, TchError, Tensor};

use crate::boundary::catch_torch;
use crate::checkpoint;
use crate::error::TrainError;
use crate::interrupt::StopSignal;
use crate::plot::{draw_ppl_by_position, BucketPoint};
use crate::precision::MixedPrecision;
use crate::setup;
use crate::state::TrainState;

/// Position buckets of the loss-by-position table (fewer when the context is shorter).
pub const POSITION_BUCKETS: usize = 8;
/// Default chart file name, in the run directory.
pub const PLOT_FILE: &str = "ppl_by_position.png";

/// Mean loss over the positions `[start, end)` of every evaluated sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionBucket {
    pub start: usize,
    pub end: usize,
    pub loss: f64,
    pub perplexity: f64,
}

/// The result of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Name of the evaluated token source.
    pub source: String,
    /// Training step of the weights, when known.
    pub step: Option<u64>,
    /// Target tokens evaluated.
    pub tokens: u64,
    /// Mean loss per target token, in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// `loss / ln 2 / bytes_per_token`; `None` when the source's byte count is unknown.
    pub bits_per_byte: Option<f64>,
    pub buckets: Vec<PositionBucket>,
    /// The chart, when one was drawn.
    pub plot: Option<PathBuf>,
}

impl EvalReport {
    /// "loss 2.1000 nats/token, perplexity 8.166, bits per byte 3.0297" on one line.
    pub fn summary(&self) -> String {
        let bpb = self
            .bits_per_byte
            .map_or_else(String::new, |b| format!(", bits per byte {b:.4}"));
        format!(
            "loss {:.4} nats/token, perplexity {:.3}{bpb}",
            self.loss, self.perplexity
        )
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = self
            .step
            .map_or_else(String::new, |s| format!(" at step {s}"));
        writeln!(
            f,
            "evaluation{step} on {} ({} tokens)",
            self.source, self.tokens
        )?;
        let bpb = self.bits_per_byte.map_or_else(
            || "n/a (source byte count unknown)".to_string(),
            |b| format!("{b:.4}"),
        );
        writeln!(
            f,
            "  loss {:.4} nats/token | perplexity {:.3} | bits per byte {bpb}",
            self.loss, self.perplexity
        )?;
        writeln!(
            f,
            "  {:>15} | {:>8} | {:>10}",
            "positions", "loss", "perplexity"
        )?;
        for b in &self.buckets {
            writeln!(
                f,
                "  {:>15} | {:>8.4} | {:>10.3}",
                format!("{}..{}", b.start, b.end),
                b.loss,
                b.perplexity
            )?;
        }
        if let Some(plot) = &self.plot {
            writeln!(f, "  chart: {}", plot.display())?;
        }
        Ok(())
    }
}

/// Bucket boundaries: `n = min(POSITION_BUCKETS, seq_len)` near-equal ranges covering
/// `0..seq_len`.
pub fn bucket_bounds(seq_len: usize) -> Vec<(usize, usize)> {
    let n = POSITION_BUCKETS.min(seq_len).max(1);
    (0..n)
        .map(|i| (i * seq_len / n, (i + 1) * seq_len / n))
        .collect()
}

/// A batch's inputs `[rows, seq_len]` and targets, flattened to `[rows * seq_len]`, on `device`.
pub(crate) fn batch_tensors(batch: &Batch, device: Device) -> Result<(Tensor, Tensor), TchError> {
    let shape = [batch.rows as i64, batch.seq_len as i64];
    let inputs = Tensor::f_from_slice(&batch.inputs)?
        .f_view(shape)?
        .f_to_device(device)?;
    let targets = Tensor::f_from_slice(&batch.targets)?
        .f_view([-1])?
        .f_to_device(device)?;
    Ok((inputs, targets))
}

/// A batch's document starts as the models take them; `None` when the batch has none.
pub(crate) fn batch_documents(batch: &Batch) -> Result<Option<Documents>, TchError> {
    let Some(starts) = &batch.document_starts else {
        return Ok(None);
    };
    Documents::new(batch.seq_len, starts.clone())
        .map(Some)
        .map_err(|e| TchError::Torch(e.to_string()))
}

/// The evaluation batches of `source` for a run of `cfg`: `train.micro_batch_size` sequences of
/// `data.seq_len`, at most `max_batches` of them (`None`: all), with their document starts when
/// `data.document_boundaries` is on.
pub fn eval_batches<'a>(
    cfg: &ResolvedConfig,
    source: &'a TokenSource,
    max_batches: Option<usize>,
) -> Result<EvalBatches<'a>, TrainError> {
    let (micro_batch, seq_len) = (cfg.config.train.micro_batch_size, cfg.config.data.seq_len);
    let batches = EvalBatches::new(source, micro_batch, seq_len, max_batches)?;
    if cfg.config.data.document_boundaries {
        return Ok(batches.with_document_starts()?);
    }
    Ok(batches)
}

/// Runs `model` over `batches` and reports. No gradients are kept. `stop` is asked before every
/// batch: when it names a signal the evaluation ends there with [`TrainError::Stopped`].
pub fn evaluate_model(
    model: &dyn CausalLm,
    precision: &MixedPrecision,
    device: Device,
    batches: EvalBatches<'_>,
    stop: &dyn Fn() -> Option<StopSignal>,
) -> Result<EvalReport, TrainError> {
    let (source, seq_len) = (batches.source(), batches.seq_len());
    let vocab = model.config().vocab_size() as i64;
    // Per-position sums of the loss in f64 on the host, so long evaluations do not lose digits.
    let mut position_sums = vec![0f64; seq_len];
    let mut tokens = 0u64;
    let _guard = tch::no_grad_guard();
    for batch in batches {
        if let Some(signal) = stop() {
            return Err(TrainError::Stopped(signal));
        }
        let rows = batch.rows as i64;
        let t = seq_len as i64;
        let per_position = catch_torch("the evaluation's forward pass", || {
            let (inputs, targets) = batch_tensors(&batch, device)?;
            let documents = batch_documents(&batch)?;
            let logits = precision.run(|| {
                let hidden = model.hidden_states(&inputs, documents.as_ref());
                glatrain_models::logits(&hidden, model.output_weight())
            }); // [rows, T, V]
            let losses = logits
                .f_to_kind(Kind::Float)?
                .f_view([-1, vocab])?
                .f_cross_entropy_loss::<Tensor>(&targets, None, Reduction::None, -100, 0.0)?
                .f_view([rows, t])?; // [rows, T]
            let per_position = losses
                .f_sum_dim_intlist(0, false, Kind::Double)?
                .f_to_device(Device::Cpu)?; // [T]
            Vec::<f64>::try_from(&per_position)
        })?;
        for (acc, v) in position_sums.iter_mut().zip(per_position) {
            *acc += v;
        }
        tokens += batch.num_tokens() as u64;
    }
    let rows_total = tokens as f64 / seq_len as f64;
    let loss = position_sums.iter().sum::<f64>() / tokens as f64;
    let buckets = bucket_bounds(seq_len)
        .into_iter()
        .map(|(start, end)| {
            let sum: f64 = position_sums[start..end].iter().sum();
            let loss = sum / (rows_total * (end - start) as f64);
            PositionBucket {
                start,
                end,
                loss,
                perplexity: loss.exp(),
            }
        })
        .collect();
    Ok(EvalReport {
        source: source.name().to_string(),
        step: None,
        tokens,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: source
            .bytes_per_token()
            .map(|bpt| glatrain_data::bits_per_byte(loss, bpt)),
        buckets,
        plot: None,
    })
}

/// Refuses a chart path that cannot be written (a directory, or in a directory that does not
/// exist) before an evaluation spends its time.
pub fn check_chart_path(path: &Path) -> Result<(), TrainError> {
    let bad = |reason: &str| {
        TrainError::BadArgument(format!(
            "{}: cannot write the chart there: {reason}",
            path.display()
        ))
    };
    if path.is_dir() {
        return Err(bad("it is a directory (give the path of a .png file)"));
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(bad(&format!("{} is not a directory", parent.display())));
    }
    Ok(())
}

/// Draws the report's loss by position at `path` and records the path in the report. A failure
/// says what the evaluation found, so its numbers are not lost with the chart.
pub fn draw_report(report: &mut EvalReport, path: &Path) -> Result<(), TrainError> {
    let points: Vec<BucketPoint> = report
        .buckets
        .iter()
        .map(|b| BucketPoint {
            start: b.start,
            end: b.end,
            perplexity: b.perplexity,
        })
        .collect();
    let step = report
        .step
        .map_or_else(String::new, |s| format!(", step {s}"));
    let title = format!("validation perplexity by position{step}");
    draw_ppl_by_position(path, &title, &points).map_err(|e| TrainError::Chart {
        path: path.to_path_buf(),
        message: e.message,
        summary: report.summary(),
    })?;
    report.plot = Some(path.to_path_buf());
    Ok(())
}

/// The checkpoint a user pointed at: a `step-N` directory itself, or the newest complete one
/// in a run directory (`<run>/checkpoints/`) or a `checkpoints/` directory. Skipped incomplete
/// or corrupt checkpoints are printed as warnings.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    if !path.exists() {
        return Err(checkpoint::CheckpointError::NotFound {
            path: path.to_path_buf(),
        }
        .into());
    }
    if path.join(checkpoint::MANIFEST_FILE).exists() || checkpoint_dir_name(path) {
        return Ok(path.to_path_buf());
    }
    let root = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let (found, rejected) = checkpoint::find_latest(&root)?;
    for r in &rejected {
        eprintln!("warning: skipping checkpoint {r}");
    }
    found.ok_or(TrainError::Checkpoint(
        checkpoint::CheckpointError::NothingToLoad {
            dir: root,
            rejected,
        },
    ))
}

fn checkpoint_dir_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("step-"))
}

/// A checkpoint loaded for inference: its config, the model with its weights, the precision to
/// run in, and the state.
pub(crate) struct InferenceModel {
    pub cfg: glatrain_config::ResolvedConfig,
    pub built: setup::BuiltModel,
    pub precision: MixedPrecision,
    pub device: Device,
    pub state: TrainState,
    pub dir: PathBuf,
}

/// Loads a checkpoint on the device its run used (`run.device`), or on the CPU when that asks
/// for CUDA and none is here. Half-precision runs evaluate in their precision on CUDA and in
/// fp32 on CPU.
pub(crate) fn load_for_inference(path: &Path) -> Result<InferenceModel, TrainError> {
    let dir = resolve_checkpoint(path)?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    let cfg = glatrain_config::load(&config_path, &[])?;
    let device = match setup::resolve_device(&cfg.config.run.device, &cfg.source) {
        Ok(device) => device,
        Err(e) if !tch::Cuda::is_available() => {
            eprintln!("note: {e}; running on the CPU");
            Device::Cpu
        }
        Err(e) => return Err(e),
    };
    let precision = if device.is_cuda() {
        cfg.config.train.precision
    } else {
        Precision::Fp32
    };
    let precision = MixedPrecision::new(precision, device, &cfg.source)?;
    setup::apply_threads_for_inference(&cfg);
    let ck = checkpoint::load::<TrainState>(&dir)?;
    // The rules preflight (instant) resolves the GLA mode as training did by rules.
    let mode = crate::preflight::chosen_mode(&crate::preflight::report(&cfg, device, false)?);
    let built = setup::build_model(&cfg, device, mode)?;
    setup::load_weights(&built.vs, &ck.weights, &dir)?;
    Ok(InferenceModel {
        cfg,
        built,
        precision,
        device,
        state: ck.state,
        dir,
    })
}

/// Evaluates a checkpoint (a `step-N` directory, or a run directory: its newest complete
/// checkpoint).
///
/// - `data`: the token source, "embedded" or a path (default: the run's `data.valid`);
/// - `batches`: batches of `train.micro_batch_size` sequences (default: `train.eval_batches`;
///   0 = the whole source);
/// - `plot`: where to draw the perplexity-by-position chart (default:
///   `<run dir>/ppl_by_position.png`, the run directory being the checkpoint's grandparent).
///
/// Prints nothing; the report implements `Display` (a table). The chart's path is checked
/// before anything is evaluated; a chart that fails to draw all the same is an error that
/// carries the evaluation's numbers.
pub fn evaluate(
    checkpoint: &Path,
    data: Option<&str>,
    batches: Option<usize>,
    plot: Option<&Path>,
) -> Result<EvalReport, TrainError> {
    // An explicit path is checked before the checkpoint is read (and verified: seconds for a
    // large model), the default one as soon as the run directory is known.
    if let Some(plot) = plot {
        check_chart_path(plot)?;
    }
    let m = load_for_inference(checkpoint)?;
    let plot_path = match plot {
        Some(p) => p.to_path_buf(),
        None => run_dir_of(&m.dir).join(PLOT_FILE),
    };
    check_chart_path(&plot_path)?;
    let spec = data.unwrap_or(&m.cfg.config.data.valid).to_string();
    let source = crate::datasets::SourceOpener::new(&m.cfg).valid(&spec)?;
    let batches = batches.unwrap_or(m.cfg.config.train.eval_batches);
    let batches = eval_batches(&m.cfg, &source, (batches > 0).then_some(batches))?;
    let mut report = evaluate_model(
        m.built.model.as_ref(),
        &m.precision,
        m.device,
        batches,
        &|| None,
    )?;
    report.step = Some(m.state.step);
    draw_report(&mut report, &plot_path)?;
    Ok(report)
}

/// `<run>/checkpoints/step-N` -> `<run>`.
fn run_dir_of(checkpoint_dir: &Path) -> PathBuf {
    checkpoint_dir
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_context() {
        assert_eq!(
            bucket_bounds(16),
            vec![
                (0, 2),
                (2, 4),
                (4, 6),
                (6, 8),
                (8, 10),
                (10, 12),
                (12, 14),
                (14, 16)
            ]
        );
        assert_eq!(bucket_bounds(3), vec![(0, 1), (1, 2), (2, 3)]);
        let b = bucket_bounds(100);
        assert_eq!(b.len(), 8);
        assert_eq!((b[0].0, b[7].1), (0, 100));
        assert!(b.windows(2).all(|w| w[0].1 == w[1].0));
    }

    #[test]
    fn batch_documents_follow_the_batch_rows() {
        let batch = Batch {
            inputs: vec![0; 8],
            targets: vec![0; 8],
            rows: 2,
            seq_len: 4,
            document_starts: Some(vec![vec![1, 3], vec![]]),
        };
        let documents = batch_documents(&batch).unwrap().unwrap();
        assert_eq!((documents.rows(), documents.seq_len()), (2, 4));
        assert_eq!(
            (documents.starts(0), documents.starts(1)),
            (&[1, 3][..], &[][..])
        );
        let plain = Batch {
            document_starts: None,
            ..batch
        };
        assert!(batch_documents(&plain).unwrap().is_none());
    }

    #[test]
    fn run_dir_is_the_grandparent() {
        assert_eq!(
            run_dir_of(Path::new("runs/x/checkpoints/step-4")),
            PathBuf::from("runs/x")
        );
    }

    #[test]
    fn table_lists_every_bucket() {
        let report = EvalReport {
            source: "embedded:brown/valid".into(),
            step: Some(10),
            tokens: 64,
            loss: 2.0,
            perplexity: 2f64.exp(),
            bits_per_byte: Some(2.885),
            buckets: bucket_bounds(4)
                .into_iter()
                .map(|(start, end)| PositionBucket {
                    start,
                    end,
                    loss: 2.0,
                    perplexity: 2f64.exp(),
                })
                .collect(),
            plot: None,
        };
        let text = report.to_string();
        assert!(
            text.contains("at step 10") && text.contains("perplexity 7.389"),
            "{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.contains(" | ")).count(),
            6,
            "{text}"
        );
    }
}
