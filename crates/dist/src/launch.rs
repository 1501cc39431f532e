//! `--nproc-per-node N`: starts N ranks of the same program on this host, as torchrun does,
//! and watches them. Each rank gets `RANK` = `LOCAL_RANK` = 0..N, `WORLD_SIZE` =
//! `LOCAL_WORLD_SIZE` = N, `MASTER_ADDR` = 127.0.0.1 and `MASTER_PORT`: the port of the
//! rendezvous store, which the launcher serves itself as torchrun's agent does (its
//! `MASTER_PORT`, else a free port the bind picks), so `TORCHELASTIC_USE_AGENT_STORE=True` too.
//!
//! - A rank that fails (a non-zero exit, or killed by a signal) is reported by rank; the others
//!   get SIGTERM (a rank then fails at its next collective, or finishes its step and writes a
//!   checkpoint), and SIGKILL after [`GRACE`]. The launcher exits with the failed rank's status
//!   (1 for a rank a signal ended).
//! - SIGINT, SIGTERM and SIGHUP sent to the launcher are passed to every rank once each (the
//!   ranks run in their own process groups, so a terminal's Ctrl-C reaches them only through
//!   the launcher); the launcher then exits with rank 0's status.
//! - A rank whose launcher dies gets SIGTERM (`PR_SET_PDEATHSIG`).

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGTERM};

use glatrain_shim::process_group::StoreServer;

use crate::env::{
    AGENT_STORE, DEFAULT_TIMEOUT, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE,
};
use crate::DistError;

/// How long ranks told to stop may take before they are killed.
pub const GRACE: Duration = Duration::from_secs(20);

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(50);

/// Signals received by the launcher: how many, and the last one.
static SIGNALS_SEEN: AtomicUsize = AtomicUsize::new(0);
static LAST_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static HANDLERS: OnceLock<Result<(), String>> = OnceLock::new();

fn install_handlers() -> Result<(), DistError> {
    HANDLERS
        .get_or_init(|| {
            for signal in [SIGINT, SIGTERM, SIGHUP] {
                // SAFETY: the handler only stores to atomics (async-signal-safe).
                unsafe {
                    signal_hook::low_level::register(signal, move || {
                        LAST_SIGNAL.store(signal as usize, Ordering::SeqCst);
                        SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst);
                    })
                }
                .map_err(|e| format!("signal {signal}: {e}"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(|e| DistError::Process {
            what: "installing the launcher's signal handlers".into(),
            source: std::io::Error::other(e),
        })
}

/// One rank's process and, once it ended, its status.
struct RankProcess {
    child: Child,
    status: Option<ExitStatus>,
}

impl RankProcess {
    fn signal(&self, signal: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused).
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }
}

/// How a rank ended, in words.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by {}", signal_name(signal)),
        (None, None) => "ended".into(),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => return format!("signal {signal}"),
    };
    format!("signal {signal} ({name})")
}

/// Starts `nproc` ranks of `program args` on this host and waits for them (see the module
/// docs). Returns the status the launcher should exit with.
///
/// # Errors
/// [`DistError::BadLaunch`] when this process is itself a rank (`WORLD_SIZE` or `RANK` set) or
/// `nproc` is 0; [`DistError::BadEnv`] for a bad `MASTER_PORT`; [`DistError::Process`] when a
/// rank cannot be started (the ranks already started are stopped).
pub fn run(nproc: usize, program: &Path, args: &[OsString]) -> Result<u8, DistError> {
    if nproc == 0 {
        return Err(DistError::BadLaunch(
            "--nproc-per-node 0: a run needs at least one rank".into(),
        ));
    }
    for var in [WORLD_SIZE, RANK] {
        if let Ok(value) = std::env::var(var) {
            return Err(DistError::BadLaunch(format!(
                "--nproc-per-node starts its own ranks, but {var}={value} is set (is glatrain \
                 started by torchrun or Slurm?): drop --nproc-per-node, or unset {var}"
            )));
        }
    }
    let port = match std::env::var(MASTER_PORT) {
        Ok(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(DistError::BadEnv {
                    var: MASTER_PORT,
                    value: v,
                    reason: "expected a TCP port, 1 to 65535".into(),
                })
            }
        },
        Err(_) => 0,
    };
    // Served here, for as long as the ranks run.
    let store =
        StoreServer::serve(port, DEFAULT_TIMEOUT).map_err(|message| DistError::Rendezvous {
            rank: 0,
            world_size: nproc,
            addr: "127.0.0.1".into(),
            port,
            message: format!("cannot serve the rendezvous store: {message}"),
        })?;
    let port = store.port();
    install_handlers()?;
    let signals_before = SIGNALS_SEEN.load(Ordering::SeqCst);
    eprintln!("launching {nproc} ranks on this host (MASTER_ADDR=127.0.0.1, MASTER_PORT={port})");
    let mut ranks: Vec<RankProcess> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        match spawn_rank(program, args, rank, nproc, port) {
            Ok(child) => ranks.push(RankProcess {
                child,
                status: None,
            }),
            Err(source) => {
                for r in &ranks {
                    r.signal(SIGKILL);
                }
                for r in &mut ranks {
                    let _ = r.child.wait();
                }
                return Err(DistError::Process {
                    what: format!("starting rank {rank} ({})", program.display()),
                    source,
                });
            }
        }
    }
    let status = watch(&mut ranks, signals_before);
    drop(store);
    status
}

fn spawn_rank(
    program: &Path,
    args: &[OsString],
    rank: usize,
    nproc: usize,
    port: u16,
) -> std::io::Result<Child> {
    let launcher = std::process::id();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(RANK, rank.to_string())
        .env(LOCAL_RANK, rank.to_string())
        .env(WORLD_SIZE, nproc.to_string())
        .env(LOCAL_WORLD_SIZE, nproc.to_string())
        .env(MASTER_ADDR, "127.0.0.1")
        .env(MASTER_PORT, port.to_string())
        .env(AGENT_STORE, "True")
        // Signals reach the ranks once, through the launcher.
        .process_group(0);
    // SAFETY: prctl, getppid and raise are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before the line above took effect.
            if libc::getppid() as u32 != launcher {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Waits for every rank, passing signals on and stopping the others when one fails.
fn watch(ranks: &mut [RankProcess], signals_before: usize) -> Result<u8, DistError> {
    let mut forwarded = signals_before;
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        let seen = SIGNALS_SEEN.load(Ordering::SeqCst);
        while forwarded < seen {
            let signal = LAST_SIGNAL.load(Ordering::SeqCst) as i32;
            for r in ranks.iter() {
                r.signal(signal);
            }
            forwarded += 1;
        }
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            r.status = r.child.try_wait().map_err(|source| DistError::Process {
                what: format!("waiting for rank process {}", r.child.id()),
                source,
            })?;
        }
        let stopped_by_user = forwarded > signals_before;
        if failure.is_none() && !stopped_by_user {
            // The lowest rank among those that failed since the last look.
            let failed = ranks
                .iter()
                .enumerate()
                .find_map(|(rank, r)| r.status.filter(|s| !s.success()).map(|s| (rank, s)));
            if let Some((rank, status)) = failed {
                eprintln!(
                    "error: rank {rank} {}; stopping the other ranks",
                    describe_status(status)
                );
                for r in ranks.iter() {
                    r.signal(SIGTERM);
                }
                failure = Some((rank, status));
                kill_at = Some(Instant::now() + GRACE);
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for (rank, r) in ranks.iter().enumerate() {
                if r.status.is_none() {
                    eprintln!("rank {rank} did not stop within {GRACE:?}: killing it");
                    r.signal(SIGKILL);
                }
            }
            kill_at = None;
        }
        std::thread::sleep(POLL);
    }
    let status_code = |s: ExitStatus| match s.code() {
        Some(code) => u8::try_from(code).unwrap_or(1),
        None => 1,
    };
    Ok(match failure {
        Some((_, status)) => status_code(status).max(1),
        None if forwarded > signals_before => ranks[0].status.map_or(1, status_code),
        None => 0,
    })
}
