//! c10d process groups (`csrc/process_group.cpp`): rendezvous through libtorch's `TCPStore`,
//! collectives through its `ProcessGroupGloo` (CPU tensors) or `ProcessGroupNCCL` (CUDA tensors,
//! one device per rank). Every Gloo failure, a peer that died or a collective past the group's
//! timeout included, comes back as a message; an NCCL collective past the timeout is ended by
//! libtorch's NCCL watchdog, which stops the process.

use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;

use tch::Tensor;

use crate::checked::checked;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

/// A [`Rendezvous`] as the shim's constructors take it (`GlatrainRendezvous`); `master_host`
/// borrows the [`CRendezvous`] it is made from.
#[repr(C)]
struct RawRendezvous {
    master_host: *const c_char,
    port: c_int,
    serve_store: c_int,
    rank: c_int,
    world: c_int,
    timeout_ms: i64,
}

extern "C" {
    fn glatrain_pg_gloo_new(
        rendezvous: *const RawRendezvous,
        iface: *const c_char,
        hostname: *const c_char,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn glatrain_pg_nccl_new(
        rendezvous: *const RawRendezvous,
        cuda_index: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn glatrain_pg_free(pg: *mut RawGroup);
    fn glatrain_pg_all_reduce_sum(
        pg: *mut RawGroup,
        tensors: *const *const c_void,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_pg_broadcast(
        pg: *mut RawGroup,
        tensors: *const *const c_void,
        n: usize,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_pg_barrier(pg: *mut RawGroup, err: *mut c_char, err_len: usize) -> c_int;
    fn glatrain_store_serve(
        port: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawStore;
    fn glatrain_store_port(store: *mut RawStore) -> c_int;
    fn glatrain_store_free(store: *mut RawStore);
    fn glatrain_reducer_new(
        pg: *mut RawGroup,
        params: *const *const c_void,
        n: usize,
        bucket_bytes: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawReducer;
    fn glatrain_reducer_arm(reducer: *mut RawReducer);
    fn glatrain_reducer_finish(
        reducer: *mut RawReducer,
        divisor: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn glatrain_reducer_started(reducer: *mut RawReducer) -> usize;
    fn glatrain_reducer_free(reducer: *mut RawReducer);
}

#[repr(C)]
struct RawReducer {
    _private: [u8; 0],
}

/// Sums the gradients of a list of parameters over the group while the backward runs, as
/// PyTorch DDP's reducer does: hooks on the parameters start each bucket's all-reduce as soon as
/// the backward has produced all of its gradients (buckets in order, the last parameters first),
/// so communication overlaps the rest of the backward.
#[derive(Debug)]
pub struct GradReducer {
    raw: *mut RawReducer,
}

// SAFETY: as for ProcessGroup; the shim serialises the reducer's state with a mutex.
unsafe impl Send for GradReducer {}

impl GradReducer {
    /// Hooks `params` (trainable leaves, the same list in the same order on every rank) into
    /// buckets of about `bucket_bytes`.
    ///
    /// # Errors
    /// A parameter that is not a trainable leaf; libtorch's message.
    pub fn new(
        group: &ProcessGroup,
        params: &[Tensor],
        bucket_bytes: usize,
    ) -> Result<Self, String> {
        let ptrs = tensor_pointers(params);
        let mut raw = std::ptr::null_mut();
        // SAFETY: the tensors are live for the call (the shim keeps its own references); the
        // message buffer is the checked helper's.
        checked(|err, len| {
            raw = unsafe {
                glatrain_reducer_new(group.raw, ptrs.as_ptr(), ptrs.len(), bucket_bytes, err, len)
            };
            c_int::from(raw.is_null())
        })?;
        Ok(GradReducer { raw })
    }

    /// Counts the gradients of the next backward: the one that completes the step's gradients.
    pub fn arm(&self) {
        // SAFETY: `raw` is live until drop.
        unsafe { glatrain_reducer_arm(self.raw) }
    }

    /// Buckets whose all-reduce has started since [`Self::arm`]: after the armed backward and
    /// before [`Self::finish`], those the backward started.
    pub fn started(&self) -> usize {
        // SAFETY: `raw` is live until drop.
        unsafe { glatrain_reducer_started(self.raw) }
    }

    /// After the armed backward: waits for every bucket and replaces each gradient by its sum
    /// over the ranks divided by `divisor`.
    ///
    /// # Errors
    /// libtorch's message (a peer gone, the timeout passed).
    pub fn finish(&self, divisor: f64) -> Result<(), String> {
        // SAFETY: `raw` is live until drop; the message buffer is the checked helper's.
        checked(|err, len| unsafe { glatrain_reducer_finish(self.raw, divisor, err, len) })
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from glatrain_reducer_new and is freed once.
        unsafe { glatrain_reducer_free(self.raw) }
    }
}

#[repr(C)]
struct RawStore {
    _private: [u8; 0],
}

/// A c10d `TCPStore` served by this process for ranks that all connect to it (their
/// [`Rendezvous::serve_store`] false), as torchrun's agent serves one; it stops when dropped.
#[derive(Debug)]
pub struct StoreServer {
    raw: *mut RawStore,
}

impl StoreServer {
    /// Serves a store on `port` (0: a free port, picked by the bind itself, so no other process
    /// can take it in between).
    ///
    /// # Errors
    /// libtorch's message (the port is taken).
    pub fn serve(port: u16, timeout: Duration) -> Result<Self, String> {
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let mut raw = std::ptr::null_mut();
        // SAFETY: the message buffer is the checked helper's.
        checked(|err, len| {
            raw = unsafe { glatrain_store_serve(c_int::from(port), timeout_ms, err, len) };
            c_int::from(raw.is_null())
        })?;
        Ok(StoreServer { raw })
    }

    /// The port the store listens on.
    pub fn port(&self) -> u16 {
        // SAFETY: `raw` is live until drop.
        u16::try_from(unsafe { glatrain_store_port(self.raw) }).unwrap_or(0)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        // SAFETY: `raw` came from glatrain_store_serve and is freed once.
        unsafe { glatrain_store_free(self.raw) }
    }
}

/// Where a rank meets the others, and how long anything may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Host of rank 0, which serves the store (`MASTER_ADDR`).
    pub master_addr: String,
    /// The store's TCP port on that host (`MASTER_PORT`).
    pub master_port: u16,
    /// Whether this process serves the store (rank 0, unless a launcher's agent serves it).
    pub serve_store: bool,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// How long the rendezvous and each collective may wait for the other ranks.
    pub timeout: Duration,
    /// Where Gloo's transport binds (see [`GlooBinding`]; NCCL finds its own).
    pub binding: GlooBinding,
}

/// The address Gloo's transport listens on for the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooBinding {
    /// A network interface by name (`GLOO_SOCKET_IFNAME`).
    Interface(String),
    /// The address of a host name (`127.0.0.1` when every rank is on this machine).
    Host(String),
    /// The address this machine's hostname resolves to (loopback if it does not resolve), as
    /// torch.distributed does by default.
    Default,
}

/// This process's membership in a group of ranks that run collectives together. Every rank must
/// call the same collectives in the same order with tensors of the same shapes.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: *mut RawGroup,
    rank: usize,
    world_size: usize,
}

// SAFETY: the c10d backend may be driven from any thread (libtorch runs its collectives on its
// own threads); the handle is only freed in `drop`.
unsafe impl Send for ProcessGroup {}

fn c_string(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

fn tensor_pointers(tensors: &[Tensor]) -> Vec<*const c_void> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *const c_void)
        .collect()
}

fn as_c_int(what: &str, x: usize) -> Result<c_int, String> {
    c_int::try_from(x).map_err(|_| format!("{what} {x} is too large"))
}

/// A [`Rendezvous`] as the shim takes it, with the host's string it points to.
struct CRendezvous {
    /// What `raw.master_host` points to (its heap buffer stays put when the struct moves).
    _host: CString,
    raw: RawRendezvous,
}

impl CRendezvous {
    /// The shim's view, valid while `self` lives.
    fn raw(&self) -> *const RawRendezvous {
        &self.raw
    }
}

impl Rendezvous {
    fn to_c(&self) -> Result<CRendezvous, String> {
        let host = c_string("MASTER_ADDR", &self.master_addr)?;
        let raw = RawRendezvous {
            master_host: host.as_ptr(),
            port: c_int::from(self.master_port),
            serve_store: c_int::from(self.serve_store),
            rank: as_c_int("rank", self.rank)?,
            world: as_c_int("world size", self.world_size)?,
            timeout_ms: i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX),
        };
        Ok(CRendezvous { _host: host, raw })
    }
}

impl ProcessGroup {
    /// Meets the other ranks (rank 0 serves the store) and builds a Gloo group with them.
    ///
    /// # Errors
    /// libtorch's message: the store cannot be served or reached within the timeout, the ranks
    /// disagree, the transport cannot bind.
    pub fn gloo(rendezvous: &Rendezvous) -> Result<Self, String> {
        let c = rendezvous.to_c()?;
        let (iface, hostname) = match &rendezvous.binding {
            GlooBinding::Interface(name) => {
                (c_string("GLOO_SOCKET_IFNAME", name)?, CString::default())
            }
            GlooBinding::Host(name) => (CString::default(), c_string("host", name)?),
            GlooBinding::Default => (CString::default(), CString::default()),
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; the message buffer is the checked helper's.
        checked(|err, len| {
            raw = unsafe {
                glatrain_pg_gloo_new(c.raw(), iface.as_ptr(), hostname.as_ptr(), err, len)
            };
            c_int::from(raw.is_null())
        })?;
        Ok(Self::from_raw(raw, rendezvous))
    }

    /// Meets the other ranks (rank 0 serves the store) and builds an NCCL group with them on
    /// CUDA device `cuda_index` (a different device for each rank of a host).
    ///
    /// # Errors
    /// libtorch's message: no such device, the store cannot be served or reached within the
    /// timeout, NCCL cannot make its communicator.
    pub fn nccl(rendezvous: &Rendezvous, cuda_index: usize) -> Result<Self, String> {
        let c = rendezvous.to_c()?;
        let cuda_index = as_c_int("CUDA device", cuda_index)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the string outlives the call; the message buffer is the checked helper's.
        checked(|err, len| {
            raw = unsafe { glatrain_pg_nccl_new(c.raw(), cuda_index, err, len) };
            c_int::from(raw.is_null())
        })?;
        Ok(Self::from_raw(raw, rendezvous))
    }

    fn from_raw(raw: *mut RawGroup, rendezvous: &Rendezvous) -> Self {
        ProcessGroup {
            raw,
            rank: rendezvous.rank,
            world_size: rendezvous.world_size,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Replaces each tensor (contiguous, on the group's device: CPU for Gloo, the group's CUDA
    /// device for NCCL) by its sum over the ranks.
    ///
    /// # Errors
    /// libtorch's message (a peer gone, the timeout passed, a tensor Gloo cannot reduce).
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<(), String> {
        let ptrs = tensor_pointers(tensors);
        // SAFETY: the tensors are live for the call; the message buffer is the checked helper's.
        checked(|err, len| unsafe {
            glatrain_pg_all_reduce_sum(self.raw, ptrs.as_ptr(), ptrs.len(), err, len)
        })
    }

    /// Overwrites each tensor with rank `root`'s.
    ///
    /// # Errors
    /// As [`Self::all_reduce_sum`].
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), String> {
        let ptrs = tensor_pointers(tensors);
        let root = c_int::try_from(root).map_err(|_| format!("root rank {root} is too large"))?;
        // SAFETY: as in `all_reduce_sum`.
        checked(|err, len| unsafe {
            glatrain_pg_broadcast(self.raw, ptrs.as_ptr(), ptrs.len(), root, err, len)
        })
    }

    /// Waits until every rank has called it.
    ///
    /// # Errors
    /// As [`Self::all_reduce_sum`].
    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: the message buffer is the checked helper's.
        checked(|err, len| unsafe { glatrain_pg_barrier(self.raw, err, len) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from glatrain_pg_gloo_new or glatrain_pg_nccl_new, freed once.
        unsafe { glatrain_pg_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::on_threads;
    use std::time::Instant;
    use tch::Kind;

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn rendezvous(port: u16, rank: usize, world_size: usize, timeout: Duration) -> Rendezvous {
        Rendezvous {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            serve_store: rank == 0,
            rank,
            world_size,
            timeout,
            binding: GlooBinding::Host("127.0.0.1".into()),
        }
    }

    /// Runs `body(group)` on `world_size` threads, one rank each, around a store served apart
    /// (its port taken by the bind itself: no race with other tests), and returns their results
    /// in rank order.
    fn on_ranks<T: Send>(
        world_size: usize,
        timeout: Duration,
        body: impl Fn(ProcessGroup) -> T + Sync,
    ) -> Vec<T> {
        let store = StoreServer::serve(0, timeout).unwrap();
        let port = store.port();
        let results = on_threads(world_size, |rank| {
            let rendezvous = Rendezvous {
                serve_store: false,
                ..rendezvous(port, rank, world_size, timeout)
            };
            body(ProcessGroup::gloo(&rendezvous).unwrap())
        });
        drop(store);
        results
    }

    fn rank_tensor(rank: usize, size: i64) -> Tensor {
        glatrain_testing::Rng::new(rank as u64 * 1000 + size as u64).randn(&[size], Kind::Float)
    }

    #[test]
    fn all_reduce_sums_and_broadcast_copies_over_three_ranks() {
        let sizes = [7i64, 1, 1031];
        let results = on_ranks(3, Duration::from_secs(30), move |group| {
            let rank = group.rank();
            let tensors: Vec<Tensor> = sizes.iter().map(|&n| rank_tensor(rank, n)).collect();
            group.all_reduce_sum(&tensors).unwrap();
            let summed: Vec<Vec<f32>> = tensors.iter().map(|t| Vec::try_from(t).unwrap()).collect();
            let mine = rank_tensor(rank, 5);
            group.broadcast(std::slice::from_ref(&mine), 2).unwrap();
            group.barrier().unwrap();
            (summed, Vec::<f32>::try_from(&mine).unwrap())
        });
        for (i, &n) in sizes.iter().enumerate() {
            let expected = (0..3)
                .map(|r| rank_tensor(r, n))
                .reduce(|a, b| a + b)
                .unwrap();
            let expected = Vec::<f32>::try_from(&expected).unwrap();
            for (summed, _) in &results {
                for (a, b) in summed[i].iter().zip(&expected) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
        let root = Vec::<f32>::try_from(&rank_tensor(2, 5)).unwrap();
        for (_, broadcast) in &results {
            assert_eq!(broadcast, &root);
        }
    }

    #[test]
    fn rank_zero_can_serve_the_store() {
        let port = free_port();
        let sums = on_threads(2, |rank| {
            let group =
                ProcessGroup::gloo(&rendezvous(port, rank, 2, Duration::from_secs(30))).unwrap();
            let t = Tensor::from_slice(&[rank as f32 + 1.0]);
            group.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
            t.double_value(&[0])
        });
        assert_eq!(sums, [3.0, 3.0]);
    }

    #[test]
    fn a_served_store_holds_its_port() {
        let store = StoreServer::serve(0, Duration::from_secs(5)).unwrap();
        assert_ne!(store.port(), 0);
        let err = StoreServer::serve(store.port(), Duration::from_secs(5)).unwrap_err();
        assert!(!err.is_empty() && !err.contains("frame #"), "{err}");
    }

    #[test]
    fn the_reducer_averages_gradients_during_the_backward() {
        // Sizes that make several buckets of 64 bytes, one parameter left without a gradient.
        let sizes = [5i64, 3, 40, 1, 7];
        let results = on_ranks(2, Duration::from_secs(30), move |group| {
            let rank = group.rank();
            let params: Vec<Tensor> = sizes
                .iter()
                .map(|&n| rank_tensor(9, n).set_requires_grad(true))
                .collect();
            let reducer = GradReducer::new(&group, &params, 64).unwrap();
            // Two micro-batches; only the second is armed.
            for micro in 0..2 {
                if micro == 1 {
                    reducer.arm();
                }
                let loss = params
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 3)
                    .map(|(i, p)| {
                        (p * rank_tensor(rank * 10 + micro + i, p.size()[0])).sum(tch::Kind::Float)
                    })
                    .reduce(|a, b| a + b)
                    .unwrap();
                loss.backward();
            }
            // The bucket holding the parameter without a gradient (the first) holds back all.
            assert_eq!(reducer.started(), 0);
            reducer.finish(2.0).unwrap();
            params
                .iter()
                .map(|p| {
                    let g = p.grad();
                    g.defined().then(|| Vec::<f32>::try_from(&g).unwrap())
                })
                .collect::<Vec<_>>()
        });
        for (i, &n) in sizes.iter().enumerate() {
            if i == 3 {
                assert!(results.iter().all(|r| r[i].is_none()));
                continue;
            }
            // d loss / d p = the data: summed over micro-batches, averaged over ranks.
            let expected = (0..2)
                .flat_map(|rank| (0..2).map(move |micro| rank_tensor(rank * 10 + micro + i, n)))
                .reduce(|a, b| a + b)
                .unwrap()
                / 2.0;
            let expected = Vec::<f32>::try_from(&expected).unwrap();
            for r in &results {
                let got = r[i].as_ref().unwrap();
                for (a, b) in got.iter().zip(&expected) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn the_backward_starts_each_bucket_once_its_gradients_are_in() {
        let started = on_ranks(2, Duration::from_secs(30), |group| {
            let params: Vec<Tensor> = [5i64, 3, 40, 1, 7]
                .iter()
                .map(|&n| rank_tensor(group.rank(), n).set_requires_grad(true))
                .collect();
            // Buckets of 64 bytes: [p4, p3], [p2], [p1, p0].
            let reducer = GradReducer::new(&group, &params, 64).unwrap();
            reducer.arm();
            let loss: Tensor = params.iter().map(|p| p.sum(Kind::Float)).sum();
            loss.backward();
            let during = reducer.started();
            reducer.finish(2.0).unwrap();
            // d loss / d p = 1 on both ranks.
            for p in &params {
                assert_eq!(
                    Vec::<f32>::try_from(p.grad()).unwrap(),
                    vec![1.0; p.numel()]
                );
            }
            during
        });
        assert_eq!(started, vec![3, 3]);
    }

    #[test]
    fn a_peer_that_leaves_fails_the_collective_instead_of_hanging() {
        let start = Instant::now();
        let results = on_ranks(2, Duration::from_secs(60), |group| {
            if group.rank() == 1 {
                drop(group);
                return None;
            }
            let t = rank_tensor(0, 4);
            Some(group.all_reduce_sum(std::slice::from_ref(&t)))
        });
        let err = results[0].clone().unwrap().unwrap_err();
        assert!(!err.is_empty() && !err.contains("frame #"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_silent_peer_fails_the_collective_at_the_timeout() {
        let start = Instant::now();
        let results = on_ranks(2, Duration::from_secs(2), |group| {
            if group.rank() == 1 {
                // Alive but never joining the collective, until rank 0 gave up on it.
                std::thread::sleep(Duration::from_secs(4));
                return None;
            }
            let t = rank_tensor(0, 4);
            Some(group.all_reduce_sum(std::slice::from_ref(&t)))
        });
        let err = results[0].clone().unwrap().unwrap_err();
        assert!(err.to_lowercase().contains("timed out"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn an_nccl_group_on_a_missing_cuda_device_is_an_error() {
        let missing = tch::Cuda::device_count() as usize;
        let rendezvous = rendezvous(free_port(), 0, 1, Duration::from_secs(5));
        let err = ProcessGroup::nccl(&rendezvous, missing).unwrap_err();
        assert!(
            err.starts_with(&format!("CUDA device {missing} does not exist")),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_store_is_an_error_after_the_timeout() {
        let port = free_port();
        let start = Instant::now();
        let err = ProcessGroup::gloo(&rendezvous(port, 1, 2, Duration::from_secs(2))).unwrap_err();
        assert!(!err.is_empty() && !err.contains("frame #"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }
}
