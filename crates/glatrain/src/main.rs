//! The `glatrain` command: parses the command line, runs the chosen job and maps failures to
//! exit codes (0 success, 2 bad usage / config / input, 1 failure while running).

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::{BenchArgs, Cli, Command, EvalArgs, PreflightArgs, PrepareArgs, SampleArgs, TrainArgs};

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
}

impl AppError {
    fn exit_code(&self) -> u8 {
        let bad_input = match self {
            AppError::Config(e) => e.is_bad_input(),
            AppError::Data(e) => e.is_bad_input(),
            AppError::Train(e) => e.is_bad_input(),
            AppError::Bench(e) => e.is_bad_input(),
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
    let selection = glatrain_bench::Selection {
        ops: args.ops,
        shapes: args.shapes,
        scan_shapes: args.scan_shapes,
        dtypes: args.dtypes,
    };
    let mut plan = match &args.preset {
        Some(name) => glatrain_bench::Plan::preset(name, &selection)?,
        None => glatrain_bench::Plan::select(&selection)?,
    };
    plan.first_call &= !args.no_first_call;
    let chart = args
        .chart
        .or_else(|| args.json.as_ref().map(|j| j.with_extension("png")))
        .filter(|_| plan.preset.is_some());
    glatrain_bench::run(&plan, args.json.as_deref(), chart.as_deref())?;
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
    let report = glatrain_train::evaluate(
        &args.checkpoint,
        args.data.as_deref(),
        args.batches,
        args.plot.as_deref(),
    )?;
    println!("{report}");
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
