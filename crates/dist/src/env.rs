//! Where this process stands in a data-parallel run, from the variables torchrun (and Slurm
//! wrappers, and `glatrain --nproc-per-node`) set: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`; plus `GLATRAIN_DIST_TIMEOUT` (seconds a rank waits for the
//! others, 1800 by default), `GLOO_SOCKET_IFNAME` (the network interface Gloo uses) and
//! torchrun's `TORCHELASTIC_USE_AGENT_STORE` (its agent already serves the store at
//! `MASTER_ADDR:MASTER_PORT`, so rank 0 connects to it like the others).

use std::time::Duration;

use glatrain_shim::process_group::{GlooBinding, Rendezvous};

use crate::DistError;

/// How long the rendezvous and each collective wait for the other ranks unless
/// `GLATRAIN_DIST_TIMEOUT` says otherwise (torch.distributed's default for Gloo).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// The variables a rank is started with.
pub const RANK: &str = "RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
pub const MASTER_ADDR: &str = "MASTER_ADDR";
pub const MASTER_PORT: &str = "MASTER_PORT";
pub const TIMEOUT: &str = "GLATRAIN_DIST_TIMEOUT";
pub const GLOO_SOCKET_IFNAME: &str = "GLOO_SOCKET_IFNAME";
pub const AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// One rank's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    /// This process's rank, `0..world_size`; rank 0 is the run's one writer.
    pub rank: usize,
    /// Its rank on this host: the CUDA device it trains on.
    pub local_rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub timeout: Duration,
    /// `GLOO_SOCKET_IFNAME`, when set.
    pub interface: Option<String>,
    /// Whether torchrun's agent serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub agent_store: bool,
}

impl WorldEnv {
    /// The run this process is a rank of, from the environment; `None` when `WORLD_SIZE` and
    /// `RANK` are both unset (a single process).
    ///
    /// # Errors
    /// [`DistError::BadEnv`] naming the variable: not a number, a rank outside the world, a
    /// missing `MASTER_ADDR` / `MASTER_PORT`, one of `RANK` / `WORLD_SIZE` without the other.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any lookup (tests).
    ///
    /// # Errors
    /// As [`Self::from_env`].
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let (rank, world_size) = match (var(RANK), var(WORLD_SIZE)) {
            (None, None) => return Ok(None),
            (Some(rank), Some(world)) => (rank, world),
            (None, Some(world)) => {
                return Err(bad(WORLD_SIZE, &world, "RANK is not set (both or neither)"))
            }
            (Some(rank), None) => {
                return Err(bad(RANK, &rank, "WORLD_SIZE is not set (both or neither)"))
            }
        };
        let world_size = number(WORLD_SIZE, &world_size)?;
        if world_size == 0 {
            return Err(bad(WORLD_SIZE, "0", "a run has at least one rank"));
        }
        let rank_value = number(RANK, &rank)?;
        if rank_value >= world_size {
            return Err(bad(
                RANK,
                &rank,
                &format!("ranks run from 0 to WORLD_SIZE - 1 = {}", world_size - 1),
            ));
        }
        let local_rank = match var(LOCAL_RANK) {
            Some(v) => number(LOCAL_RANK, &v)?,
            None => rank_value,
        };
        if local_rank > rank_value {
            return Err(bad(
                LOCAL_RANK,
                &local_rank.to_string(),
                &format!("a local rank cannot exceed the global rank RANK={rank_value}"),
            ));
        }
        let required = |name: &'static str| {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                bad(
                    name,
                    "",
                    &format!("must be set when WORLD_SIZE={world_size} (rank 0's host and port)"),
                )
            })
        };
        let (master_addr, master_port) = if world_size == 1 {
            // Nothing to meet: the single rank trains as a plain process.
            (
                var(MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into()),
                var(MASTER_PORT).map(|p| port(&p)).transpose()?.unwrap_or(0),
            )
        } else {
            (required(MASTER_ADDR)?, port(&required(MASTER_PORT)?)?)
        };
        let timeout = match var(TIMEOUT) {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.parse::<f64>() {
                Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::from_secs_f64(secs),
                _ => return Err(bad(TIMEOUT, &v, "expected a positive number of seconds")),
            },
        };
        Ok(Some(WorldEnv {
            rank: rank_value,
            local_rank,
            world_size,
            master_addr,
            master_port,
            timeout,
            interface: var(GLOO_SOCKET_IFNAME).filter(|v| !v.is_empty()),
            // torch.distributed's test: exactly "True".
            agent_store: var(AGENT_STORE).as_deref() == Some("True"),
        }))
    }

    /// Rank `rank` of `world_size` ranks on this host that meet through a store served apart
    /// from them at `127.0.0.1:port`, as a single-host launcher serves it.
    pub fn on_this_host(rank: usize, world_size: usize, port: u16, timeout: Duration) -> Self {
        WorldEnv {
            rank,
            local_rank: rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout,
            interface: None,
            agent_store: true,
        }
    }

    /// Whether this rank writes the run directory (logs, checkpoints, evaluations).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// Where to meet the other ranks.
    pub fn rendezvous(&self) -> Rendezvous {
        let binding = match &self.interface {
            Some(name) => GlooBinding::Interface(name.clone()),
            None if is_loopback(&self.master_addr) => GlooBinding::Host(self.master_addr.clone()),
            None => GlooBinding::Default,
        };
        Rendezvous {
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            serve_store: self.rank == 0 && !self.agent_store,
            rank: self.rank,
            world_size: self.world_size,
            timeout: self.timeout,
            binding,
        }
    }
}

/// Ranks that meet on this machine's loopback bind their transport there too (the hostname
/// may resolve to an address that is not up).
fn is_loopback(addr: &str) -> bool {
    addr == "localhost"
        || addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn bad(var: &'static str, value: &str, reason: &str) -> DistError {
    DistError::BadEnv {
        var,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn number(var: &'static str, value: &str) -> Result<usize, DistError> {
    value
        .trim()
        .parse()
        .map_err(|_| bad(var, value, "expected a whole number"))
}

fn port(value: &str) -> Result<u16, DistError> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad(MASTER_PORT, value, "expected a TCP port, 1 to 65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Option<WorldEnv>, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldEnv::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_variables_give_the_rank() {
        assert_eq!(parse(&[]).unwrap(), None);
        let env = parse(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("GLATRAIN_DIST_TIMEOUT", "90"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (env.rank, env.local_rank, env.world_size, env.master_port),
            (5, 1, 16, 29500)
        );
        assert_eq!(env.timeout, Duration::from_secs(90));
        assert!(!env.is_writer());
        assert!(!env.rendezvous().serve_store);
        assert_eq!(env.rendezvous().binding, GlooBinding::Default);
        let local = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(local.local_rank, 0);
        assert!(local.rendezvous().serve_store);
        assert_eq!(local.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            local.rendezvous().binding,
            GlooBinding::Host("127.0.0.1".into())
        );
        let under_torchrun = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert!(!under_torchrun.rendezvous().serve_store);
        // One rank needs no store.
        let single = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .unwrap();
        assert_eq!(single.world_size, 1);
    }

    #[test]
    fn inconsistent_variables_name_the_variable() {
        let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        /// Variables beside MASTER_ADDR / MASTER_PORT, the variable named, the reason given.
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("WORLD_SIZE", "2")],
                "WORLD_SIZE=\"2\"",
                "RANK is not set",
            ),
            (&[("RANK", "0")], "RANK=\"0\"", "WORLD_SIZE is not set"),
            (
                &[("RANK", "2"), ("WORLD_SIZE", "2")],
                "RANK=\"2\"",
                "0 to WORLD_SIZE - 1 = 1",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "0")],
                "WORLD_SIZE=\"0\"",
                "at least one",
            ),
            (
                &[("RANK", "x"), ("WORLD_SIZE", "2")],
                "RANK=\"x\"",
                "whole number",
            ),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")],
                "LOCAL_RANK=\"3\"",
                "cannot exceed",
            ),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("GLATRAIN_DIST_TIMEOUT", "-1"),
                ],
                "GLATRAIN_DIST_TIMEOUT=\"-1\"",
                "positive",
            ),
        ];
        for (vars, var, reason) in cases {
            let mut all = base.to_vec();
            all.extend_from_slice(vars);
            let err = parse(&all).unwrap_err();
            let msg = err.to_string();
            assert!(err.is_bad_input());
            assert!(msg.contains(var) && msg.contains(reason), "{msg}");
        }
        let msg = parse(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("MASTER_ADDR") && msg.contains("must be set"),
            "{msg}"
        );
        let msg = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ])
        .unwrap_err()
        .to_string();
        assert!(msg.contains("MASTER_PORT=\"70000\""), "{msg}");
    }
}
