//! What joining, launching and communicating can fail with.

/// A failure of the data-parallel machinery.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launch variable that is missing, malformed or inconsistent with the others.
    #[error("environment variable {var}={value:?}: {reason}")]
    BadEnv {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// A launch option that cannot be used.
    #[error("{0}")]
    BadLaunch(String),
    /// The ranks could not meet (the store at MASTER_ADDR:MASTER_PORT, the transport).
    #[error("rank {rank} of {world_size}: no process group at {addr}:{port}: {message}")]
    Rendezvous {
        rank: usize,
        world_size: usize,
        addr: String,
        port: u16,
        message: String,
    },
    /// A collective failed: usually another rank ended, or the group's timeout passed.
    #[error(
        "{what} across the ranks failed: {message} (another rank failed or was stopped, or did not \
         get there within the process group's timeout)"
    )]
    Collective { what: String, message: String },
    /// A libtorch call on this rank's tensors failed.
    #[error("{what} failed: {message}")]
    Torch { what: String, message: String },
    /// Starting or watching the rank processes failed.
    #[error("{what}: {source}")]
    Process {
        what: String,
        source: std::io::Error,
    },
}

impl DistError {
    /// True for errors caused by the launch's settings (the CLI exits 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, DistError::BadEnv { .. } | DistError::BadLaunch(_))
    }
}
