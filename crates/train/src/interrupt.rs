//! Ctrl-C / SIGTERM / SIGHUP: the first signal sets a flag that the training loop checks after
//! each step (it then writes a checkpoint and returns normally); a second signal exits at once
//! with status 130 (an atomic checkpoint being written is simply not published).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

static STOP: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU32 = AtomicU32::new(0);
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the process's handler once (later calls return the first outcome) and clears any
/// earlier request. An error means another handler owns the signals; training still works but
/// cannot be stopped gracefully.
pub fn install() -> Result<(), String> {
    STOP.store(false, Ordering::SeqCst);
    SIGNALS.store(0, Ordering::SeqCst);
    INSTALLED
        .get_or_init(|| {
            ctrlc::set_handler(|| {
                if SIGNALS.fetch_add(1, Ordering::SeqCst) == 0 {
                    STOP.store(true, Ordering::SeqCst);
                    eprintln!(
                        "\nstop requested: finishing this step and writing a checkpoint \
                         (signal again to abort without one)"
                    );
                } else {
                    eprintln!("\naborted");
                    std::process::exit(130);
                }
            })
            .map_err(|e| e.to_string())
        })
        .clone()
}

/// Whether a stop was requested since [`install`].
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
