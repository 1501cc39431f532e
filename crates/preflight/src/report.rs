//! The preflight report: one row per distinct layer shape, the memory estimate of a training
//! step, warnings and errors; rendered as an aligned text table and as `preflight.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use glatrain_config::{ActivationCheckpointing, ResolvedConfig};
use serde::{Serialize, Serializer};

use crate::device::{DeviceKind, DeviceProfile};
use crate::error::{MemoryShortfall, PreflightError};
use crate::estimate::{checkpointed_parts, memory_parts};
use crate::measure::{measure, ModeTimer};
use crate::op::Source;
use crate::rules::{choose_mode, Decision};
use crate::shape::{layer_shapes, LayerShape};
use glatrain_config::ModeChoice;
use glatrain_fs::write_atomic;

/// Weights and optimizer state per parameter: fp32 master weight, fp32 gradient, AdamW's two
/// fp32 moments.
pub const BYTES_PER_PARAMETER: u64 = 16;
/// CUDA context, libtorch's workspaces and allocator slack on a GPU.
pub const CUDA_RUNTIME_BYTES: u64 = 1 << 30;
/// What the table and the JSON say about the estimates.
pub const ESTIMATE_NOTE: &str = "est. time: roofline estimate of one layer's sequence-mixing op, \
     forward+backward per micro-batch (measured/cached rows: measured time); est. mem: what one \
     layer keeps for backward (block activations, plus what the op keeps: chunk states in chunk \
     mode, checkpoints and the pre-gate output for the selective scan)";
/// What the loss holds at its peak (`glatrain_ops::loss`, which never holds the full logits):
/// the final hidden states it keeps for the backward (fp32, `tokens x hidden`) and each row's
/// logsumexp, and while one chunk of rows is processed in the backward: that chunk's fp32 logits,
/// their softmax and its bf16/fp16 (or fp32) copy, plus the output weight's fp32 gradient
/// accumulator and its compute-dtype copy (`vocab x hidden`).
pub fn loss_bytes(tokens: u64, hidden: u64, vocab: u64, act_bytes: u64) -> u64 {
    let chunk = tokens.min(glatrain_ops::loss::DEFAULT_CHUNK_ROWS as u64);
    let kept = tokens * (hidden * 4 + 4);
    let chunk_work = chunk * vocab * (4 + 4 + act_bytes);
    let weight_work = vocab * hidden * (4 + act_bytes);
    kept + chunk_work + weight_work
}

/// The activations of a step's layers: every layer's [`Decision::est_memory_bytes`], or under
/// activation checkpointing what each layer keeps ([`checkpointed_parts`]) plus the one layer
/// whose recomputed activations the backward holds at a time.
pub(crate) fn activation_bytes(rows: &[Row], checkpointing: ActivationCheckpointing) -> u64 {
    let layers = |r: &Row| r.shape.num_layers as u64;
    if checkpointing == ActivationCheckpointing::None {
        return rows
            .iter()
            .map(|r| r.decision.est_memory_bytes * layers(r))
            .sum();
    }
    let kept: u64 = rows
        .iter()
        .map(|r| {
            let per_layer: u64 = checkpointed_parts(&r.shape, checkpointing)
                .iter()
                .map(|p| p.bytes)
                .sum();
            per_layer * layers(r)
        })
        .sum();
    let recomputed = rows
        .iter()
        .map(|r| r.decision.est_memory_bytes)
        .max()
        .unwrap_or(0);
    kept + recomputed
}

/// One distinct layer shape and the op chosen for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub shape: LayerShape,
    pub decision: Decision,
}

impl Row {
    /// `shape` with the op the rules choose for it on `device` (`forced` where it is fixed).
    pub(crate) fn by_rules(shape: LayerShape, device: &DeviceProfile, forced: ModeChoice) -> Self {
        Self {
            decision: choose_mode(&shape, device, forced),
            shape,
        }
    }
}

/// The memory a training step needs, estimated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub parameters: u64,
    /// [`BYTES_PER_PARAMETER`] per parameter.
    pub weights_and_optimizer_bytes: u64,
    /// What the layers keep for the backward under `checkpointing` ([`activation_bytes`]).
    pub activation_bytes: u64,
    /// `train.activation_checkpointing`.
    pub checkpointing: ActivationCheckpointing,
    /// Copies of the weights in the autocast dtype that the matmuls' backward keeps (bf16/fp16:
    /// 2 bytes per parameter; none in fp32).
    pub weight_copies_bytes: u64,
    /// The loss at its peak ([`loss_bytes`]).
    pub loss_bytes: u64,
    /// [`CUDA_RUNTIME_BYTES`] on CUDA, 0 on CPU.
    pub runtime_bytes: u64,
    pub total_bytes: u64,
    /// The device's memory (0 = unknown: not checked).
    pub limit_bytes: u64,
}

/// The preflight's answer for one config on one device.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The config file (or origin name).
    pub config: String,
    pub device: DeviceProfile,
    pub rows: Vec<Row>,
    pub memory: MemoryEstimate,
    /// Every row's warnings, and the report's own.
    pub warnings: Vec<String>,
    /// Reasons the config cannot run; non-empty means training must not start.
    #[serde(serialize_with = "as_strings")]
    pub errors: Vec<PreflightError>,
}

impl Report {
    /// Decides every layer shape of `cfg` by [`choose_mode`] (rules, or `kernels.mode` when it
    /// is forced) and checks the memory.
    pub fn rules(cfg: &ResolvedConfig, device: &DeviceProfile) -> Report {
        let forced = cfg.config.kernels.mode;
        let rows = layer_shapes(cfg, device)
            .into_iter()
            .map(|shape| Row::by_rules(shape, device, forced))
            .collect();
        Report::assemble(cfg, device, rows)
    }

    /// Like [`Report::rules`], but GLA shapes in `auto` mode are timed by [`measure`] (with its
    /// on-disk cache in `cache_dir`); forced modes stay forced.
    ///
    /// # Errors
    /// [`PreflightError::Measure`] when no candidate mode of a shape could be timed.
    pub fn measured(
        cfg: &ResolvedConfig,
        device: &DeviceProfile,
        timer: &mut dyn ModeTimer,
        cache_dir: &Path,
    ) -> Result<Report, PreflightError> {
        let forced = cfg.config.kernels.mode;
        let mut rows = Vec::new();
        for shape in layer_shapes(cfg, device) {
            let decision = match forced {
                ModeChoice::Fixed(_) => choose_mode(&shape, device, forced),
                ModeChoice::Auto => measure(&shape, device, timer, cache_dir)?,
            };
            rows.push(Row { shape, decision });
        }
        Ok(Report::assemble(cfg, device, rows))
    }

    /// The report of `rows`: the memory estimate and its check, and the warnings gathered.
    fn assemble(cfg: &ResolvedConfig, device: &DeviceProfile, rows: Vec<Row>) -> Report {
        let c = &cfg.config;
        let parameters = c.model.parameter_count();
        let first = rows.first().map(|r| &r.shape);
        let tokens = first.map_or(0, LayerShape::tokens);
        let act_bytes = first.map_or(4, LayerShape::act_bytes);
        let activation_bytes = activation_bytes(&rows, c.train.activation_checkpointing);
        let weights_and_optimizer_bytes = parameters * BYTES_PER_PARAMETER;
        let weight_copies_bytes = if act_bytes < 4 {
            parameters * act_bytes
        } else {
            0
        };
        let loss_bytes = loss_bytes(
            tokens,
            c.model.hidden_size() as u64,
            c.model.vocab_size() as u64,
            act_bytes,
        );
        let runtime_bytes = if device.kind == DeviceKind::Cuda {
            CUDA_RUNTIME_BYTES
        } else {
            0
        };
        let memory = MemoryEstimate {
            parameters,
            weights_and_optimizer_bytes,
            weight_copies_bytes,
            activation_bytes,
            checkpointing: c.train.activation_checkpointing,
            loss_bytes,
            runtime_bytes,
            total_bytes: weights_and_optimizer_bytes
                + weight_copies_bytes
                + activation_bytes
                + loss_bytes
                + runtime_bytes,
            limit_bytes: device.memory_bytes,
        };
        let mut warnings: Vec<String> = rows
            .iter()
            .flat_map(|r| r.decision.warnings.clone())
            .collect();
        let mut errors = Vec::new();
        if memory.limit_bytes == 0 {
            warnings.push(format!(
                "memory of {} unknown: the memory estimate is not checked",
                device.name
            ));
        } else if memory.total_bytes > memory.limit_bytes {
            errors.push(PreflightError::OutOfMemory(Box::new(MemoryShortfall {
                config: cfg.source.clone(),
                micro_batch_size: c.train.micro_batch_size,
                seq_len: c.data.seq_len,
                checkpointing: c.train.activation_checkpointing.name(),
                estimate_bytes: memory.total_bytes,
                limit_bytes: memory.limit_bytes,
                device: device.name.clone(),
                breakdown: memory.breakdown(rows.iter().map(|r| r.shape.num_layers).sum()),
                advice: crate::fit::advice(cfg, device, &rows, &memory),
            })));
        }
        Report {
            config: cfg.source.clone(),
            device: device.clone(),
            rows,
            memory,
            warnings,
            errors,
        }
    }

    /// The first error, if any: `Err` means the run must not start (exit 2 when
    /// [`PreflightError::is_bad_input`]).
    pub fn check(&self) -> Result<(), PreflightError> {
        self.errors.first().map_or(Ok(()), |e| Err(e.clone()))
    }

    /// The report as an aligned text table, followed by the memory line, advice and warnings.
    /// Errors are not in it: [`Report::check`] returns them for the caller to report once.
    pub fn render_table(&self) -> String {
        let mut out = self.device_line();
        out.push_str(&self.decision_table());
        out.push_str(&format!("({ESTIMATE_NOTE})\n"));
        out.push_str(&self.memory_lines());
        for row in &self.rows {
            if let Some(advice) = &row.decision.advice {
                out.push_str(&format!(
                    "advice ({}): {advice}\n",
                    row.shape.model_type.name()
                ));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// The first line: the config and the device it was checked on.
    fn device_line(&self) -> String {
        let d = &self.device;
        format!(
            "glatrain preflight: {} on {} ({}, {} {}, {})\n",
            self.config,
            d.name,
            d.kind.name(),
            d.sm_count,
            if d.kind == DeviceKind::Cuda {
                "SMs"
            } else {
                "cores"
            },
            if d.memory_bytes == 0 {
                "memory unknown".to_owned()
            } else {
                human_bytes(d.memory_bytes)
            }
        )
    }

    /// One row per layer type: its shape, the chosen op and why, the estimates; columns padded
    /// to their widest cell, the reason last and unpadded.
    fn decision_table(&self) -> String {
        let header = [
            "model",
            "layers",
            "B",
            "T",
            "H",
            "K",
            "V",
            "dtype",
            "device",
            "mode",
            "source",
            "pad waste",
            "est. time",
            "est. mem",
            "reason",
        ];
        let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for Row {
            shape: s,
            decision: dec,
        } in &self.rows
        {
            cells.push(vec![
                s.model_type.name().to_owned(),
                s.num_layers.to_string(),
                s.batch.to_string(),
                s.seq_len.to_string(),
                s.num_heads.to_string(),
                s.head_k_dim.to_string(),
                s.head_v_dim.to_string(),
                s.dtype_name().to_owned(),
                s.device.clone(),
                dec.op.name().to_owned(),
                dec.source.name().to_owned(),
                dec.padding.describe(s.head_k_dim, s.head_v_dim),
                match dec.source {
                    Source::Measured | Source::Cached => ms(dec.est_time_ms),
                    Source::Rules | Source::Forced => format!("~{}", ms(dec.est_time_ms)),
                },
                human_bytes(dec.est_memory_bytes),
                dec.reason.clone(),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|col| {
                cells
                    .iter()
                    .map(|row| row[col].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &cells {
            let last = row.len() - 1;
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(col, cell)| {
                    if col == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[col])
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    /// The memory estimate of the whole step against the limit, then what one layer of each
    /// type keeps, part by part.
    fn memory_lines(&self) -> String {
        let m = &self.memory;
        let limit = if m.limit_bytes == 0 {
            "unknown".to_owned()
        } else {
            human_bytes(m.limit_bytes)
        };
        let mut out = format!(
            "memory: ~{} estimated of {limit} ({})\n",
            human_bytes(m.total_bytes),
            m.breakdown(self.rows.iter().map(|r| r.shape.num_layers).sum())
        );
        for row in &self.rows {
            let parts: Vec<String> = memory_parts(&row.shape, row.decision.op)
                .iter()
                .filter(|p| p.bytes > 0)
                .map(|p| format!("{} {}", p.what, human_bytes(p.bytes)))
                .collect();
            out.push_str(&format!(
                "memory per layer ({}, {}): {} = {}\n",
                row.shape.model_type.name(),
                row.decision.op.name(),
                parts.join(", "),
                human_bytes(row.decision.est_memory_bytes)
            ));
        }
        out
    }

    /// The report as pretty JSON (the content of `preflight.json`), with [`ESTIMATE_NOTE`].
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            note: &'static str,
            #[serde(flatten)]
            report: &'a Report,
        }
        serde_json::to_string_pretty(&Json {
            note: ESTIMATE_NOTE,
            report: self,
        })
        .expect("the report serializes")
    }

    /// Writes [`Self::to_json`] to `run_dir/preflight.json` atomically; returns the path.
    pub fn write_json(&self, run_dir: &Path) -> Result<PathBuf, PreflightError> {
        let path = run_dir.join("preflight.json");
        write_atomic(&path, self.to_json().as_bytes()).map_err(|e| PreflightError::Write {
            path: path.clone(),
            source: Arc::new(e),
        })?;
        Ok(path)
    }
}

impl MemoryEstimate {
    /// "341.7M parameters: weights + AdamW 5.1 GiB, activations of 24 layers 15.0 GiB, ...".
    fn breakdown(&self, layers: usize) -> String {
        let mut parts = vec![
            format!(
                "{:.1}M parameters: weights + AdamW state {}",
                self.parameters as f64 / 1e6,
                human_bytes(self.weights_and_optimizer_bytes)
            ),
            match self.checkpointing {
                ActivationCheckpointing::None => format!(
                    "activations of {layers} layers {}",
                    human_bytes(self.activation_bytes)
                ),
                mode => format!(
                    "activations of {layers} layers with {} checkpointing {}",
                    mode.name(),
                    human_bytes(self.activation_bytes)
                ),
            },
            format!("loss {}", human_bytes(self.loss_bytes)),
        ];
        if self.weight_copies_bytes > 0 {
            parts.insert(
                1,
                format!(
                    "autocast weight copies {}",
                    human_bytes(self.weight_copies_bytes)
                ),
            );
        }
        if self.runtime_bytes > 0 {
            parts.push(format!("CUDA runtime {}", human_bytes(self.runtime_bytes)));
        }
        parts.join(", ")
    }
}

fn as_strings<S: Serializer>(errors: &[PreflightError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(|e| e.to_string()))
}

/// "1.5 GiB" from 1 GiB up, else "640.0 MiB".
pub(crate) fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// "0.412 ms" below 10 ms, else "12.3 ms".
pub(crate) fn ms(t: f64) -> String {
    if t < 10.0 {
        format!("{t:.3} ms")
    } else {
        format!("{t:.1} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::{block_activation_bytes, chunk_state_bytes};
    use crate::measure::SoftmaxTiming;
    use crate::op::LayerOp;
    use glatrain_config::GlaMode;

    /// GLA-340M's shapes (configs/gla-340m.toml): hidden 1024, 24 layers, 4 heads, expand_k
    /// 0.5, expand_v 1, seq_len 2048, micro batch 8, bf16.
    const GLA_340M: &str = "[run]\nname = \"gla-340m\"\n\
        [model]\ntype = \"gla\"\nhidden_size = 1024\nnum_layers = 24\nnum_heads = 4\n\
        expand_k = 0.5\nexpand_v = 1.0\nvocab_size = 32000\n\
        [data]\nseq_len = 2048\n[train]\nmicro_batch_size = 8\nprecision = \"bf16\"\n";

    fn resolved(text: &str, overrides: &[&str]) -> ResolvedConfig {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        glatrain_config::from_str(text, "configs/gla-340m.toml", &overrides).unwrap()
    }

    /// The rules' report for GLA-340M with `overrides` on an H100.
    fn gla_340m_on_h100(overrides: &[&str]) -> Report {
        Report::rules(&resolved(GLA_340M, overrides), &DeviceProfile::h100_sxm())
    }

    #[test]
    fn gla_340m_renders_on_the_h100() {
        let report = gla_340m_on_h100(&[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report.check().unwrap();
        assert_eq!(report.rows.len(), 1);
        assert_eq!(report.rows[0].decision.op, LayerOp::Gla(GlaMode::Chunk));
        let table = report.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("glatrain preflight: configs/gla-340m.toml on NVIDIA H100 80GB HBM3 (cuda, 132 SMs, 80.0 GiB)"), "{table}");
        let header = lines[1];
        let row = lines[2];
        for (col, value) in [
            ("model", "gla"),
            ("layers", "24"),
            ("K", "128"),
            ("V", "256"),
            ("mode", "chunk"),
            ("pad waste", "-"),
        ] {
            let at = header.find(&format!("  {col} ")).map_or(0, |i| i + 2);
            assert!(
                row[at..].starts_with(value),
                "column {col} at {at}:\n{table}"
            );
        }
        assert!(
            row.contains("  bf16   cuda    chunk  rules   -          ~"),
            "{table}"
        );
        assert!(table.contains("(est. time: roofline estimate"), "{table}");
        // The parts: 16 bytes per parameter, a bf16 copy of each for autocast, the layers'
        // activations, the chunked loss over 8 x 2048 tokens (hidden 1024, vocab 32000), the
        // runtime.
        let m = &report.memory;
        assert_eq!(m.weights_and_optimizer_bytes, 16 * m.parameters);
        assert_eq!(m.weight_copies_bytes, 2 * m.parameters);
        assert_eq!(
            m.loss_bytes,
            16384 * (1024 * 4 + 4) + 4096 * 32000 * 10 + 32000 * 1024 * 6
        );
        assert_eq!(
            m.total_bytes,
            m.weights_and_optimizer_bytes
                + m.weight_copies_bytes
                + m.activation_bytes
                + m.loss_bytes
                + m.runtime_bytes
        );
        assert!(table.contains("memory: ~"), "{table}");
        assert!(
            table.contains("memory per layer (gla, chunk): residual stream at both norms (fp32)"),
            "{table}"
        );
        assert_eq!(
            report.memory.activation_bytes,
            24 * report.rows[0].decision.est_memory_bytes
        );
        // bf16 chunk keeps its chunk states and A for backward.
        let shape = &report.rows[0].shape;
        assert_eq!(
            report.rows[0].decision.est_memory_bytes,
            block_activation_bytes(shape) + chunk_state_bytes(shape)
        );
        // In fp32 the waves rule takes fused_chunk, which keeps no chunk states: the layer's
        // memory is its block activations.
        let fp32 = gla_340m_on_h100(&["train.precision=fp32"]);
        let row = &fp32.rows[0];
        assert_eq!(
            row.decision.op,
            LayerOp::Gla(GlaMode::FusedChunk),
            "{}",
            row.decision.reason
        );
        assert_eq!(
            row.decision.est_memory_bytes,
            block_activation_bytes(&row.shape)
        );
    }

    #[test]
    fn tiny_head_dims_show_their_padding() {
        let report = gla_340m_on_h100(&[
            "model.hidden_size=32",
            "model.num_heads=2",
            "model.num_layers=2",
        ]);
        let d = &report.rows[0].decision;
        assert_eq!((d.padding.k_padded, d.padding.v_padded), (16, 16));
        let table = report.render_table();
        assert!(table.contains("K 8->16 50%"), "{table}");
    }

    #[test]
    fn checkpointing_keeps_less_and_the_recomputed_layer_is_counted_once() {
        let activations = |mode: &str| {
            gla_340m_on_h100(&[&format!("train.activation_checkpointing={mode}")])
                .memory
                .activation_bytes
        };
        let (none, selective, full) = (
            activations("none"),
            activations("selective"),
            activations("full"),
        );
        assert!(
            full < selective && selective < none,
            "{full} {selective} {none}"
        );
        // Full: 24 layers keep their fp32 input (4 x 1024 bytes per token), one layer its all.
        let report = gla_340m_on_h100(&[]);
        let one_layer = report.rows[0].decision.est_memory_bytes;
        assert_eq!(full, 24 * 4 * 1024 * 8 * 2048 + one_layer);
        assert!(2 * full < none, "at least 2x less: {full} vs {none}");
    }

    #[test]
    fn a_config_that_does_not_fit_names_its_keys() {
        let report = gla_340m_on_h100(&["train.micro_batch_size=64", "data.seq_len=16384"]);
        assert_eq!(report.errors.len(), 1);
        let err = report.check().unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "configs/gla-340m.toml: train.micro_batch_size = 64, data.seq_len = 16384, \
                 train.activation_checkpointing = \"none\": estimated memory "
            ),
            "{msg}"
        );
        // Every change the advice names makes the step fit.
        let advice = &msg[msg.find("to fit, ").expect("advice") + "to fit, ".len()..];
        let options: Vec<&str> = advice.split(", or ").collect();
        assert!(!options.is_empty(), "{msg}");
        for option in options {
            let sets: Vec<&str> = option
                .split_whitespace()
                .filter(|w| w.starts_with("train.") || w.starts_with("data."))
                .collect();
            assert!(!sets.is_empty(), "{option}");
            let mut overrides = vec!["train.micro_batch_size=64", "data.seq_len=16384"];
            overrides.extend(sets);
            let fixed = gla_340m_on_h100(&overrides);
            assert!(fixed.errors.is_empty(), "{option}: {:?}", fixed.errors);
        }
        assert!(
            msg.contains("exceeds the 80.0 GiB of NVIDIA H100 80GB HBM3"),
            "{msg}"
        );
        assert!(msg.contains("activations of 24 layers"), "{msg}");
        assert!(
            !report.render_table().contains("error:"),
            "reported once, by check()"
        );
        // The same config fits with a smaller micro-batch.
        assert!(
            gla_340m_on_h100(&["train.micro_batch_size=1", "data.seq_len=16384"])
                .errors
                .is_empty()
        );
        // Unknown memory: a warning, no check.
        let unknown = DeviceProfile::h100_sxm().with_memory_bytes(0);
        let cfg = resolved(
            GLA_340M,
            &["train.micro_batch_size=64", "data.seq_len=16384"],
        );
        let report = Report::rules(&cfg, &unknown);
        assert!(report.errors.is_empty());
        assert!(report
            .warnings
            .iter()
            .any(|w| w.contains("memory of NVIDIA H100 80GB HBM3 unknown")));
    }

    #[test]
    fn every_model_type_gets_a_row() {
        let h100 = DeviceProfile::h100_sxm();
        let t = resolved(
            "[model]\ntype = \"transformer\"\nnum_heads = 16\n[kernels]\nmode = \"chunk\"\n",
            &[],
        );
        let report = Report::rules(&t, &h100);
        assert_eq!(report.rows[0].decision.op, LayerOp::SdpaFused);
        assert!(report
            .render_table()
            .contains("warning: kernels.mode = \"chunk\" applies to GLA layers only"));
        let m = resolved(
            "[model]\ntype = \"mamba\"\nnum_layers = 2\nhidden_size = 256\n[data]\nseq_len = 256\n",
            &[],
        );
        let report = Report::rules(&m, &h100);
        assert_eq!(report.rows[0].decision.op, LayerOp::SelectiveScan);
        let table = report.render_table();
        assert!(
            table.contains("memory per layer (mamba, selective_scan): residual stream (fp32) "),
            "{table}"
        );
        assert!(
            table.contains("scan checkpoints (fp32 state every 32 steps)"),
            "{table}"
        );
    }

    #[test]
    fn forced_and_cpu_decisions_are_reported() {
        let report = gla_340m_on_h100(&[
            "kernels.mode=fused_recurrent",
            "data.seq_len=8192",
            "train.micro_batch_size=2",
        ]);
        assert_eq!(report.rows[0].decision.source, Source::Forced);
        let table = report.render_table();
        assert!(table.contains("fused_recurrent  forced"), "{table}");
        assert!(
            table.contains("warning: kernels.mode = \"fused_recurrent\" is a bad fit"),
            "{table}"
        );

        let cpu = DeviceProfile::cpu().with_memory_bytes(64 << 30);
        let tiny = resolved(
            GLA_340M,
            &[
                "model.hidden_size=64",
                "model.num_layers=2",
                "data.seq_len=128",
                "train.micro_batch_size=2",
            ],
        );
        let report = Report::rules(&tiny, &cpu);
        assert_eq!(report.rows[0].decision.op, LayerOp::Gla(GlaMode::Reference));
        assert_eq!(report.memory.runtime_bytes, 0);
        let table = report.render_table();
        assert!(table.contains("(cpu, "), "{table}");
    }

    #[test]
    fn json_report_is_written_atomically_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let report = gla_340m_on_h100(&["train.micro_batch_size=64", "data.seq_len=16384"]);
        let path = report.write_json(dir.path()).unwrap();
        assert_eq!(path, dir.path().join("preflight.json"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            json["rows"][0]["decision"]["op"],
            report.rows[0].decision.op.name()
        );
        assert_eq!(json["rows"][0]["decision"]["source"], "rules");
        assert_eq!(json["rows"][0]["shape"]["head_k_dim"], 128);
        assert_eq!(json["device"]["sm_count"], 132);
        assert!(json["note"]
            .as_str()
            .unwrap()
            .starts_with("est. time: roofline estimate"));
        assert!(json["errors"][0]
            .as_str()
            .unwrap()
            .contains("train.micro_batch_size = 64"));
        assert!(json["memory"]["total_bytes"].as_u64().unwrap() > 80 << 30);
        // A file in the way of the run directory: a write error, not bad input.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let err = report.write_json(&blocker).unwrap_err();
        assert!(!err.is_bad_input());
    }

    #[test]
    fn shipped_configs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = glatrain_config::load(&path, &[]).unwrap();
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let h100 = Report::rules(&cfg, &DeviceProfile::h100_sxm());
                assert!(!h100.rows.is_empty());
                assert!(h100.render_table().contains(&cfg.source), "{name}");
                assert!(h100.errors.is_empty(), "{name}: {:?}", h100.errors);
                let cpu = DeviceProfile::cpu().with_memory_bytes(1 << 40);
                let on_cpu = Report::rules(&cfg, &cpu);
                assert!(
                    on_cpu
                        .rows
                        .iter()
                        .all(|r| r.decision.op != LayerOp::Gla(GlaMode::Chunk)),
                    "{name}"
                );
                names.push(name);
            }
        }
        assert!(names.iter().any(|n| n == "gla-340m"), "{names:?}");
    }

    /// Chunk 0.5 ms, fused_chunk 0.7 ms, fused_recurrent 5 ms; counts its calls.
    struct FixedTimer(usize);

    impl ModeTimer for FixedTimer {
        fn time_ms(&mut self, _shape: &LayerShape, mode: GlaMode) -> Result<f64, String> {
            self.0 += 1;
            Ok(match mode.name() {
                "chunk" => 0.5,
                "fused_chunk" => 0.7,
                _ => 5.0,
            })
        }
        fn time_softmax(&mut self, _shape: &LayerShape) -> Result<SoftmaxTiming, String> {
            Ok(SoftmaxTiming {
                ms: 2.0,
                backend: "flash".into(),
            })
        }
        fn kernel_version(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn measured_reports_time_auto_shapes_and_respect_forced_ones() {
        let dir = tempfile::tempdir().unwrap();
        let h100 = DeviceProfile::h100_sxm();
        let mut timer = FixedTimer(0);
        let report =
            Report::measured(&resolved(GLA_340M, &[]), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(timer.0, 2);
        let d = &report.rows[0].decision;
        assert_eq!(
            (d.op, d.source, d.est_time_ms),
            (LayerOp::Gla(GlaMode::Chunk), Source::Measured, 0.5)
        );
        let table = report.render_table();
        assert!(
            table.contains("chunk  measured  -          0.500 ms"),
            "{table}"
        );
        let again =
            Report::measured(&resolved(GLA_340M, &[]), &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(
            (timer.0, again.rows[0].decision.source),
            (2, Source::Cached)
        );
        let forced = resolved(GLA_340M, &["kernels.mode=fused_chunk"]);
        let report = Report::measured(&forced, &h100, &mut timer, dir.path()).unwrap();
        assert_eq!(
            (timer.0, report.rows[0].decision.source),
            (2, Source::Forced)
        );
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(human_bytes(640 << 20), "640.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(ms(0.4123), "0.412 ms");
        assert_eq!(ms(12.34), "12.3 ms");
    }
}
