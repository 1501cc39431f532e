//! What makes a step that does not fit the device fit: activation checkpointing, or a smaller
//! micro-batch with more accumulation (the step's tokens stay), each with its estimate.

use glatrain_config::{ActivationCheckpointing, ResolvedConfig};

use crate::device::DeviceProfile;
use crate::report::{activation_bytes, human_bytes, loss_bytes, MemoryEstimate, Row};
use crate::shape::LayerShape;

/// The checkpointing modes in order of memory kept (most first).
const MODES: [ActivationCheckpointing; 3] = [
    ActivationCheckpointing::None,
    ActivationCheckpointing::Selective,
    ActivationCheckpointing::Full,
];

/// One changed setting and the step's estimated memory with it.
#[derive(Debug, Clone, PartialEq)]
struct Candidate {
    micro_batch_size: usize,
    checkpointing: ActivationCheckpointing,
    total_bytes: u64,
}

/// The estimated memory of `cfg`'s step with `micro_batch_size` and `checkpointing` instead of
/// its own settings. Each layer shape is estimated again at the new micro-batch, with the op the
/// rules choose there (the choice can change with the batch, and with it what the op keeps).
fn total_with(
    cfg: &ResolvedConfig,
    device: &DeviceProfile,
    rows: &[Row],
    memory: &MemoryEstimate,
    micro_batch_size: usize,
    checkpointing: ActivationCheckpointing,
) -> u64 {
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            let shape = LayerShape {
                batch: micro_batch_size,
                ..r.shape.clone()
            };
            Row::by_rules(shape, device, cfg.config.kernels.mode)
        })
        .collect();
    let tokens = (micro_batch_size * cfg.config.data.seq_len) as u64;
    let act_bytes = rows.first().map_or(4, |r| r.shape.act_bytes());
    memory.weights_and_optimizer_bytes
        + memory.weight_copies_bytes
        + memory.runtime_bytes
        + activation_bytes(&rows, checkpointing)
        + loss_bytes(
            tokens,
            cfg.config.model.hidden_size() as u64,
            cfg.config.model.vocab_size() as u64,
            act_bytes,
        )
}

/// Micro-batch sizes below `cfg`'s that divide its sequences per step, largest first.
fn smaller_micro_batches(cfg: &ResolvedConfig) -> impl Iterator<Item = usize> + '_ {
    (1..cfg.config.train.micro_batch_size)
        .rev()
        .filter(|mb| cfg.batch_size % mb == 0)
}

/// The concrete changes that make `cfg`'s step fit `memory.limit_bytes`: the least
/// checkpointing that fits at the config's micro-batch, and the largest micro-batch that fits
/// with the config's checkpointing (or, when none does, with full checkpointing). Each names the
/// `--set` to pass and its estimate.
pub fn advice(
    cfg: &ResolvedConfig,
    device: &DeviceProfile,
    rows: &[Row],
    memory: &MemoryEstimate,
) -> String {
    let own_mb = cfg.config.train.micro_batch_size;
    let own_mode = cfg.config.train.activation_checkpointing;
    let fits = |c: &Candidate| c.total_bytes <= memory.limit_bytes;
    let candidate = |micro_batch_size, checkpointing| Candidate {
        micro_batch_size,
        checkpointing,
        total_bytes: total_with(cfg, device, rows, memory, micro_batch_size, checkpointing),
    };
    let stronger = MODES.iter().skip_while(|m| **m != own_mode).skip(1);
    let by_checkpointing = stronger.map(|&mode| candidate(own_mb, mode)).find(fits);
    let by_micro_batch = smaller_micro_batches(cfg)
        .map(|mb| candidate(mb, own_mode))
        .find(fits)
        .or_else(|| {
            (by_checkpointing.is_none() && own_mode != ActivationCheckpointing::Full)
                .then(|| {
                    smaller_micro_batches(cfg)
                        .map(|mb| candidate(mb, ActivationCheckpointing::Full))
                        .find(fits)
                })
                .flatten()
        });
    let options: Vec<String> = [by_checkpointing, by_micro_batch]
        .into_iter()
        .flatten()
        .map(|c| describe(cfg, &c))
        .collect();
    if options.is_empty() {
        let least = candidate(1, ActivationCheckpointing::Full);
        return format!(
            "even train.micro_batch_size = 1 with full activation checkpointing needs about {}: \
             lower data.seq_len, use a smaller model or a device with more memory",
            human_bytes(least.total_bytes)
        );
    }
    format!("to fit, {}", options.join(", or "))
}

/// `--set ...` for a candidate, with its estimate and what stays the same.
fn describe(cfg: &ResolvedConfig, c: &Candidate) -> String {
    let mut sets = Vec::new();
    if c.checkpointing != cfg.config.train.activation_checkpointing {
        sets.push(format!(
            "--set train.activation_checkpointing={}",
            c.checkpointing.name()
        ));
    }
    let mut note = String::new();
    if c.micro_batch_size != cfg.config.train.micro_batch_size {
        sets.push(format!(
            "--set train.micro_batch_size={}",
            c.micro_batch_size
        ));
        note = format!(
            "; {} micro-batches per step instead of {}, the same {} tokens",
            cfg.batch_size / c.micro_batch_size,
            cfg.grad_accum_steps,
            cfg.tokens_per_step
        );
    }
    format!(
        "{} (about {}{note})",
        sets.join(" "),
        human_bytes(c.total_bytes)
    )
}
