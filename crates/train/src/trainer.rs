//! The training loop, top to bottom:
//!
//! ```text
//! lock the run directory (one writer), remove leftovers of interrupted writes
//! check every input (device, threads, data, tokenizer, validation length, chart path), then
//! set up (precision, model, optimizer, data, logs; or restore a checkpoint)
//! for step in state.step..max_steps:
//!     lr = schedule(step)
//!     grad_accum_steps x { batch -> forward (autocast) -> loss * loss_scale / accum -> backward }
//!     unscale -> global grad norm -> non-finite? skip (scaler backs off) : clip + AdamW
//!     log / evaluate / checkpoint as configured; stop early on a signal or stop_after
//! final checkpoint, then the final evaluation (table, chart)
//! ```
//!
//! A signal (see [`crate::interrupt`]) is noticed after a step or between evaluation batches:
//! the run writes a checkpoint of its last finished step and returns, naming the signal.
//!
//! Data parallel ([`TrainOptions::world`]): every rank builds the same model and takes rank 0's
//! weights, draws the same global micro-batches (`micro_batch_size` x ranks sequences, what one
//! process with that micro-batch would draw) and trains on its own rows of each; the gradients
//! are averaged over the ranks during the backward of the step's last micro-batch, and the loss
//! after it, so every rank then takes the same (global) norm, clipping, skip decision and
//! update. The ranks agree on a stop after every
//! step. Rank 0 alone writes the run directory: lock, config, logs, progress, evaluations,
//! checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use glatrain_config::ResolvedConfig;
use glatrain_data::{BatchLoader, TokenSource};
use glatrain_dist::{DataParallel, WorldEnv};
use glatrain_fs::DirLock;
use tch::{Device, Kind, TchError, Tensor};

use crate::boundary::{catch_torch, is_out_of_memory, torch_error};
use crate::checkpoint::{self, CheckpointContents, CheckpointError};
use crate::datasets::{open_tokenizer_for_model, SourceOpener};
use crate::error::TrainError;
use crate::eval::{
    batch_documents, batch_tensors, check_chart_path, draw_report, eval_batches, evaluate_model,
    EvalReport, PLOT_FILE,
};
use crate::flops;
use crate::interrupt::{self, StopSignal};
use crate::metrics::MetricsLogger;
use crate::optim::{clip_grads, global_grad_norm, scale_grads, AdamW, AdamWConfig};
use crate::precision::MixedPrecision;
use crate::profile::ProfileWindow;
use crate::progress::{format_rate, Progress, StepView};
use crate::schedule::LrSchedule;
use crate::setup::{self, named_variables};
use crate::shard::Shard;
use crate::state::{model_differences, TrainState};
use crate::sysinfo;

/// How to run `train`, besides the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest complete checkpoint of the run directory.
    pub resume: bool,
    /// Stop after this optimizer step (if reached before `max_steps`) exactly as an
    /// interruption would: checkpoint, then return. For splitting a run into sessions.
    pub stop_after: Option<u64>,
    /// This process's rank in a data-parallel run (`None`: it trains alone).
    pub world: Option<WorldEnv>,
}

/// What a training session did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// Step the session started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Steps completed when the session ended.
    pub final_step: u64,
    pub tokens_seen: u64,
    /// `(step, mean loss)` of every step of this session (1-based step numbers).
    pub losses: Vec<(u64, f64)>,
    /// The last evaluation (the final one when the run completed).
    pub eval: Option<EvalReport>,
    /// The newest checkpoint written by this session.
    pub checkpoint: Option<PathBuf>,
    /// The checkpoint a resumed session started from.
    pub resumed_from: Option<PathBuf>,
    /// Newer checkpoints a resume refused (incomplete or corrupt), with the reason.
    pub rejected_checkpoints: Vec<String>,
    /// True when the session ended before `max_steps` (signal or `stop_after`).
    pub stopped_early: bool,
    /// The signal that stopped the session (before `max_steps`, or during the final
    /// evaluation), if one did.
    pub interrupted: Option<StopSignal>,
    /// Steps skipped for non-finite gradients, over the whole run.
    pub skipped_steps: u64,
    pub parameters: i64,
    /// Wall-clock seconds over all sessions of the run.
    pub elapsed_secs: f64,
    /// What the run held in memory at its end (peaks since this session started on a GPU).
    pub memory: Option<sysinfo::MemoryReading>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything the loop mutates besides the model.
struct Run<'a> {
    cfg: &'a ResolvedConfig,
    device: Device,
    precision: MixedPrecision,
    model: Box<dyn glatrain_models::CausalLm>,
    vs: tch::nn::VarStore,
    opt: AdamW,
    /// Draws the global micro-batches (every rank's rows).
    loader: BatchLoader,
    /// The process group of a data-parallel run.
    dp: Option<DataParallel>,
    /// This rank's share of the step: `accum` micro-batches of `rows` sequences.
    shard: Shard,
    /// With the optimizer state sharded: the rank that owns each of [`AdamW::params`].
    owners: Option<Vec<usize>>,
    valid: Arc<TokenSource>,
    state: TrainState,
    /// Rank 0's (a single process's) metrics; the other ranks write none.
    logger: Option<MetricsLogger>,
    progress: Progress,
    checkpoints_dir: PathBuf,
    config_toml: String,
    last_checkpoint: Option<(u64, PathBuf)>,
    session_start: Instant,
    elapsed_before: f64,
    /// FLOPs per token and the GPU's peak for the precision, when MFU can be reported.
    mfu_basis: Option<(u64, f64)>,
    /// The steps `logging.profile_steps` asks to profile.
    profile: Option<ProfileWindow>,
}

/// Trains the model of `cfg` (see the module docs). Progress goes to stderr; metrics to
/// `<run>/metrics.jsonl` and `<run>/tensorboard/`; checkpoints to `<run>/checkpoints/`.
/// Returns an error instead of exiting; SIGINT/SIGTERM/SIGHUP end the session cleanly after a
/// checkpoint (`stopped_early`, `interrupted`). Holds the run directory's lock throughout: a
/// second process on the same run (a concurrent `--resume` included) is refused.
pub fn train(cfg: ResolvedConfig, opts: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let cfg = &cfg;
    let world = opts.world.as_ref().filter(|w| w.world_size > 1);
    let device = setup::resolve_rank_device(&cfg.config.run.device, &cfg.source, world)?;
    let threads = setup::apply_threads(cfg)?;
    let precision = MixedPrecision::new(cfg.config.train.precision, device, &cfg.source)?;
    if let Some(world) = world {
        // Before meeting the others: a config that cannot split is every rank's exit 2.
        Shard::new(cfg, world.rank, world.world_size)?;
    }
    let dp = world.map(|w| DataParallel::join(w, device)).transpose()?;
    if dp.as_ref().is_some_and(|dp| !dp.is_writer()) {
        // Reads the run directory, writes nothing there: no lock, no clean-up.
        return train_locked(cfg, opts, device, threads, precision, dp);
    }

    let run_dir = cfg.run_dir();
    let fresh_dir = !run_dir.exists();
    let lock = DirLock::acquire(&run_dir)?;
    if let Some(stale) = lock.stale_holder() {
        eprintln!(
            "note: {} was locked by {stale}, which ended without releasing it",
            run_dir.display()
        );
    }
    let outcome = train_locked(cfg, opts, device, threads, precision, dp);
    if outcome.is_err() && fresh_dir {
        remove_if_unused(&run_dir);
    }
    drop(lock);
    outcome
}

/// Removes a run directory that a refused fresh run created and left holding only its lock
/// file (best effort: what else is in it stays).
fn remove_if_unused(run_dir: &Path) {
    let only_lock = std::fs::read_dir(run_dir).is_ok_and(|entries| {
        entries
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .is_ok_and(|names| names == [glatrain_fs::LOCK_FILE])
    });
    if only_lock {
        let _ = std::fs::remove_file(run_dir.join(glatrain_fs::LOCK_FILE));
        let _ = std::fs::remove_dir(run_dir);
    }
}

/// [`train`] once the run directory is locked (by rank 0 of a data-parallel run): its stages
/// in order.
fn train_locked(
    cfg: &ResolvedConfig,
    opts: &TrainOptions,
    device: Device,
    threads: i32,
    precision: MixedPrecision,
    dp: Option<DataParallel>,
) -> Result<TrainSummary, TrainError> {
    let tc = &cfg.config.train;
    let writer = dp.as_ref().is_none_or(DataParallel::is_writer);
    let shard = Shard::new(
        cfg,
        dp.as_ref().map_or(0, DataParallel::rank),
        dp.as_ref().map_or(1, DataParallel::world_size),
    )?;
    let run_dir = cfg.run_dir();
    let checkpoints_dir = run_dir.join("checkpoints");
    let (resume_dir, rejected) =
        check_run_dir(cfg, &run_dir, &checkpoints_dir, opts.resume, writer)?;
    let preflight = preflight(cfg, device, &precision, writer)?;
    let Built {
        vs,
        model,
        mut opt,
        parameters,
        train_source,
        valid,
    } = build(cfg, device, crate::preflight::chosen_mode(&preflight))?;
    // Weights from a Hugging Face model directory (`model.init_from`), unless resuming.
    crate::init_from::apply(cfg, &vs, resume_dir.is_some())?;
    let owners = shard_optimizer_state(cfg, dp.as_ref(), &mut opt)?;
    let (loader, state) = match &resume_dir {
        None => {
            let loader = BatchLoader::new(
                Arc::clone(&train_source),
                shard.global_rows(),
                cfg.config.data.seq_len,
                cfg.config.run.seed,
            )?;
            let loader = with_document_starts(cfg, loader)?;
            let state = TrainState::fresh(cfg, &loader, &precision, threads, parameters);
            if writer {
                cfg.write_resolved(&run_dir)?;
            }
            (loader, state)
        }
        Some(dir) => {
            let (loader, state, earlier) =
                restore(cfg, dir, &vs, &mut opt, &train_source, threads, &shard)?;
            // Only now that the resume is known to fit: the run directory records this config.
            if writer {
                record_resumed_config(cfg, dir, &earlier, state.step)?;
            }
            (loader, state)
        }
    };
    let mut dp = dp;
    if let Some(dp) = &mut dp {
        join_weights_and_gradients(dp, &vs, &opt)?;
    }
    begin_session(cfg, device, &rejected, state.step, writer)?;
    let mfu_basis = mfu_basis(cfg, device, shard.ranks);
    let elapsed_before = state.elapsed_secs;
    let start_step = state.step;
    let (logger, progress, profile) = if writer {
        preflight.write_json(&run_dir)?;
        let logger = MetricsLogger::open(
            &run_dir,
            &cfg.config.logging,
            resume_dir.as_ref().map(|_| state.step),
        )?;
        announce(cfg, device, parameters, &run_dir, &shard);
        announce_data(cfg, &train_source);
        let progress = Progress::new(cfg.config.logging.progress, state.step, tc.max_steps);
        let profile = ProfileWindow::from_config(&cfg.config.logging, &run_dir, device);
        (Some(logger), progress, profile)
    } else {
        (None, Progress::silent(state.step, tc.max_steps), None)
    };
    let mut run = Run {
        cfg,
        device,
        precision,
        model,
        vs,
        opt,
        loader,
        dp,
        shard,
        owners,
        valid,
        state,
        logger,
        progress,
        checkpoints_dir,
        config_toml: cfg.to_toml_string()?,
        // A resumed session has its starting step on disk already.
        last_checkpoint: resume_dir.clone().map(|dir| (start_step, dir)),
        session_start: Instant::now(),
        elapsed_before,
        mfu_basis,
        profile,
    };
    let outcome = run.train_loop(opts);
    run.progress.finish();
    if let Some(logger) = &mut run.logger {
        logger.flush()?;
    }
    Ok(run.summary(outcome?, start_step, resume_dir, rejected, parameters))
}

/// ZeRO stage 1 (`train.shard_optimizer_state` in a data-parallel run): this rank keeps (and
/// loads, on a resume) the AdamW moments of its share of the parameters only. The owner of each
/// parameter, by rank; `None` when the state is not sharded.
fn shard_optimizer_state(
    cfg: &ResolvedConfig,
    dp: Option<&DataParallel>,
    opt: &mut AdamW,
) -> Result<Option<Vec<usize>>, TrainError> {
    let Some(dp) = dp.filter(|_| cfg.config.train.shard_optimizer_state) else {
        return Ok(None);
    };
    let sizes: Vec<usize> = opt.params().iter().map(|p| p.param.numel()).collect();
    let owner = glatrain_dist::data_parallel::owners(&sizes, dp.world_size());
    opt.keep_only(|i| owner[i] == dp.rank())?;
    if dp.is_writer() {
        let own: usize = (sizes.iter().zip(&owner))
            .filter(|(_, &o)| o == 0)
            .map(|(s, _)| s)
            .sum();
        eprintln!(
            "optimizer state sharded over {} ranks (ZeRO stage 1): rank 0 keeps the AdamW \
             moments of {own} of {} parameters",
            dp.world_size(),
            sizes.iter().sum::<usize>()
        );
    }
    Ok(Some(owner))
}

/// Every rank starts from rank 0's weights, whatever it initialised or loaded, and its
/// gradients are all-reduced in buckets as the backward produces them.
fn join_weights_and_gradients(
    dp: &mut DataParallel,
    vs: &tch::nn::VarStore,
    opt: &AdamW,
) -> Result<(), TrainError> {
    let weights: Vec<Tensor> = named_variables(vs).into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| dp.broadcast("broadcasting rank 0's weights", &weights, 0))?;
    let params: Vec<Tensor> = opt
        .params()
        .iter()
        .map(|p| p.param.shallow_clone())
        .collect();
    dp.watch_gradients(&params)?;
    Ok(())
}

/// What a session says (the `writer` alone) and sets up before its first step: the refused
/// checkpoints, a resume with nothing left to train, the signal handlers, and (on a GPU) the
/// memory peaks started afresh, not at whatever the preflight's timing allocated.
fn begin_session(
    cfg: &ResolvedConfig,
    device: Device,
    rejected: &[String],
    step: u64,
    writer: bool,
) -> Result<(), TrainError> {
    let max_steps = cfg.config.train.max_steps;
    if writer {
        for r in rejected {
            eprintln!("warning: skipping checkpoint {r}");
        }
        if step >= max_steps {
            eprintln!(
                "note: the checkpoint is at step {step}, train.max_steps = {max_steps}: nothing \
                 left to train; evaluating it (raise train.max_steps to train further)"
            );
        }
    }
    if let Err(e) = interrupt::install(writer) {
        eprintln!(
            "warning: cannot handle SIGINT/SIGTERM ({e}); an interrupted run loses the steps \
             since its last checkpoint"
        );
    }
    if let Device::Cuda(ordinal) = device {
        glatrain_shim::memory::reset_peak(ordinal).map_err(|message| TrainError::Torch {
            what: "resetting the memory peaks".into(),
            message,
        })?;
    }
    Ok(())
}

/// The run directory before anything is built: leftovers of interrupted writes removed (under
/// the lock every temporary is one; by the `writer` only), the checkpoint to resume from (with
/// the newer ones refused), the tokenizer and the chart path checked.
fn check_run_dir(
    cfg: &ResolvedConfig,
    run_dir: &Path,
    checkpoints_dir: &Path,
    resume: bool,
    writer: bool,
) -> Result<(Option<PathBuf>, Vec<String>), TrainError> {
    if writer {
        for dir in [run_dir, checkpoints_dir] {
            for path in glatrain_fs::remove_temporaries(dir).map_err(io_err(dir))? {
                eprintln!("removed {} (left by an interrupted write)", path.display());
            }
        }
    }
    let found = find_resume_point(checkpoints_dir, run_dir, resume)?;
    open_tokenizer_for_model(cfg)?;
    if writer {
        check_chart_path(&run_dir.join(PLOT_FILE))?;
    }
    Ok(found)
}

/// The preflight: refuses what cannot run, prints its table, picks the kernel mode and starts
/// compiling the kernels it runs in the background.
fn preflight(
    cfg: &ResolvedConfig,
    device: Device,
    precision: &MixedPrecision,
    writer: bool,
) -> Result<glatrain_preflight::Report, TrainError> {
    let report = crate::preflight::report(cfg, device, false)?;
    if writer {
        eprint!("{}", report.render_table());
    }
    report.check()?;
    let kernel_kind = precision.autocast_kind().unwrap_or(Kind::Float);
    setup::prepare_kernels(
        cfg,
        device,
        crate::preflight::chosen_mode(&report),
        kernel_kind,
    );
    Ok(report)
}

/// What a run is built from: the model, its optimizer and the data.
struct Built {
    vs: tch::nn::VarStore,
    model: Box<dyn glatrain_models::CausalLm>,
    opt: AdamW,
    parameters: i64,
    train_source: Arc<TokenSource>,
    valid: Arc<TokenSource>,
}

/// Builds the model (its GLA layers in `mode`), AdamW over its parameters, and opens the
/// training and validation data; the validation set must hold one evaluation window, or the run
/// would fail at its end.
fn build(
    cfg: &ResolvedConfig,
    device: Device,
    mode: glatrain_ops::GlaMode,
) -> Result<Built, TrainError> {
    let tc = &cfg.config.train;
    let setup::BuiltModel { vs, model } = setup::build_model(cfg, device, mode)?;
    let parameters = glatrain_models::count_parameters(&vs);
    let params: Vec<(String, Tensor, bool)> = named_variables(&vs)
        .into_iter()
        .map(|(name, t)| {
            let decay = !glatrain_models::no_weight_decay(&name);
            (name, t, decay)
        })
        .collect();
    let opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        },
    )?;
    let mut sources = SourceOpener::new(cfg);
    let train_source = sources.train(&cfg.config.data.train)?;
    let valid = sources.valid(&cfg.config.data.valid)?;
    eval_batches(cfg, &valid, Some(1))?;
    Ok(Built {
        vs,
        model,
        opt,
        parameters,
        train_source,
        valid,
    })
}

/// FLOPs per token and the dense peak of the run's GPUs (one per rank) for the precision, when
/// MFU can be reported.
fn mfu_basis(cfg: &ResolvedConfig, device: Device, ranks: usize) -> Option<(u64, f64)> {
    let name = sysinfo::gpu_name(device)?;
    let peak = flops::peak_flops(&name, cfg.config.train.precision)?;
    Some((
        flops::flops_per_token(&cfg.config.model, cfg.config.data.seq_len),
        peak * ranks as f64,
    ))
}

/// The lines a run starts with: what trains where, and how its FLOPs are counted.
fn announce(cfg: &ResolvedConfig, device: Device, parameters: i64, run_dir: &Path, shard: &Shard) {
    let tc = &cfg.config.train;
    let seq_len = cfg.config.data.seq_len;
    let ranks = match shard.ranks {
        1 => String::new(),
        n => format!(" on each of {n} ranks"),
    };
    eprintln!(
        "training {} ({} parameters) on {device:?}, {} | {} sequences x {seq_len} tokens per step \
         ({} micro-batches of {}{ranks}) | {} steps | run dir {}",
        cfg.config.model.type_name(),
        parameters,
        crate::precision::precision_name(tc.precision),
        cfg.batch_size,
        shard.accum,
        shard.rows,
        tc.max_steps,
        run_dir.display()
    );
    let peak = sysinfo::gpu_name(device)
        .and_then(|name| flops::peak_flops(&name, tc.precision).map(|p| (name, p)));
    eprintln!("{}", flops::describe(&cfg.config.model, seq_len, peak));
}

/// The training data's line: its size and, where it records them, its documents and how many
/// a window holds on average.
fn announce_data(cfg: &ResolvedConfig, source: &TokenSource) {
    let seq_len = cfg.config.data.seq_len;
    let mut line = format!("data: {} ({} tokens", source.name(), source.len());
    if let (Some(documents), Some(per_window)) =
        (source.documents(), source.documents_per_window(seq_len))
    {
        let how = if cfg.config.data.document_boundaries {
            "each computed alone (data.document_boundaries)"
        } else {
            "computed as one sequence (data.document_boundaries = false)"
        };
        line.push_str(&format!(
            " in {documents} documents): {per_window:.2} documents per window of {seq_len} \
             tokens on average, {how}"
        ));
    } else {
        line.push(')');
    }
    eprintln!("{line}");
}

/// `loader`, giving each batch's document starts when `data.document_boundaries` is on.
fn with_document_starts(
    cfg: &ResolvedConfig,
    loader: BatchLoader,
) -> Result<BatchLoader, TrainError> {
    if cfg.config.data.document_boundaries {
        return Ok(loader.with_document_starts()?);
    }
    Ok(loader)
}

/// The checkpoint to resume from (`--resume`), with the newer ones that were refused; refuses
/// a fresh run over an existing run's checkpoints.
fn find_resume_point(
    checkpoints_dir: &Path,
    run_dir: &Path,
    resume: bool,
) -> Result<(Option<PathBuf>, Vec<String>), TrainError> {
    let (found, rejected) = checkpoint::find_latest(checkpoints_dir)?;
    if resume {
        return match found {
            Some(dir) => Ok((Some(dir), rejected)),
            None => Err(CheckpointError::NoCheckpoint {
                dir: checkpoints_dir.to_path_buf(),
                rejected,
            }
            .into()),
        };
    }
    if let Some((_, newest)) = checkpoint::list(checkpoints_dir)?.into_iter().next() {
        return Err(TrainError::RunExists {
            run_dir: run_dir.to_path_buf(),
            newest: newest.display().to_string(),
        });
    }
    Ok((None, rejected))
}

/// Loads a checkpoint into the model and optimizer and rebuilds the loader at its position;
/// returns the config the checkpoint was trained with too.
fn restore(
    cfg: &ResolvedConfig,
    dir: &Path,
    vs: &tch::nn::VarStore,
    opt: &mut AdamW,
    train_source: &Arc<TokenSource>,
    threads: i32,
    shard: &Shard,
) -> Result<(BatchLoader, TrainState, String), TrainError> {
    let ck = checkpoint::load::<TrainState>(dir)?;
    let diffs = model_differences(&ck.state.model, &cfg.config.model);
    if !diffs.is_empty() {
        return Err(TrainError::CheckpointMismatch {
            dir: dir.to_path_buf(),
            reason: format!(
                "the checkpoint's model differs from {}'s: {}",
                cfg.source,
                diffs.join("; ")
            ),
        });
    }
    if ck.state.loader.seq_len != cfg.config.data.seq_len {
        return Err(TrainError::CheckpointMismatch {
            dir: dir.to_path_buf(),
            reason: format!(
                "data.seq_len = {} in {}, but the checkpoint's data position is for seq_len {}",
                cfg.config.data.seq_len, cfg.source, ck.state.loader.seq_len
            ),
        });
    }
    if ck.state.torch_threads != threads && shard.rank == 0 {
        eprintln!(
            "warning: the checkpoint was trained with {} libtorch threads, this session has {threads}: \
             CPU losses will not be bit-identical to an uninterrupted run (set run.cpu_threads)",
            ck.state.torch_threads
        );
    }
    setup::load_weights(vs, &ck.weights, dir)?;
    opt.load_state(ck.optimizer, ck.state.optimizer_updates)
        .map_err(|e| TrainError::CheckpointMismatch {
            dir: dir.to_path_buf(),
            reason: format!("{}: {e}", checkpoint::OPTIMIZER_FILE),
        })?;
    let loader = BatchLoader::with_state(
        Arc::clone(train_source),
        shard.global_rows(),
        &ck.state.loader,
    )?;
    let loader = with_document_starts(cfg, loader)?;
    let mut state = ck.state;
    state.torch_threads = threads;
    Ok((loader, state, ck.config_toml))
}

/// The config of a resumed session: the run's `config.toml` stays (written anew only where it
/// is missing); settings that differ from the checkpoint's are printed, and this session's
/// whole config is written beside it as `config.resume-<step>.toml`.
fn record_resumed_config(
    cfg: &ResolvedConfig,
    checkpoint_dir: &Path,
    checkpoint_config: &str,
    step: u64,
) -> Result<(), TrainError> {
    let run_dir = cfg.run_dir();
    if !run_dir.join("config.toml").exists() {
        cfg.write_resolved(&run_dir)?;
    }
    let origin = checkpoint_dir.join(checkpoint::CONFIG_FILE);
    let changed =
        match glatrain_config::from_str(checkpoint_config, &origin.display().to_string(), &[]) {
            Ok(earlier) => cfg.differences(&earlier)?,
            Err(e) => {
                eprintln!("warning: cannot compare this config with the checkpoint's ({e})");
                Vec::new()
            }
        };
    let from = format!("resuming from {} (step {step})", checkpoint_dir.display());
    if changed.is_empty() {
        eprintln!("{from}");
        return Ok(());
    }
    let written = cfg.write_to(&run_dir.join(format!("config.resume-{step}.toml")))?;
    eprintln!(
        "{from} with {} changed setting(s); this session's config is {} (the run's \
         config.toml is kept):\n  {}",
        changed.len(),
        written.display(),
        changed.join("\n  ")
    );
    Ok(())
}

/// What the loop of a session produced.
struct LoopOutcome {
    losses: Vec<(u64, f64)>,
    last_eval: Option<EvalReport>,
    stopped_early: bool,
    interrupted: Option<StopSignal>,
}

/// What one optimizer step produced.
struct StepResult {
    loss: f64,
    grad_norm: f64,
    skipped: bool,
}

impl Run<'_> {
    /// What the session did, from the loop's outcome and what the run started from.
    fn summary(
        self,
        outcome: LoopOutcome,
        start_step: u64,
        resumed_from: Option<PathBuf>,
        rejected_checkpoints: Vec<String>,
        parameters: i64,
    ) -> TrainSummary {
        TrainSummary {
            run_dir: self.cfg.run_dir(),
            start_step,
            final_step: self.state.step,
            tokens_seen: self.state.tokens_seen,
            losses: outcome.losses,
            eval: outcome.last_eval,
            checkpoint: self.last_checkpoint.map(|(_, p)| p),
            resumed_from,
            rejected_checkpoints,
            stopped_early: outcome.stopped_early,
            interrupted: outcome.interrupted,
            skipped_steps: self.state.skipped_steps,
            parameters,
            elapsed_secs: self.state.elapsed_secs,
            memory: sysinfo::memory(self.device),
        }
    }

    fn train_loop(&mut self, opts: &TrainOptions) -> Result<LoopOutcome, TrainError> {
        let cfg = self.cfg;
        let tc = &cfg.config.train;
        let log_every = self.cfg.config.logging.log_every.max(1);
        let schedule = LrSchedule::from_config(tc);
        let mut losses = Vec::new();
        let mut last_eval = None;
        let mut window_start = Instant::now();
        let mut window_tokens = 0u64;
        let mut stopped_early = false;
        let mut interrupted = None;

        while self.state.step < tc.max_steps {
            let lr = schedule.lr_at(self.state.step);
            if let Some(profile) = &mut self.profile {
                profile.before_step(self.state.step + 1)?;
            }
            let step_start = Instant::now();
            let result = self.optimizer_step(lr)?;
            self.state.step += 1;
            if let Some(summary) = self.profile.as_mut().map(|p| p.after_step(self.state.step)) {
                if let Some(text) = summary? {
                    self.progress.println(&text);
                }
            }
            let step = self.state.step;
            let step_tokens = self.cfg.tokens_per_step as u64;
            self.state.tokens_seen += step_tokens;
            self.state.last_loss = Some(result.loss);
            losses.push((step, result.loss));
            window_tokens += step_tokens;

            let log_now = step % log_every == 0 || step == tc.max_steps;
            // The bar shows this step's rate; log lines and metrics the average since the
            // last log line.
            let rate = if log_now {
                window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9)
            } else {
                step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9)
            };
            self.report_step(&result, lr, rate, log_now)?;
            if log_now {
                window_start = Instant::now();
                window_tokens = 0;
            }
            if self.state.consecutive_skips >= tc.max_consecutive_skips.max(1) {
                return Err(TrainError::TooManySkips {
                    step,
                    count: self.state.consecutive_skips,
                    limit: tc.max_consecutive_skips,
                    loss: result.loss,
                    scale: self.state.loss_scaler.scale(),
                });
            }
            // Rank 0 alone evaluates; the others wait for it at the stop vote below.
            let eval_now = tc.eval_every > 0 && step % tc.eval_every == 0 && step < tc.max_steps;
            if eval_now && self.is_writer() {
                last_eval = self.periodic_evaluation(step)?.or(last_eval);
            }
            let signal = self.agreed_stop()?;
            let stop = signal.is_some() || opts.stop_after.is_some_and(|s| step >= s);
            if stop && step < tc.max_steps {
                if let Some(signal) = signal {
                    self.progress.println(&format!(
                        "{}: writing a checkpoint of step {step}",
                        signal.name()
                    ));
                }
                let dir = self.save_checkpoint()?;
                self.progress.println(&format!(
                    "stopped at step {step}; checkpoint {} (continue with --resume)",
                    dir.display()
                ));
                stopped_early = true;
                interrupted = signal;
                break;
            }
            if tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0 {
                self.save_checkpoint()?;
            }
        }

        if !stopped_early {
            match self.finish()? {
                Some(Ok(report)) => last_eval = Some(report),
                Some(Err(signal)) => interrupted = Some(signal),
                None => {}
            }
        }
        Ok(LoopOutcome {
            losses,
            last_eval,
            stopped_early,
            interrupted,
        })
    }

    /// Shows a finished step on the progress display, says when it was skipped, and (when
    /// `log_now`) logs its metrics with the memory in use.
    fn report_step(
        &mut self,
        result: &StepResult,
        lr: f64,
        rate: f64,
        log_now: bool,
    ) -> Result<(), TrainError> {
        let step = self.state.step;
        let memory = log_now.then(|| sysinfo::memory(self.device)).flatten();
        let view = StepView {
            step,
            loss: result.loss,
            lr,
            grad_norm: result.grad_norm,
            tokens_per_sec: rate,
            mfu: self.mfu(rate),
            memory: memory.map(|m| m.describe()),
        };
        self.progress.step(&view, log_now);
        if result.skipped {
            let scaler = &self.state.loss_scaler;
            let scale_note = if scaler.enabled {
                format!("; loss scale now {}", scaler.scale())
            } else {
                String::new()
            };
            self.progress.println(&format!(
                "step {step}: non-finite gradients (loss {:.4}, grad norm {}), step skipped \
                 ({} in a row{scale_note})",
                result.loss, result.grad_norm, self.state.consecutive_skips,
            ));
        }
        if log_now {
            self.log_step(result, lr, rate, memory)?;
        }
        Ok(())
    }

    /// The evaluation every `train.eval_every` steps, printed; `None` when a stop request cut
    /// it short (the loop's stop check handles that).
    fn periodic_evaluation(&mut self, step: u64) -> Result<Option<EvalReport>, TrainError> {
        match self.evaluate() {
            Ok(report) => {
                self.progress.println(&format!(
                    "step {step}: validation loss {:.4} | perplexity {:.3}",
                    report.loss, report.perplexity
                ));
                Ok(Some(report))
            }
            Err(TrainError::Stopped(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The end of a run that trained to `max_steps`: the final checkpoint first (whatever
    /// happens to the evaluation, the training is kept), then the final evaluation, or the stop
    /// signal that skipped it; `None` on the ranks other than rank 0, which take part in the
    /// checkpoint only.
    fn finish(&mut self) -> Result<Option<Result<EvalReport, StopSignal>>, TrainError> {
        let checkpoint = self.save_checkpoint()?;
        self.progress
            .println(&format!("checkpoint: {}", checkpoint.display()));
        if !self.is_writer() {
            return Ok(None);
        }
        match self.final_evaluation() {
            Ok(report) => Ok(Some(Ok(report))),
            Err(TrainError::Stopped(signal)) => {
                self.progress.println(&format!(
                    "stop requested ({}): final evaluation skipped; the run is complete \
                     (`glatrain eval --checkpoint {}` evaluates it)",
                    signal.name(),
                    checkpoint.display()
                ));
                Ok(Some(Err(signal)))
            }
            Err(e) => Err(TrainError::AfterTraining {
                checkpoint,
                source: Box::new(e),
            }),
        }
    }

    /// The evaluation at the end of the run: logged, printed as a table, drawn as a chart.
    fn final_evaluation(&mut self) -> Result<EvalReport, TrainError> {
        let mut report = self.evaluate()?;
        self.progress.println(&report.to_string());
        self.progress.println(&format!(
            "final validation perplexity: {:.3}",
            report.perplexity
        ));
        draw_report(&mut report, &self.cfg.run_dir().join(PLOT_FILE))?;
        self.progress.println(&format!(
            "chart: {}",
            self.cfg.run_dir().join(PLOT_FILE).display()
        ));
        Ok(report)
    }

    /// The whole AdamW state, named for the checkpoint. Sharded, each rank sends the moments it
    /// owns to the others (all ranks take part; every rank holds the whole state meanwhile).
    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        let (Some(dp), Some(owners)) = (&self.dp, &self.owners) else {
            return Ok(self.opt.state_tensors());
        };
        let mut named = Vec::with_capacity(2 * owners.len());
        let mut by_owner: Vec<Vec<Tensor>> = (0..dp.world_size()).map(|_| Vec::new()).collect();
        for (p, &owner) in self.opt.params().iter().zip(owners) {
            let [m, v] = if p.owned {
                [p.exp_avg.shallow_clone(), p.exp_avg_sq.shallow_clone()]
            } else {
                let zeros = || {
                    Tensor::f_zeros(p.param.size(), (Kind::Float, p.param.device()))
                        .map_err(torch_error("gathering the optimizer state"))
                };
                [zeros()?, zeros()?]
            };
            by_owner[owner].extend([m.shallow_clone(), v.shallow_clone()]);
            named.push((format!("exp_avg.{}", p.name), m));
            named.push((format!("exp_avg_sq.{}", p.name), v));
        }
        for (root, tensors) in by_owner.iter().enumerate() {
            dp.broadcast("gathering the optimizer state", tensors, root)?;
        }
        Ok(named)
    }

    /// Sends each parameter from the rank that updated it to the others (sharded optimizer
    /// state only).
    fn share_updated_parameters(&self) -> Result<(), TrainError> {
        let (Some(dp), Some(owners)) = (&self.dp, &self.owners) else {
            return Ok(());
        };
        let mut by_owner: Vec<Vec<Tensor>> = (0..dp.world_size()).map(|_| Vec::new()).collect();
        for (p, &owner) in self.opt.params().iter().zip(owners) {
            by_owner[owner].push(p.param.shallow_clone());
        }
        tch::no_grad(|| {
            by_owner.iter().enumerate().try_for_each(|(root, tensors)| {
                dp.broadcast("sharing the updated parameters", tensors, root)
            })
        })?;
        Ok(())
    }

    /// Whether this process writes the run directory (rank 0, or a single process).
    fn is_writer(&self) -> bool {
        self.dp.as_ref().is_none_or(DataParallel::is_writer)
    }

    /// The stop signal, if any: this process's, or the first in [`interrupt::SIGNALS`] that any
    /// rank received (every rank then stops after the same step).
    fn agreed_stop(&self) -> Result<Option<StopSignal>, TrainError> {
        let mine = interrupt::requested();
        let Some(dp) = &self.dp else {
            return Ok(mine);
        };
        let votes: Vec<f64> = interrupt::SIGNALS
            .iter()
            .map(|&s| {
                if mine == Some(StopSignal(s)) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        let counts = dp.sum("agreeing on a stop", &votes)?;
        Ok(interrupt::SIGNALS
            .iter()
            .zip(counts)
            .find(|(_, n)| *n > 0.0)
            .map(|(&s, _)| StopSignal(s)))
    }

    /// Forward/backward over this rank's micro-batches, the gradients and the loss averaged over
    /// the ranks, then the update (or a skip).
    fn optimizer_step(&mut self, lr: f64) -> Result<StepResult, TrainError> {
        let accum = self.shard.accum;
        let scale = self.state.loss_scaler.scale();
        let device = self.device;
        self.opt.zero_grad();
        let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device))
            .map_err(torch_error("allocating the loss"))?;
        for micro in 0..accum {
            if micro + 1 == accum {
                // This backward completes the step's gradients: average them as it runs.
                if let Some(dp) = &self.dp {
                    dp.arm();
                }
            }
            let batch = self.shard.own_rows(self.loader.next_batch());
            let (model, precision) = (self.model.as_ref(), &self.precision);
            let compute = precision.autocast_kind().unwrap_or(Kind::Float);
            let pass = catch_torch("the forward and backward pass", || {
                let (inputs, targets) = batch_tensors(&batch, device)?;
                let documents = batch_documents(&batch)?;
                // The mean cross-entropy over B*T tokens, the logits never held whole.
                let loss = precision.run(|| {
                    let hidden = model.hidden_states(&inputs, documents.as_ref()); // [B, T, hidden]
                    let width = hidden.size().last().copied().unwrap_or(1);
                    glatrain_ops::loss::linear_cross_entropy(
                        &hidden.f_view([-1, width])?,
                        model.output_weight(),
                        &targets,
                        compute,
                        glatrain_ops::loss::DEFAULT_CHUNK_ROWS,
                    )
                    .map_err(|e| TchError::Torch(e.to_string()))
                })?;
                loss.f_mul_scalar(scale / accum as f64)?.f_backward()?;
                // In place; the returned handle is the same tensor.
                let _ = loss_sum.f_add_(&loss.f_detach()?.f_to_kind(Kind::Double)?)?;
                Ok(())
            });
            pass.map_err(|e| self.out_of_memory(e))?;
        }
        let mut loss = loss_sum
            .f_double_value(&[])
            .map_err(torch_error("reading the loss"))?
            / accum as f64;
        self.state.loader = self.loader.state();

        let mut grads = self.opt.grads()?;
        if let Some(dp) = &self.dp {
            dp.average_gradients()?;
            loss = dp.sum("averaging the loss", &[loss])?[0] / dp.world_size() as f64;
        }
        if scale != 1.0 {
            scale_grads(&mut grads, 1.0 / scale)?;
        }
        let grad_norm = global_grad_norm(&grads)?;
        let finite = grad_norm.is_finite();
        self.state.loss_scaler.update(finite);
        if finite {
            clip_grads(&mut grads, grad_norm, self.cfg.config.train.grad_clip)?;
            self.opt.step(lr)?;
            self.share_updated_parameters()?;
            self.state.optimizer_updates = self.opt.step_count();
            self.state.consecutive_skips = 0;
        } else {
            self.state.skipped_steps += 1;
            self.state.consecutive_skips += 1;
        }
        Ok(StepResult {
            loss,
            grad_norm,
            skipped: !finite,
        })
    }

    /// An allocation failure of a step as [`TrainError::OutOfMemory`]: what failed, the peak so
    /// far, the change that needs less memory, and the checkpoint that stays; other errors as
    /// they are.
    fn out_of_memory(&self, e: TrainError) -> TrainError {
        match e {
            TrainError::Torch { what, message } if is_out_of_memory(&message) => {
                TrainError::OutOfMemory {
                    what,
                    message,
                    peak: sysinfo::memory(self.device).map(|m| m.describe()),
                    advice: crate::preflight::smaller_step_advice(self.cfg),
                    checkpoint: self.last_checkpoint.as_ref().map(|(_, dir)| dir.clone()),
                }
            }
            other => other,
        }
    }

    fn mfu(&self, tokens_per_sec: f64) -> Option<f64> {
        self.mfu_basis
            .map(|(fpt, peak)| flops::mfu(fpt, tokens_per_sec, peak))
    }

    fn log_step(
        &mut self,
        r: &StepResult,
        lr: f64,
        tokens_per_sec: f64,
        memory: Option<sysinfo::MemoryReading>,
    ) -> Result<(), TrainError> {
        let mut scalars: Vec<(&str, f64)> = vec![
            ("train/loss", r.loss),
            ("train/lr", lr),
            ("train/grad_norm", r.grad_norm),
            ("train/loss_scale", self.state.loss_scaler.scale()),
            ("train/skipped_steps", self.state.skipped_steps as f64),
            ("train/tokens_seen", self.state.tokens_seen as f64),
            ("perf/tokens_per_sec", tokens_per_sec),
        ];
        if let Some(m) = self.mfu(tokens_per_sec) {
            scalars.push(("perf/mfu", m));
        }
        if let Some(memory) = memory {
            scalars.extend(memory.scalars());
        }
        if let Some(logger) = &mut self.logger {
            logger.log(self.state.step, &scalars)?;
        }
        Ok(())
    }

    /// Evaluates on the validation source and logs the result; a stop request ends it between
    /// two batches ([`TrainError::Stopped`]). With several ranks, rank 0 evaluates the
    /// sequences one process with the global micro-batch would (`eval_batches` x ranks batches
    /// of `micro_batch_size`).
    fn evaluate(&mut self) -> Result<EvalReport, TrainError> {
        let cfg = self.cfg;
        let tc = &cfg.config.train;
        let batches = (tc.eval_batches > 0).then_some(tc.eval_batches * self.shard.ranks);
        let mut report = evaluate_model(
            self.model.as_ref(),
            &self.precision,
            self.device,
            eval_batches(cfg, &self.valid, batches)?,
            &interrupt::requested,
        )?;
        report.step = Some(self.state.step);
        let mut scalars = vec![("eval/loss", report.loss), ("eval/ppl", report.perplexity)];
        if let Some(bpb) = report.bits_per_byte {
            scalars.push(("eval/bpb", bpb));
        }
        if let Some(logger) = &mut self.logger {
            logger.log(self.state.step, &scalars)?;
            logger.flush()?;
        }
        Ok(report)
    }

    /// Writes a checkpoint of the current step (unless this session already wrote it) and
    /// prunes old ones. Every rank calls it at the same steps (a sharded optimizer state is
    /// gathered for it); rank 0 writes, the others return the directory rank 0 writes.
    fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let step = self.state.step;
        if let Some((s, dir)) = &self.last_checkpoint {
            if *s == step {
                return Ok(dir.clone());
            }
        }
        let optimizer = self.optimizer_state()?;
        if !self.is_writer() {
            let dir = self.checkpoints_dir.join(checkpoint::step_dir_name(step));
            self.last_checkpoint = Some((step, dir.clone()));
            return Ok(dir);
        }
        self.state.elapsed_secs = self.elapsed_before + self.session_start.elapsed().as_secs_f64();
        let weights = named_variables(&self.vs);
        let dir = checkpoint::save(
            &self.checkpoints_dir,
            &CheckpointContents {
                step,
                weights: &weights,
                optimizer: &optimizer,
                state: &self.state,
                config_toml: &self.config_toml,
            },
        )?;
        let removed = checkpoint::prune(
            &self.checkpoints_dir,
            self.cfg.config.train.keep_checkpoints,
        )?;
        for old in removed {
            self.progress
                .println(&format!("removed old checkpoint {}", old.display()));
        }
        if let Some(logger) = &mut self.logger {
            logger.flush()?;
        }
        self.last_checkpoint = Some((step, dir.clone()));
        Ok(dir)
    }
}

/// One line about a finished session, e.g. for the CLI's last message.
pub fn describe_summary(s: &TrainSummary) -> String {
    let rate = if s.elapsed_secs > 0.0 {
        format_rate(s.tokens_seen as f64 / s.elapsed_secs)
    } else {
        "-".into()
    };
    let memory = s
        .memory
        .map_or_else(String::new, |m| format!(", {}", m.describe()));
    format!(
        "{} steps ({} tokens, {} skipped) in {:.0}s, {rate} on average{memory}",
        s.final_step, s.tokens_seen, s.skipped_steps, s.elapsed_secs
    )
}
