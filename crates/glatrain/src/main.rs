//! The `glatrain` command: parses the command line, runs the chosen job and maps failures to
//! exit codes (0 success, 2 bad usage / config / input, 1 failure while running).

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use cli::{
    BenchArgs, Cli, Command, EvalArgs, ExportArgs, PreflightArgs, PrepareArgs, SampleArgs,
    TrainArgs,
};

/// Any failure a command can end with.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Config(#[from] glatrain_config::ConfigError),
    #[error(transparent)]
    Data(#[from] glatrain_data::DataError),
    #[error(transparent)]
    Train(#[from] glatrain_train::TrainError),
    #[error(transparent)]
    Bench(#[from] glatrain_bench::BenchError),
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AppError {
    fn exit_code(&self) -> u8 {
        let bad_input = match self {
            AppError::Config(e) => e.is_bad_input(),
            AppError::Data(e) => e.is_bad_input(),
            AppError::Train(e) => e.is_bad_input(),
            AppError::Bench(e) => e.is_bad_input(),
            AppError::Write { .. } => false,
        };
        if bad_input {
            2
        } else {
            1
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Eval(args)) => eval(args),
        Some(Command::Sample(args)) => sample(args),
        Some(Command::Export(args)) => export(args),
        Some(Command::Prepare(args)) => prepare(args),
        Some(Command::Preflight(args)) => preflight(args),
        Some(Command::Bench(args)) => bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn train(args: TrainArgs) -> Result<(), AppError> {
    let path = args
        .config
        .expect("clap requires --config for the train form");
    let cfg = glatrain_config::load(&path, &args.overrides)?;
    let opts = glatrain_train::TrainOptions {
        resume: args.resume,
        stop_after: None,
    };
    let summary = glatrain_train::train(cfg, &opts)?;
    println!("{}", glatrain_train::describe_summary(&summary));
    Ok(())
}

fn bench(args: BenchArgs) -> Result<(), AppError> {
    let mut plan = glatrain_bench::Plan::select(&args.ops, &args.shapes, &args.dtypes)?;
    plan.first_call = !args.no_first_call;
    glatrain_bench::run(&plan, args.json.as_deref())?;
    Ok(())
}

fn preflight(args: PreflightArgs) -> Result<(), AppError> {
    let cfg = glatrain_config::load(&args.config, &args.overrides)?;
    let device = glatrain_train::setup::resolve_device(&cfg.config.run.device, &cfg.source)?;
    let report = glatrain_train::preflight::report(&cfg, device, args.measure)?;
    print!("{}", report.render_table());
    report
        .check()
        .map_err(|e| AppError::Train(glatrain_train::TrainError::from(e)))
}

fn eval(args: EvalArgs) -> Result<(), AppError> {
    if let Some(text) = &args.text {
        let report = glatrain_train::evaluate_text(&args.checkpoint, text, &args.text_field)?;
        println!("{report}");
        return write_json(args.json.as_deref(), &report);
    }
    let report = glatrain_train::evaluate(
        &args.checkpoint,
        args.data.as_deref(),
        args.batches,
        args.plot.as_deref(),
    )?;
    println!("{report}");
    write_json(args.json.as_deref(), &report)
}

/// Writes `report` as JSON to `path`, when one is given.
fn write_json(path: Option<&Path>, report: &impl serde::Serialize) -> Result<(), AppError> {
    let Some(path) = path else {
        return Ok(());
    };
    let write_err = |source| AppError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(report).map_err(|e| write_err(e.into()))?;
    glatrain_fs::write_atomic(path, &bytes).map_err(write_err)
}

fn export(args: ExportArgs) -> Result<(), AppError> {
    let dtype = glatrain_hub::Dtype::from_name(&args.dtype).expect("clap checks --dtype");
    let summary = glatrain_train::export(&args.checkpoint, &args.out, dtype, args.force)?;
    println!(
        "{}: {} ({} weights) from {}: {}",
        summary.out.display(),
        summary.architecture,
        summary.dtype.name(),
        summary.checkpoint.display(),
        summary.files.join(", ")
    );
    Ok(())
}

fn sample(args: SampleArgs) -> Result<(), AppError> {
    let text = glatrain_train::sample(
        &args.checkpoint,
        &args.prompt,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.seed,
    )?;
    println!("{text}");
    Ok(())
}

fn prepare(args: PrepareArgs) -> Result<(), AppError> {
    let manifest = glatrain_data::prepare(
        &args.input,
        &args.tokenizer,
        &args.out,
        args.shard_tokens,
        args.valid_fraction,
    )?;
    for (split, record) in manifest.splits() {
        println!(
            "{}: {split}: {} documents, {} tokens in {} shard(s), {} source bytes",
            args.out.display(),
            record.documents,
            record.tokens,
            record.shards.len(),
            record.source_bytes
        );
    }
    Ok(())
}
