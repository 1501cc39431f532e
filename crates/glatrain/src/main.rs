//! The `glatrain` command: parses the command line, runs the chosen job and maps outcomes to
//! exit codes (0 success, 2 bad usage / config / input, 1 failure while running, 128 + the
//! signal's number for a training stopped by a signal: 130 SIGINT, 143 SIGTERM, 129 SIGHUP).

mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

use cli::{
    BadRecordArg, BenchArgs, Cli, Command, ConfigsArgs, EvalArgs, ExportArgs, PreflightArgs,
    PrepareArgs, SampleArgs, TrainArgs,
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
    #[error(transparent)]
    Dist(#[from] glatrain_dist::DistError),
    /// A failure of one rank of a data-parallel run.
    #[error("rank {rank}: {source}")]
    Rank { rank: usize, source: Box<AppError> },
    #[error("{}: cannot read the prompt: {source}", path.display())]
    PromptFile {
        path: PathBuf,
        source: std::io::Error,
    },
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
            AppError::Dist(e) => e.is_bad_input(),
            AppError::Rank { source, .. } => return source.exit_code(),
            AppError::PromptFile { .. } => true,
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
    let done = |result: Result<(), AppError>| result.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        None => train(cli.train),
        Some(Command::Train(args)) => train(args),
        Some(Command::Eval(args)) => done(eval(args)),
        Some(Command::Sample(args)) => done(sample(args)),
        Some(Command::Export(args)) => done(export(args)),
        Some(Command::Prepare(args)) => done(prepare(args)),
        Some(Command::Configs(args)) => done(configs(args)),
        Some(Command::Preflight(args)) => done(preflight(args)),
        Some(Command::Bench(args)) => done(bench(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Trains; a run stopped by a signal exits with 128 + its number, as a shell reports a process
/// the signal ended. With `--nproc-per-node`, starts the ranks instead and exits as they did.
fn train(args: TrainArgs) -> Result<ExitCode, AppError> {
    let path = args
        .config
        .expect("clap requires --config for the train form");
    let cfg = glatrain_config::load(&path, &args.overrides)?;
    check_data_paths(&cfg)?;
    if let Some(nproc) = args.nproc_per_node {
        // What every rank would refuse, refused once, before any starts.
        glatrain_train::shard::Shard::new(&cfg, 0, usize::from(nproc))?;
        return launch(usize::from(nproc), &path, &args.overrides, args.resume);
    }
    let world = glatrain_dist::WorldEnv::from_env()?.filter(|w| w.world_size > 1);
    let rank = world.as_ref().map(|w| w.rank);
    let opts = glatrain_train::TrainOptions {
        resume: args.resume,
        stop_after: None,
        world,
    };
    let summary = glatrain_train::train(cfg, &opts).map_err(|e| match rank {
        Some(rank) => AppError::Rank {
            rank,
            source: Box::new(e.into()),
        },
        None => e.into(),
    })?;
    if rank.is_none_or(|r| r == 0) {
        println!("{}", glatrain_train::describe_summary(&summary));
    }
    Ok(summary.interrupted.map_or(ExitCode::SUCCESS, |signal| {
        ExitCode::from(signal.exit_status())
    }))
}

/// `--nproc-per-node N`: runs this program's training form as N local ranks.
fn launch(
    nproc: usize,
    config: &Path,
    overrides: &[String],
    resume: bool,
) -> Result<ExitCode, AppError> {
    let program = std::env::current_exe().map_err(|source| glatrain_dist::DistError::Process {
        what: "finding the glatrain executable to start the ranks".into(),
        source,
    })?;
    let mut args = vec!["--config".into(), config.as_os_str().to_owned()];
    for o in overrides {
        args.push("--set".into());
        args.push(o.into());
    }
    if resume {
        args.push("--resume".into());
    }
    let status = glatrain_dist::launch::run(nproc, &program, &args)?;
    Ok(ExitCode::from(status))
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

/// Before anything is built: the data the config names exists, or the error says how to make it.
fn check_data_paths(cfg: &glatrain_config::ResolvedConfig) -> Result<(), AppError> {
    let data = &cfg.config.data;
    glatrain_data::DataSettings {
        origin: &cfg.source,
        train: &data.train,
        valid: &data.valid,
        tokenizer: &data.tokenizer,
        vocab_size: u32::try_from(cfg.config.model.vocab_size()).unwrap_or(u32::MAX),
    }
    .check_paths()?;
    Ok(())
}

/// `glatrain configs`: the shipped configs as a table, or one config's text.
fn configs(args: ConfigsArgs) -> Result<(), AppError> {
    use glatrain_config::shipped;
    if let Some(name) = args.name {
        let config = shipped::find(std::path::Path::new(&name)).ok_or_else(|| {
            glatrain_config::ConfigError::NotFound {
                path: name.clone().into(),
                hint: format!("the shipped configs are {}", shipped::names()),
            }
        })?;
        print!("{}", config.text);
        return Ok(());
    }
    println!(
        "{:<18} {:<12} {:>10}  description",
        "name", "model", "parameters"
    );
    for config in shipped::SHIPPED {
        let resolved = glatrain_config::from_str(config.text, &config.origin(), &[])?;
        let model = &resolved.config.model;
        println!(
            "{:<18} {:<12} {:>10}  {}",
            config.name,
            model.type_name(),
            parameters(model.parameter_count()),
            config.description()
        );
    }
    println!(
        "\nRun one from any directory with `glatrain --config NAME` (a file of that path wins);\n\
         `glatrain configs NAME > my.toml` writes a copy to edit."
    );
    Ok(())
}

/// `1.3B`, `337M`, `0.6M`
fn parameters(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e7 {
        format!("{:.0}M", n / 1e6)
    } else {
        format!("{:.1}M", n / 1e6)
    }
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

/// Samples, printing the text as it is generated.
fn sample(args: SampleArgs) -> Result<(), AppError> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (_, Some(path)) => {
            std::fs::read_to_string(path).map_err(|source| AppError::PromptFile {
                path: path.clone(),
                source,
            })?
        }
        (Some(prompt), None) => prompt.clone(),
        (None, None) => String::new(),
    };
    let mut stdout = std::io::stdout().lock();
    glatrain_train::sample(
        &args.checkpoint,
        &prompt,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        &mut |text| {
            // A closed stdout (a pager quit early) ends nothing but the output.
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
        },
    )?;
    let _ = writeln!(stdout);
    Ok(())
}

fn prepare(args: PrepareArgs) -> Result<(), AppError> {
    // Ctrl-C (or SIGTERM) stops between batches and removes the partial output.
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&interrupt)) {
            eprintln!(
                "warning: cannot catch signal {signal} ({e}); an interrupted run leaves a hidden \
                 partial directory"
            );
        }
    }
    let options = glatrain_data::PrepareOptions {
        tokenizer: args.tokenizer,
        shard_tokens: args.shard_tokens,
        valid_fraction: args.valid_fraction,
        text_field: args.text_field,
        on_bad_record: match args.on_bad_record {
            BadRecordArg::Stop => glatrain_data::OnBadRecord::Stop,
            BadRecordArg::Skip => glatrain_data::OnBadRecord::Skip,
        },
        threads: args.threads,
        progress: glatrain_data::ProgressDisplay::Auto,
        interrupt: Some(interrupt),
    };
    let report = glatrain_data::prepare(&args.input, &args.out, &options)?;
    for (split, record) in report.manifest.splits() {
        println!(
            "{}: {split}: {} documents, {} tokens in {} shard(s), {} source bytes",
            args.out.display(),
            record.documents,
            record.tokens,
            record.shards.len(),
            record.source_bytes
        );
    }
    println!("{}", report.stats.summary());
    Ok(())
}
