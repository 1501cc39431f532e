//! The training loop, top to bottom:
//!
//! ```text
//! set up (device, threads, precision, model, optimizer, data, logs; or restore a checkpoint)
//! for step in state.step..max_steps:
//!     lr = schedule(step)
//!     grad_accum_steps x { batch -> forward (autocast) -> loss * loss_scale / accum -> backward }
//!     unscale -> global grad norm -> non-finite? skip (scaler backs off) : clip + AdamW
//!     log / evaluate / checkpoint as configured; stop early on Ctrl-C/SIGTERM or stop_after
//! final evaluation (table, chart) and checkpoint
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use glatrain_config::ResolvedConfig;
use glatrain_data::{BatchLoader, TokenSource};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, CheckpointContents, CheckpointError};
use crate::datasets::SourceOpener;
use crate::error::TrainError;
use crate::eval::{draw_report, evaluate_model, EvalReport, PLOT_FILE};
use crate::flops;
use crate::interrupt;
use crate::metrics::MetricsLogger;
use crate::optim::{clip_grads, global_grad_norm, scale_grads, AdamW, AdamWConfig};
use crate::precision::MixedPrecision;
use crate::progress::{format_rate, Progress, StepView};
use crate::scaler::LossScaler;
use crate::schedule::LrSchedule;
use crate::setup::{self, named_variables};
use crate::state::{model_differences, TrainState, RNG_NOTE};
use crate::sysinfo;

/// How to run `train`, besides the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest complete checkpoint of the run directory.
    pub resume: bool,
    /// Stop after this optimizer step (if reached before `max_steps`) exactly as an
    /// interruption would: checkpoint, then return. For splitting a run into sessions.
    pub stop_after: Option<u64>,
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
    /// Steps skipped for non-finite gradients, over the whole run.
    pub skipped_steps: u64,
    pub parameters: i64,
    /// Wall-clock seconds over all sessions of the run.
    pub elapsed_secs: f64,
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
    loader: BatchLoader,
    valid: Arc<TokenSource>,
    state: TrainState,
    logger: MetricsLogger,
    progress: Progress,
    checkpoints_dir: PathBuf,
    config_toml: String,
    last_checkpoint: Option<(u64, PathBuf)>,
    session_start: Instant,
    elapsed_before: f64,
    /// FLOPs per token and the GPU's peak for the precision, when MFU can be reported.
    mfu_basis: Option<(u64, f64)>,
}

/// Trains the model of `cfg` (see the module docs). Progress goes to stderr; metrics to
/// `<run>/metrics.jsonl` and `<run>/tensorboard/`; checkpoints to `<run>/checkpoints/`.
/// Returns an error instead of exiting; Ctrl-C/SIGTERM end the session cleanly after a
/// checkpoint (`stopped_early`).
pub fn train(cfg: ResolvedConfig, opts: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let cfg = &cfg;
    let tc = &cfg.config.train;
    let device = setup::resolve_device(&cfg.config.run.device, &cfg.source)?;
    let threads = setup::apply_threads(cfg);
    let precision = MixedPrecision::new(tc.precision, device, &cfg.source)?;

    let run_dir = cfg.run_dir();
    let checkpoints_dir = run_dir.join("checkpoints");
    let (resume_dir, rejected) = find_resume_point(&checkpoints_dir, &run_dir, opts.resume)?;
    let config_toml = cfg.to_toml_string()?;

    // Before anything is built or written: refuse what cannot run, and pick the kernel mode.
    let preflight = crate::preflight::report(cfg, device, false)?;
    eprint!("{}", preflight.render_table());
    preflight.check()?;
    let mode = crate::preflight::chosen_mode(&preflight);
    let kernel_kind = precision.autocast_kind().unwrap_or(Kind::Float);
    setup::prepare_kernels(cfg, device, mode, kernel_kind);

    let setup::BuiltModel { vs, model } = setup::build_model(cfg, device, mode)?;
    let parameters = glatrain_models::count_parameters(&vs);
    let params: Vec<(String, Tensor, bool)> = named_variables(&vs)
        .into_iter()
        .map(|(name, t)| {
            let decay = !glatrain_models::no_weight_decay(&name);
            (name, t, decay)
        })
        .collect();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        },
    );

    let mut sources = SourceOpener::new(cfg);
    let train_source = sources.train(&cfg.config.data.train)?;
    let valid = sources.valid(&cfg.config.data.valid)?;
    let seq_len = cfg.config.data.seq_len;

    let fresh_state = |loader: &BatchLoader| TrainState {
        step: 0,
        tokens_seen: 0,
        optimizer_updates: 0,
        loss_scaler: LossScaler::new(&tc.loss_scale, precision.uses_loss_scaling()),
        loader: loader.state(),
        consecutive_skips: 0,
        skipped_steps: 0,
        seed: cfg.config.run.seed,
        rng: RNG_NOTE.to_string(),
        torch_threads: threads,
        elapsed_secs: 0.0,
        last_loss: None,
        model: cfg.config.model.clone(),
        parameters,
        precision: tc.precision,
        glatrain_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    crate::init_from::apply(cfg, &vs, resume_dir.is_some())?;
    let (loader, state) = match &resume_dir {
        None => {
            let loader = BatchLoader::new(
                Arc::clone(&train_source),
                tc.micro_batch_size,
                seq_len,
                cfg.config.run.seed,
            )?;
            let state = fresh_state(&loader);
            (loader, state)
        }
        Some(dir) => restore(cfg, dir, &vs, &mut opt, &train_source, threads)?,
    };
    for r in &rejected {
        eprintln!("warning: skipping checkpoint {r}");
    }
    // Only now that a resume is known to fit: the run directory gets this config.
    std::fs::create_dir_all(&run_dir).map_err(io_err(&run_dir))?;
    cfg.write_resolved(&run_dir)?;
    preflight.write_json(&run_dir)?;
    if let Some(dir) = &resume_dir {
        eprintln!("resuming from {} (step {})", dir.display(), state.step);
    }

    let logger = MetricsLogger::open(
        &run_dir,
        &cfg.config.logging,
        resume_dir.as_ref().map(|_| state.step),
    )?;
    let mfu_basis = sysinfo::gpu_name(device).and_then(|name| {
        flops::peak_flops(&name, tc.precision)
            .map(|peak| (flops::flops_per_token(&cfg.config.model, seq_len), peak))
    });
    if let Err(e) = interrupt::install() {
        eprintln!("warning: cannot handle Ctrl-C/SIGTERM ({e}); an interrupted run loses the steps since its last checkpoint");
    }
    eprintln!(
        "training {} ({} parameters) on {device:?}, {} | {} sequences x {seq_len} tokens per step \
         ({} micro-batches of {}) | {} steps | run dir {}",
        cfg.config.model.type_name(),
        parameters,
        crate::precision::precision_name(tc.precision),
        cfg.batch_size,
        cfg.grad_accum_steps,
        tc.micro_batch_size,
        tc.max_steps,
        run_dir.display()
    );

    let elapsed_before = state.elapsed_secs;
    let progress = Progress::new(cfg.config.logging.progress, state.step, tc.max_steps);
    let mut run = Run {
        cfg,
        device,
        precision,
        model,
        vs,
        opt,
        loader,
        valid,
        state,
        logger,
        progress,
        checkpoints_dir,
        config_toml,
        last_checkpoint: None,
        session_start: Instant::now(),
        elapsed_before,
        mfu_basis,
    };
    let start_step = run.state.step;
    let outcome = run.train_loop(opts);
    run.progress.finish();
    run.logger.flush()?;
    let LoopOutcome {
        losses,
        last_eval: eval,
        stopped_early,
    } = outcome?;
    Ok(TrainSummary {
        run_dir,
        start_step,
        final_step: run.state.step,
        tokens_seen: run.state.tokens_seen,
        losses,
        eval,
        checkpoint: run.last_checkpoint.map(|(_, p)| p),
        resumed_from: resume_dir,
        rejected_checkpoints: rejected,
        stopped_early,
        skipped_steps: run.state.skipped_steps,
        parameters,
        elapsed_secs: run.state.elapsed_secs,
    })
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

/// Loads a checkpoint into the model and optimizer and rebuilds the loader at its position.
fn restore(
    cfg: &ResolvedConfig,
    dir: &Path,
    vs: &tch::nn::VarStore,
    opt: &mut AdamW,
    train_source: &Arc<TokenSource>,
    threads: i32,
) -> Result<(BatchLoader, TrainState), TrainError> {
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
    if ck.state.torch_threads != threads {
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
        cfg.config.train.micro_batch_size,
        &ck.state.loader,
    )?;
    let mut state = ck.state;
    state.torch_threads = threads;
    Ok((loader, state))
}

/// What the loop of a session produced.
struct LoopOutcome {
    losses: Vec<(u64, f64)>,
    last_eval: Option<EvalReport>,
    stopped_early: bool,
}

/// What one optimizer step produced.
struct StepResult {
    loss: f64,
    grad_norm: f64,
    skipped: bool,
}

impl Run<'_> {
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

        while self.state.step < tc.max_steps {
            let lr = schedule.lr_at(self.state.step);
            let step_start = Instant::now();
            let result = self.optimizer_step(lr)?;
            self.state.step += 1;
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
            let view = StepView {
                step,
                loss: result.loss,
                lr,
                grad_norm: result.grad_norm,
                tokens_per_sec: rate,
                mfu: self.mfu(rate),
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
                self.log_step(&result, lr, rate)?;
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
            if tc.eval_every > 0 && step % tc.eval_every == 0 && step < tc.max_steps {
                let report = self.evaluate()?;
                self.progress.println(&format!(
                    "step {step}: validation loss {:.4} | perplexity {:.3}",
                    report.loss, report.perplexity
                ));
                last_eval = Some(report);
            }
            let stop = interrupt::requested() || opts.stop_after.is_some_and(|s| step >= s);
            if stop && step < tc.max_steps {
                let dir = self.save_checkpoint()?;
                self.progress.println(&format!(
                    "stopped at step {step}; checkpoint {} (continue with --resume)",
                    dir.display()
                ));
                stopped_early = true;
                break;
            }
            if tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0 {
                self.save_checkpoint()?;
            }
        }

        if !stopped_early {
            let mut report = self.evaluate()?;
            let plot = self.cfg.run_dir().join(PLOT_FILE);
            draw_report(&mut report, &plot)?;
            self.progress.println(&report.to_string());
            self.progress.println(&format!(
                "final validation perplexity: {:.3}",
                report.perplexity
            ));
            last_eval = Some(report);
            let dir = self.save_checkpoint()?;
            self.progress
                .println(&format!("checkpoint: {}", dir.display()));
        }
        Ok(LoopOutcome {
            losses,
            last_eval,
            stopped_early,
        })
    }

    /// Forward/backward over the micro-batches, then the update (or a skip).
    fn optimizer_step(&mut self, lr: f64) -> Result<StepResult, TrainError> {
        let accum = self.cfg.grad_accum_steps;
        let seq_len = self.cfg.config.data.seq_len as i64;
        let vocab = self.cfg.config.model.vocab_size() as i64;
        let scale = self.state.loss_scaler.scale();
        self.opt.zero_grad();
        let mut loss_sum = Tensor::zeros([], (Kind::Double, self.device));
        for _ in 0..accum {
            let batch = self.loader.next_batch();
            let rows = batch.rows as i64;
            let inputs = Tensor::from_slice(&batch.inputs)
                .view([rows, seq_len])
                .to_device(self.device);
            let targets = Tensor::from_slice(&batch.targets)
                .view([rows, seq_len])
                .to_device(self.device);
            let logits = self.precision.run(|| self.model.forward(&inputs)); // [B, T, V]
            let loss = logits
                .to_kind(Kind::Float)
                .view([-1, vocab])
                .cross_entropy_for_logits(&targets.view([-1])); // mean over B*T
            (&loss * (scale / accum as f64)).backward();
            loss_sum += loss.detach().to_kind(Kind::Double);
        }
        let loss = loss_sum.double_value(&[]) / accum as f64;
        self.state.loader = self.loader.state();

        let mut grads = self.opt.grads();
        if scale != 1.0 {
            scale_grads(&mut grads, 1.0 / scale);
        }
        let grad_norm = global_grad_norm(&grads);
        let finite = grad_norm.is_finite();
        self.state.loss_scaler.update(finite);
        if finite {
            clip_grads(&mut grads, grad_norm, self.cfg.config.train.grad_clip);
            self.opt.step(lr);
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

    fn mfu(&self, tokens_per_sec: f64) -> Option<f64> {
        self.mfu_basis
            .map(|(fpt, peak)| flops::mfu(fpt, tokens_per_sec, peak))
    }

    fn log_step(&mut self, r: &StepResult, lr: f64, tokens_per_sec: f64) -> Result<(), TrainError> {
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
        if let Some(mem) = sysinfo::memory(self.device) {
            scalars.push((mem.tag, mem.bytes as f64));
        }
        self.logger.log(self.state.step, &scalars)?;
        Ok(())
    }

    /// Evaluates on the validation source and logs the result.
    fn evaluate(&mut self) -> Result<EvalReport, TrainError> {
        let cfg = self.cfg;
        let tc = &cfg.config.train;
        let mut report = evaluate_model(
            self.model.as_ref(),
            &self.precision,
            self.device,
            &self.valid,
            tc.micro_batch_size,
            self.cfg.config.data.seq_len,
            (tc.eval_batches > 0).then_some(tc.eval_batches),
        )?;
        report.step = Some(self.state.step);
        let mut scalars = vec![("eval/loss", report.loss), ("eval/ppl", report.perplexity)];
        if let Some(bpb) = report.bits_per_byte {
            scalars.push(("eval/bpb", bpb));
        }
        self.logger.log(self.state.step, &scalars)?;
        self.logger.flush()?;
        Ok(report)
    }

    /// Writes a checkpoint of the current step (unless this session already wrote it) and
    /// prunes old ones.
    fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let step = self.state.step;
        if let Some((s, dir)) = &self.last_checkpoint {
            if *s == step {
                return Ok(dir.clone());
            }
        }
        self.state.elapsed_secs = self.elapsed_before + self.session_start.elapsed().as_secs_f64();
        let weights = named_variables(&self.vs);
        let optimizer = self.opt.state_tensors();
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
        self.logger.flush()?;
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
    format!(
        "{} steps ({} tokens, {} skipped) in {:.0}s, {rate} on average",
        s.final_step, s.tokens_seen, s.skipped_steps, s.elapsed_secs
    )
}
