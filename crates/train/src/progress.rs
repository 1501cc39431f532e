//! Progress display: an indicatif bar (step, loss, tokens/s, ETA) when stderr is a terminal,
//! plain log lines otherwise (or when `logging.progress` forces one or the other).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use glatrain_config::ProgressStyle;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle as BarStyle};

/// One step's numbers for the display.
#[derive(Debug, Clone)]
pub struct StepView {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    /// As a fraction; `None` where MFU is not reported.
    pub mfu: Option<f64>,
    /// Memory held, as [`crate::sysinfo::MemoryReading::describe`] says it (log lines only).
    pub memory: Option<String>,
}

/// The bar or the line printer.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Prints nothing (a rank other than the run's writer).
    silent: bool,
    max_steps: u64,
    start_step: u64,
    started: Instant,
}

impl Progress {
    /// `start_step`: the step this session starts from (0, or the resumed step).
    pub fn new(style: ProgressStyle, start_step: u64, max_steps: u64) -> Self {
        let use_bar = match style {
            ProgressStyle::Bar => true,
            ProgressStyle::Lines => false,
            ProgressStyle::Auto => std::io::stderr().is_terminal(),
        };
        let bar = use_bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(max_steps), ProgressDrawTarget::stderr());
            bar.set_style(
                BarStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| BarStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_position(start_step);
            bar.reset_eta();
            bar
        });
        Self {
            bar,
            silent: false,
            max_steps,
            start_step,
            started: Instant::now(),
        }
    }

    /// Progress that prints nothing: the ranks of a data-parallel run other than rank 0.
    pub fn silent(start_step: u64, max_steps: u64) -> Self {
        Self {
            bar: None,
            silent: true,
            max_steps,
            start_step,
            started: Instant::now(),
        }
    }

    /// Whether a bar (rather than log lines) is shown.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Advances the bar every step; `log_line` asks for a line in line mode (every
    /// `logging.log_every` steps).
    pub fn step(&self, view: &StepView, log_line: bool) {
        if self.silent {
            return;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(view.step);
                bar.set_message(format!(
                    "loss {:.4} | {}",
                    view.loss,
                    format_rate(view.tokens_per_sec)
                ));
            }
            None if log_line => eprintln!("{}", self.line(view)),
            None => {}
        }
    }

    /// The plain log line for a step.
    pub fn line(&self, v: &StepView) -> String {
        let mfu = v
            .mfu
            .map_or_else(|| "-".to_string(), |m| format!("{:.1}%", 100.0 * m));
        let memory = v
            .memory
            .as_ref()
            .map_or_else(String::new, |m| format!(" | {m}"));
        format!(
            "step {}/{} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {} | mfu {}{memory} | eta {}",
            v.step,
            self.max_steps,
            v.loss,
            v.lr,
            v.grad_norm,
            format_rate(v.tokens_per_sec),
            mfu,
            format_duration(self.eta(v.step)),
        )
    }

    /// Remaining time from this session's average step rate.
    pub fn eta(&self, step: u64) -> Duration {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return Duration::ZERO;
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        Duration::from_secs_f64(per_step * self.max_steps.saturating_sub(step) as f64)
    }

    /// Prints a message above the bar (or as a line).
    pub fn println(&self, msg: &str) {
        if self.silent {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Leaves the bar's last state on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

/// "12.3K tok/s".
pub fn format_rate(tokens_per_sec: f64) -> String {
    if tokens_per_sec >= 1e6 {
        format!("{:.2}M tok/s", tokens_per_sec / 1e6)
    } else if tokens_per_sec >= 1e3 {
        format!("{:.1}K tok/s", tokens_per_sec / 1e3)
    } else {
        format!("{tokens_per_sec:.0} tok/s")
    }
}

/// "1h02m03s", "4m05s", "6s".
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        for (rate, text) in [
            (950.0, "950 tok/s"),
            (12_345.0, "12.3K tok/s"),
            (2_500_000.0, "2.50M tok/s"),
        ] {
            assert_eq!(format_rate(rate), text);
        }
        for (secs, text) in [(3723, "1h02m03s"), (245, "4m05s"), (6, "6s")] {
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
        }
    }

    #[test]
    fn line_mode_when_forced() {
        let p = Progress::new(ProgressStyle::Lines, 10, 100);
        assert!(!p.is_bar());
        let line = p.line(&StepView {
            step: 20,
            loss: 2.5,
            lr: 3e-4,
            grad_norm: 0.75,
            tokens_per_sec: 1500.0,
            mfu: None,
            memory: Some("mem 1.0 GB peak (2.0 reserved)".into()),
        });
        assert!(
            line.starts_with("step 20/100 | loss 2.5000 | lr 3.000e-4"),
            "{line}"
        );
        assert!(
            line.contains("1.5K tok/s") && line.contains("mfu - | mem 1.0 GB peak"),
            "{line}"
        );
    }
}
