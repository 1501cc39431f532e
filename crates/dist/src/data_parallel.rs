//! A training run's process group: every rank holds the same weights, trains on its share of
//! each global micro-batch, and averages the gradients over the ranks before the optimizer step,
//! so that all ranks take the same step.
//!
//! The backend follows the device, in [`DataParallel::join`] alone: Gloo for CPU tensors; CUDA
//! needs NCCL, which this build does not have.

use glatrain_shim::process_group::ProcessGroup;
use tch::{Device, Kind, Tensor};

use crate::{DistError, WorldEnv};

/// Gradients are averaged in flat buckets of about this many bytes (DDP's default): few
/// collectives, each large enough to use the network well.
pub const BUCKET_BYTES: usize = 25 << 20;

/// This process's membership in the run's group of ranks.
#[derive(Debug)]
pub struct DataParallel {
    group: ProcessGroup,
}

fn collective(what: &str) -> impl FnOnce(String) -> DistError + '_ {
    move |message| DistError::Collective {
        what: what.to_string(),
        message,
    }
}

fn torch(what: &str) -> impl FnOnce(tch::TchError) -> DistError + '_ {
    move |e| DistError::Torch {
        what: what.to_string(),
        message: e.to_string(),
    }
}

impl DataParallel {
    /// Meets the other ranks of `env` with the backend for `device`.
    ///
    /// # Errors
    /// [`DistError::NoBackend`] for a CUDA device (NCCL is not built in);
    /// [`DistError::Rendezvous`] when the ranks cannot meet within the timeout.
    pub fn join(env: &WorldEnv, device: Device) -> Result<Self, DistError> {
        if let Device::Cuda(_) = device {
            return Err(DistError::NoBackend(format!(
                "NCCL backend not built: training on {device:?} with WORLD_SIZE={} needs \
                 c10d's ProcessGroupNCCL, whose headers need the CUDA toolkit's (cuda_runtime.h \
                 and CCCL's nv/target), which the torch wheel does not ship; train on CPU \
                 (run.device = \"cpu\") or with one rank",
                env.world_size
            )));
        }
        let group =
            ProcessGroup::gloo(&env.rendezvous()).map_err(|message| DistError::Rendezvous {
                rank: env.rank,
                world_size: env.world_size,
                addr: env.master_addr.clone(),
                port: env.master_port,
                message,
            })?;
        Ok(DataParallel { group })
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// Whether this rank writes the run directory.
    pub fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// Overwrites `tensors` (contiguous, e.g. the parameters) with rank `root`'s.
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn broadcast(&self, what: &str, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        self.group
            .broadcast(tensors, root)
            .map_err(collective(what))
    }

    /// Replaces each gradient by its mean over the ranks, in flat buckets of about
    /// [`BUCKET_BYTES`], last parameters first (the order the backward produces them). Every
    /// rank must have gradients for the same parameters; `None` entries are left alone.
    ///
    /// # Errors
    /// [`DistError::Collective`], or [`DistError::Torch`] when the buckets cannot be built.
    pub fn average_gradients(&self, grads: &[Option<Tensor>]) -> Result<(), DistError> {
        let present: Vec<&Tensor> = grads.iter().rev().flatten().collect();
        let buckets = buckets(&present, BUCKET_BYTES);
        let flat: Vec<Tensor> = buckets
            .iter()
            .map(|bucket| {
                let views: Vec<Tensor> = bucket
                    .iter()
                    .map(|g| g.f_reshape([-1]))
                    .collect::<Result<_, _>>()?;
                Tensor::f_cat(&views, 0)
            })
            .collect::<Result<_, _>>()
            .map_err(torch("packing the gradients into buckets"))?;
        self.group
            .all_reduce_sum(&flat)
            .map_err(collective("averaging the gradients"))?;
        let inv = 1.0 / self.world_size() as f64;
        for (bucket, sum) in buckets.iter().zip(&flat) {
            let mut offset = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mean = sum
                    .f_narrow(0, offset, n)
                    .and_then(|s| s.f_view_as(g))
                    .and_then(|s| s.f_mul_scalar(inv))
                    .map_err(torch("unpacking the averaged gradients"))?;
                let mut g = g.shallow_clone();
                g.f_copy_(&mean)
                    .map_err(torch("unpacking the averaged gradients"))?;
                offset += n;
            }
        }
        Ok(())
    }

    /// The sums of `values` over the ranks (in f64).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn sum(&self, what: &str, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::f_from_slice(values).map_err(torch(what))?;
        self.group
            .all_reduce_sum(std::slice::from_ref(&t))
            .map_err(collective(what))?;
        Vec::<f64>::try_from(&t.to_kind(Kind::Double)).map_err(torch(what))
    }
}

/// The rank that owns each of the tensors of `sizes` elements when they are shared out over
/// `ranks` (ZeRO stage 1): the largest first, each to the rank that holds the fewest elements so
/// far (the lowest such rank), so that every rank holds about the same.
pub fn owners(sizes: &[usize], ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut held = vec![0usize; ranks.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let (rank, _) = held
            .iter()
            .enumerate()
            .min_by_key(|&(r, &h)| (h, r))
            .unwrap_or((0, &0));
        owner[i] = rank;
        held[rank] += sizes[i];
    }
    owner
}

/// Consecutive tensors grouped so that each group holds at most `bytes` (a larger tensor is a
/// group of its own) and holds one dtype.
fn buckets<'a>(tensors: &[&'a Tensor], bytes: usize) -> Vec<Vec<&'a Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut held = 0;
    for &t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b: &Vec<&Tensor>| {
            held + size <= bytes && b.first().is_some_and(|f| f.kind() == t.kind())
        });
        if fits {
            held += size;
            if let Some(last) = out.last_mut() {
                last.push(t);
            }
        } else {
            out.push(vec![t]);
            held = size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use glatrain_shim::process_group::StoreServer;

    #[test]
    fn owners_balance_the_elements() {
        assert_eq!(owners(&[10, 40, 30, 20, 5], 2), vec![0, 0, 1, 1, 0]);
        assert_eq!(owners(&[3, 3], 1), vec![0, 0]);
        let sizes: Vec<usize> = (1..=50).map(|i| i * 37 % 101 + 1).collect();
        let owner = owners(&sizes, 4);
        let mut held = [0usize; 4];
        for (s, o) in sizes.iter().zip(&owner) {
            held[*o] += s;
        }
        let (min, max) = (held.iter().min().unwrap(), held.iter().max().unwrap());
        assert!(max - min <= *sizes.iter().max().unwrap(), "{held:?}");
    }

    #[test]
    fn buckets_keep_order_size_and_dtype() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        let ts = [f(10), f(10), f(30), f(1), d.shallow_clone(), f(1)];
        let refs: Vec<&Tensor> = ts.iter().collect();
        let sizes: Vec<Vec<i64>> = buckets(&refs, 80)
            .iter()
            .map(|b| b.iter().map(|t| t.numel() as i64).collect())
            .collect();
        // 40 + 40 bytes fill the first; 120 bytes is a bucket alone; f64 starts a new one.
        assert_eq!(
            sizes,
            vec![vec![10, 10], vec![30], vec![1], vec![2], vec![1]]
        );
    }

    /// Rank `rank` of a run whose store a launcher serves on `port`.
    fn world(port: u16, rank: usize, world_size: usize) -> WorldEnv {
        WorldEnv {
            rank,
            local_rank: rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: std::time::Duration::from_secs(30),
            interface: None,
            agent_store: true,
        }
    }

    /// Rank `rank`'s gradients: random, of odd sizes, one missing.
    fn rank_grads(rank: usize) -> Vec<Option<Tensor>> {
        let mut rng = glatrain_testing::Rng::new(rank as u64 + 7);
        vec![
            Some(rng.randn(&[3, 5], Kind::Float)),
            None,
            Some(rng.randn(&[1], Kind::Float)),
            Some(rng.randn(&[257, 3], Kind::Float)),
        ]
    }

    #[test]
    fn gradients_become_their_mean_over_the_ranks() {
        let store = StoreServer::serve(0, std::time::Duration::from_secs(30)).unwrap();
        let port = store.port();
        let world_size = 3;
        let threads: Vec<_> = (0..world_size)
            .map(|rank| {
                std::thread::spawn(move || {
                    let dp =
                        DataParallel::join(&world(port, rank, world_size), Device::Cpu).unwrap();
                    let grads = rank_grads(rank);
                    dp.average_gradients(&grads).unwrap();
                    let sums = dp.sum("a test sum", &[rank as f64, 1.0]).unwrap();
                    let averaged: Vec<Option<Vec<f32>>> = grads
                        .iter()
                        .map(|g| g.as_ref().map(|g| Vec::try_from(g.reshape([-1])).unwrap()))
                        .collect();
                    (averaged, sums)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let all: Vec<Vec<Option<Tensor>>> = (0..world_size).map(rank_grads).collect();
        for i in 0..4 {
            let expected = all[0][i].as_ref().map(|_| {
                let sum = all.iter().map(|g| g[i].as_ref().unwrap().shallow_clone());
                let mean = sum.reduce(|a, b| a + b).unwrap() / world_size as f64;
                Vec::<f32>::try_from(mean.reshape([-1])).unwrap()
            });
            for (averaged, _) in &results {
                match (&averaged[i], &expected) {
                    (Some(a), Some(e)) => {
                        for (x, y) in a.iter().zip(e) {
                            assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
                        }
                    }
                    (None, None) => {}
                    other => panic!("{other:?}"),
                }
            }
        }
        for (_, sums) in &results {
            assert_eq!(sums, &vec![3.0, 3.0]);
        }
    }

    #[test]
    fn cuda_has_no_backend_in_this_build() {
        let err = DataParallel::join(&world(1, 0, 2), Device::Cuda(0)).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with("NCCL backend not built"),
            "{err}"
        );
    }
}
