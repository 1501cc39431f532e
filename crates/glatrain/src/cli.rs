//! Command-line interface: `glatrain --config FILE` trains (the main form); subcommands for the rest.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// Train gated-linear-attention language models (and their Transformer++ / Mamba baselines).
///
/// The main form trains the model described by a TOML config; `--resume` continues the same run
/// from its newest complete checkpoint.
///
/// Exit codes: 0 success, 2 bad usage, config or input (or a run directory in use), 1 failure
/// while running, 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP (after a checkpoint, or
/// at once on a second signal; `--resume` continues).
#[derive(Debug, Parser)]
#[command(
    name = "glatrain",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  glatrain --config gla-tiny\n  glatrain --config gla-340m --resume\n  glatrain --config gla-tiny --nproc-per-node 2\n  glatrain --config my-run.toml --set train.lr=1e-3 --set run.name=lr1e-3\n  glatrain configs\n  glatrain eval --checkpoint runs/gla-tiny\n  glatrain eval --checkpoint runs/gla-tiny --text wiki.test.txt\n  glatrain export --checkpoint runs/gla-tiny --out hf/gla-tiny\n  glatrain preflight --config gla-340m"
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
    /// The run's TOML config: a file, or the name of a shipped config (`glatrain configs` lists
    /// them; a file of that path wins). Relative paths inside resolve against the current
    /// directory.
    #[arg(long, short, value_name = "FILE|NAME", required = true)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `--set train.lr=1e-3` (repeatable; the value is TOML).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from the newest complete checkpoint of this run.
    #[arg(long)]
    pub resume: bool,
    /// Train data-parallel on N ranks of this host: starts N processes of glatrain with
    /// torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and stops
    /// them all when one fails. Without it, those variables (from torchrun or Slurm) make this
    /// process one rank.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub nproc_per_node: Option<u16>,
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
    /// List the configs built into glatrain (any directory can run one by name:
    /// `glatrain --config gla-340m`), or print one to copy and edit.
    Configs(ConfigsArgs),
    /// Tokenize a corpus (text, JSON Lines, parquet; plain, gzip or zstd) into token shards,
    /// optionally training a BPE tokenizer on it first.
    Prepare(PrepareArgs),
    /// Time the sequence-mixing ops on the GPU (GLA modes, libtorch's SDPA backends, Mamba's
    /// selective scan) against their floors and anchors.
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
    /// Evaluate on a text file instead (.txt, .jsonl or .parquet, also .gz/.zst compressed),
    /// tokenized with the run's tokenizer as one stream in non-overlapping windows of
    /// data.seq_len tokens.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "batches", "plot"])]
    pub text: Option<PathBuf>,
    /// The text field of each record of a JSON Lines or parquet --text file.
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
#[command(group(ArgGroup::new("text").required(true).args(["prompt", "prompt_file"])))]
pub struct SampleArgs {
    /// A checkpoint directory (runs/NAME/checkpoints/step-N) or a run directory (its newest).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Continue the text of this file (UTF-8) instead.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Tokens to generate. The text is printed as it is generated.
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
    /// A config file or the name of a shipped config.
    #[arg(long, short, value_name = "FILE|NAME")]
    pub config: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub overrides: Vec<String>,
    /// Time each candidate kernel mode on the real shapes instead of deciding by rules.
    #[arg(long)]
    pub measure: bool,
}

#[derive(Debug, Args)]
pub struct ConfigsArgs {
    /// Print this config's TOML (e.g. `glatrain configs gla-340m > my.toml`).
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Input formats (by file name; a directory is walked recursively, in \
sorted order):
  *.txt  *.txt.gz  *.txt.zst        text, documents separated by blank lines
  *.jsonl  *.jsonl.gz  *.jsonl.zst  JSON Lines, one document per line (also *.json.gz, *.json.zst)
  *.parquet                         one document per row (snappy, zstd or gzip compressed)

Examples:
  glatrain prepare --input fineweb/sample/10BT --tokenizer bpe:32000 --out data/fineweb-tokens
  glatrain prepare --input slimpajama/train --tokenizer tokenizer.json --out data/slimpajama-tokens
  glatrain prepare --input dump.jsonl.zst --text-field content --on-bad-record skip --out data/x"
)]
pub struct PrepareArgs {
    /// Corpus files or directories (walked recursively): text, JSON Lines or parquet, plain or
    /// gzip/zstd compressed (see below).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub input: Vec<PathBuf>,
    /// "byte", a tokenizer.json path, or "bpe:VOCAB" to train a BPE tokenizer on the input.
    #[arg(long, default_value = "byte")]
    pub tokenizer: String,
    /// Output directory (must not exist yet; written complete or not at all).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The JSON field (JSON Lines) or column (parquet) that holds each document's text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    pub text_field: String,
    /// What to do with a record that is not a document (invalid JSON, no text field, not UTF-8,
    /// a corrupt stretch of a file): stop with an error naming file and line, or skip it and
    /// count it (the first ones are listed, and the summary counts them by kind).
    #[arg(long, value_enum, default_value_t = BadRecordArg::Stop)]
    pub on_bad_record: BadRecordArg,
    /// Threads that parse and tokenize (0 = one per core). The output is the same for any
    /// number.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// Tokens per shard file.
    #[arg(long, default_value_t = glatrain_data::DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// Fraction of documents written to the validation split.
    #[arg(long, default_value_t = glatrain_data::DEFAULT_VALID_FRACTION)]
    pub valid_fraction: f64,
}

/// `--on-bad-record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BadRecordArg {
    Stop,
    Skip,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// An op to time: chunk, fused_chunk, fused_recurrent (GLA modes), sdpa_flash, sdpa_cudnn,
    /// sdpa_efficient, sdpa_math (one SDPA backend alone), sdpa (libtorch's own choice),
    /// sdpa_documents (block-causal over 4 documents a row) or selective_scan (Mamba's scan);
    /// repeatable. Default: every GLA mode, sdpa_flash and sdpa
    /// at the --shape shapes, selective_scan at the --scan-shape shapes.
    #[arg(long = "op", value_name = "OP")]
    pub ops: Vec<String>,
    /// A shape of the GLA and SDPA ops, `BxTxHxD` (K = V = D) or `BxTxHxKxV`; repeatable.
    /// Default: the shapes flash-linear-attention was measured at (bench/anchors.json).
    #[arg(long = "shape", value_name = "SHAPE")]
    pub shapes: Vec<String>,
    /// A shape of the selective scan, `BxTxDxN` (D = d_inner, N = d_state); repeatable.
    /// Default: the shapes mamba_ssm's scan was measured at (bench/anchors.json).
    #[arg(long = "scan-shape", value_name = "SHAPE")]
    pub scan_shapes: Vec<String>,
    /// Input dtype: bf16, fp16 or fp32; repeatable. Default: bf16.
    #[arg(long = "dtype", value_name = "DTYPE")]
    pub dtypes: Vec<String>,
    /// Run a fixed comparison instead of chosen rows: `article` (GLA vs FlashAttention vs Mamba
    /// at head dims 32, 128 and 1024 over T from 1K to 16K, with a table and a chart).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw the preset's chart (PNG) here. Default: next to --json, with the extension .png.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Skip the cold first-call measurement (NVRTC compilation into an empty cache).
    #[arg(long)]
    pub no_first_call: bool,
}
