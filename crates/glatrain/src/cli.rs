//! Command-line interface: `glatrain --config FILE` trains (the main form); subcommands for the rest.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Train gated-linear-attention language models (and their Transformer++ / Mamba baselines).
///
/// The main form trains the model described by a TOML config; `--resume` continues the same run
/// from its newest complete checkpoint.
///
/// Exit codes: 0 success, 2 bad usage, config or input, 1 failure while running.
#[derive(Debug, Parser)]
#[command(
    name = "glatrain",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  glatrain --config configs/gla-tiny.toml\n  glatrain --config configs/gla-340m.toml --resume\n  glatrain --config configs/gla-tiny.toml --set train.lr=1e-3 --set run.name=lr1e-3\n  glatrain eval --checkpoint runs/gla-tiny\n  glatrain eval --checkpoint runs/gla-tiny --text wiki.test.txt\n  glatrain export --checkpoint runs/gla-tiny --out hf/gla-tiny\n  glatrain preflight --config configs/gla-340m.toml"
)]
pub struct Cli {
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options of the main form (training).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run's TOML config (see configs/ and the README's key reference).
    #[arg(long, short, value_name = "FILE", required = true)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `--set train.lr=1e-3` (repeatable; the value is TOML).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the newest complete checkpoint of this run.
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (the same as the main form).
    Train(TrainArgs),
    /// Validation perplexity and bits per byte of a checkpoint, overall and by position; or of a
    /// text file (--text).
    Eval(EvalArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
    /// Write a checkpoint as a Hugging Face model directory (config.json, model.safetensors,
    /// tokenizer) that transformers' AutoModelForCausalLM.from_pretrained loads.
    Export(ExportArgs),
    /// Show each layer's kernel mode, why it was chosen, and its estimated cost.
    Preflight(PreflightArgs),
    /// Tokenize text files into token shards (and optionally train a BPE tokenizer).
    Prepare(PrepareArgs),
    /// Time the sequence-mixing ops on the GPU (GLA modes, libtorch's SDPA backends) against
    /// their memory floors and anchors.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint directory (runs/NAME/checkpoints/step-N) or a run directory (its newest).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Validation data instead of the config's `data.valid` ("embedded", a shard dir or a .bin).
    #[arg(long, value_name = "PATH")]
    pub data: Option<String>,
    /// Number of validation batches: 0 = the whole validation set (default: the config's
    /// `train.eval_batches`).
    #[arg(long)]
    pub batches: Option<usize>,
    /// Where to write the loss-by-position plot (default: next to the checkpoint).
    #[arg(long, value_name = "PNG")]
    pub plot: Option<PathBuf>,
    /// Evaluate on a text file instead (.txt, or .jsonl with --text-field), tokenized with the
    /// run's tokenizer as one stream in non-overlapping windows of data.seq_len tokens.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "batches", "plot"])]
    pub text: Option<PathBuf>,
    /// The text field of each line of a .jsonl --text file.
    #[arg(long, value_name = "NAME", default_value = "text", requires = "text")]
    pub text_field: String,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint directory (runs/NAME/checkpoints/step-N) or a run directory (its newest).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The model directory to write (it must not exist, unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Weight dtype: fp32 (the master weights, bit for bit), bf16 or fp16.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16", "fp16"])]
    pub dtype: String,
    /// Replace an existing model directory at --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct PreflightArgs {
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Time each candidate kernel mode on the real shapes instead of deciding by rules.
    #[arg(long)]
    pub measure: bool,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Text files or directories (walked recursively).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub input: Vec<PathBuf>,
    /// "byte", a tokenizer.json path, or "bpe:VOCAB" to train a BPE tokenizer on the input.
    #[arg(long, default_value = "byte")]
    pub tokenizer: String,
    /// Output directory (must not exist yet).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tokens per shard file.
    #[arg(long, default_value_t = glatrain_data::DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// Fraction of documents written to the validation split.
    #[arg(long, default_value_t = glatrain_data::DEFAULT_VALID_FRACTION)]
    pub valid_fraction: f64,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// An op to time: chunk, fused_chunk, fused_recurrent (GLA modes), sdpa_flash, sdpa_cudnn,
    /// sdpa_efficient, sdpa_math (one SDPA backend alone) or sdpa (libtorch's own choice);
    /// repeatable. Default: every GLA mode, sdpa_flash and sdpa.
    #[arg(long = "op", value_name = "OP")]
    pub ops: Vec<String>,
    /// A shape, `BxTxHxD` (K = V = D) or `BxTxHxKxV`; repeatable. Default: the shapes
    /// flash-linear-attention was measured at (bench/anchors.json).
    #[arg(long = "shape", value_name = "SHAPE")]
    pub shapes: Vec<String>,
    /// q/k/v dtype: bf16, fp16 or fp32; repeatable. Default: bf16.
    #[arg(long = "dtype", value_name = "DTYPE")]
    pub dtypes: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Skip the cold first-call measurement (NVRTC compilation into an empty cache).
    #[arg(long)]
    pub no_first_call: bool,
}
