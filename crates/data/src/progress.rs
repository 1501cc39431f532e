//! Progress of a long data job on stderr: an indicatif bar when stderr is a terminal, a plain
//! line every [`LINE_EVERY`] otherwise, nothing when hidden. Warnings print above the bar.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain progress lines are printed.
const LINE_EVERY: Duration = Duration::from_secs(30);

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressDisplay {
    /// A bar on a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Nothing (tests, library use).
    Hidden,
}

/// One job's display: `label`, a position in bytes out of a known total, and a message.
pub(crate) struct Progress {
    label: &'static str,
    total: u64,
    bar: Option<ProgressBar>,
    lines: bool,
    last_line: Instant,
}

impl Progress {
    pub(crate) fn new(display: ProgressDisplay, label: &'static str, total: u64) -> Self {
        let shown = display == ProgressDisplay::Auto;
        let terminal = shown && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30.cyan/blue} {binary_bytes}/{binary_total_bytes} {msg} \
                     [{elapsed_precise} < {eta_precise}]",
                )
                .expect("static template parses")
                .progress_chars("=> "),
            );
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            label,
            total,
            bar,
            lines: shown && !terminal,
            last_line: Instant::now(),
        }
    }

    /// Moves to `position` (bytes) with `message` (rates, counts).
    pub(crate) fn update(&mut self, position: u64, message: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(message());
        } else if self.lines && self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            let percent = 100.0 * position as f64 / self.total.max(1) as f64;
            eprintln!(
                "{}: {:.1}% ({} of {} MB) {}",
                self.label,
                percent,
                position / 1_000_000,
                self.total / 1_000_000,
                message()
            );
        }
    }

    /// Prints a line above the bar (or as is).
    pub(crate) fn warn(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
