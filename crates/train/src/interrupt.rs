//! SIGINT, SIGTERM and SIGHUP during training. Each prints a line at once. The first is
//! recorded for the trainer, which checks after every step and between evaluation batches: the
//! run then writes a checkpoint and returns, and the CLI exits with 128 + the signal's number,
//! as shells report a process the signal ended. A second one exits at once with that status,
//! from the signal handler, through `_exit`: no destructors run, because `exit` while another
//! thread is inside libtorch tears libtorch's global state down under it (a segfault); the files
//! are left as a SIGKILL leaves them: an unfinished checkpoint is a temporary directory that the
//! next run of the directory removes.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The signals that stop a run.
pub const SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// The first signal since [`install`]; 0 while none came.
static SIGNAL: AtomicUsize = AtomicUsize::new(0);
/// Whether the handler prints its lines (the ranks of a data-parallel run other than rank 0,
/// which get the same signals, do not).
static ANNOUNCE: AtomicBool = AtomicBool::new(true);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// A signal that asked the run to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(pub i32);

impl StopSignal {
    /// The exit status of a process ended by this signal: 128 + its number.
    pub fn exit_status(self) -> u8 {
        u8::try_from(128 + self.0).unwrap_or(u8::MAX)
    }

    /// "SIGINT", "SIGTERM" or "SIGHUP".
    pub fn name(self) -> String {
        match self.0 {
            SIGINT => "SIGINT".into(),
            SIGTERM => "SIGTERM".into(),
            SIGHUP => "SIGHUP".into(),
            other => format!("signal {other}"),
        }
    }
}

/// Installs the handlers once (later calls return the first outcome) and clears any earlier
/// request; `announce`: whether a signal prints a line. An error means the signals cannot be
/// handled; training still works but an interruption loses the steps since the last checkpoint.
pub fn install(announce: bool) -> Result<(), String> {
    SIGNAL.store(0, Ordering::SeqCst);
    ANNOUNCE.store(announce, Ordering::SeqCst);
    INSTALLED
        .get_or_init(|| {
            for signal in SIGNALS {
                // SAFETY: `on_signal` is async-signal-safe: atomics, write(2) and _exit only.
                unsafe { signal_hook::low_level::register(signal, move || on_signal(signal)) }
                    .map_err(|e| format!("signal {signal}: {e}"))?;
            }
            Ok(())
        })
        .clone()
}

/// The handler, run in signal context: the first signal is recorded, a second one ends the
/// process.
fn on_signal(signal: i32) {
    let first = SIGNAL
        .compare_exchange(0, signal as usize, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    let announce = ANNOUNCE.load(Ordering::SeqCst);
    if first && announce {
        write_stderr(
            b"\nstop requested: finishing this step, then writing a checkpoint (signal again to \
              exit at once, without it)\n",
        );
    } else if !first {
        if announce {
            write_stderr(b"\nsecond signal: exiting now, without a checkpoint of this step\n");
        }
        signal_hook::low_level::exit(128 + signal);
    }
}

/// write(2) to stderr: the one way to print that is safe in a signal handler (Rust's `stderr`
/// takes a lock that the interrupted thread may hold).
fn write_stderr(message: &[u8]) {
    // SAFETY: a valid buffer of `message.len()` bytes; the result (a short or failed write of a
    // message) needs no handling.
    unsafe {
        libc::write(2, message.as_ptr().cast(), message.len());
    }
}

/// The signal that asked to stop since [`install`], if one did.
pub fn requested() -> Option<StopSignal> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => i32::try_from(signal).ok().map(StopSignal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_the_shells() {
        assert_eq!(StopSignal(SIGINT).exit_status(), 130);
        assert_eq!(StopSignal(SIGTERM).exit_status(), 143);
        assert_eq!(StopSignal(SIGHUP).exit_status(), 129);
        assert_eq!(StopSignal(SIGTERM).name(), "SIGTERM");
    }
}
