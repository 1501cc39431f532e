//! A training run's process group: every rank holds the same weights, trains on its share of
//! each global micro-batch, and averages the gradients over the ranks (while the backward of the
//! step's last micro-batch runs) before the optimizer step, so that all ranks take the same step.
//!
//! The backend follows the device, in [`DataParallel::join`] alone: Gloo for CPU tensors, NCCL
//! for CUDA ones (each rank on its own device).

use glatrain_shim::process_group::{GradReducer, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::{DistError, WorldEnv};

/// Gradients are averaged in flat buckets of about this many bytes (DDP's default): few
/// collectives, each large enough to use the network well.
pub const BUCKET_BYTES: usize = 25 << 20;

/// This process's membership in the run's group of ranks.
#[derive(Debug)]
pub struct DataParallel {
    group: ProcessGroup,
    /// Where the group's collectives run: the tensors they take live there.
    device: Device,
    /// Averages the gradients of the watched parameters.
    reducer: Option<GradReducer>,
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
    /// Meets the other ranks of `env` with the backend for `device`: Gloo on the CPU, NCCL on a
    /// CUDA device (which must differ from that of every other rank of this host; the trainer
    /// gives rank `LOCAL_RANK` the device `cuda:LOCAL_RANK`).
    ///
    /// # Errors
    /// [`DistError::Rendezvous`] when the ranks cannot meet within the timeout, or NCCL cannot
    /// make its communicator on `device`.
    pub fn join(env: &WorldEnv, device: Device) -> Result<Self, DistError> {
        let rendezvous = env.rendezvous();
        let group = match device {
            Device::Cuda(index) => ProcessGroup::nccl(&rendezvous, index),
            _ => ProcessGroup::gloo(&rendezvous),
        }
        .map_err(|message| DistError::Rendezvous {
            rank: env.rank,
            world_size: env.world_size,
            addr: env.master_addr.clone(),
            port: env.master_port,
            message,
        })?;
        Ok(DataParallel {
            group,
            device,
            reducer: None,
        })
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

    /// Hooks `params` (every rank's in the same order) so that the next [`Self::arm`]ed
    /// backward starts averaging their gradients in buckets of about [`BUCKET_BYTES`] while it
    /// runs (see [`GradReducer`]).
    ///
    /// # Errors
    /// [`DistError::Torch`]: a parameter that is not a trainable leaf.
    pub fn watch_gradients(&mut self, params: &[Tensor]) -> Result<(), DistError> {
        let reducer = GradReducer::new(&self.group, params, BUCKET_BYTES).map_err(|message| {
            DistError::Torch {
                what: "hooking the parameters for the gradient average".into(),
                message,
            }
        })?;
        self.reducer = Some(reducer);
        Ok(())
    }

    /// Makes the next backward (the one that completes the step's gradients) start the
    /// average.
    pub fn arm(&self) {
        if let Some(reducer) = &self.reducer {
            reducer.arm();
        }
    }

    /// After the armed backward: each watched gradient becomes its mean over the ranks.
    /// Every rank must have gradients for the same parameters; those without are left alone.
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn average_gradients(&self) -> Result<(), DistError> {
        match &self.reducer {
            Some(reducer) => reducer
                .finish(self.world_size() as f64)
                .map_err(collective("averaging the gradients")),
            None => Ok(()),
        }
    }

    /// The sums of `values` over the ranks (in f64).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn sum(&self, what: &str, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::f_from_slice(values)
            .and_then(|t| t.f_to_device(self.device))
            .map_err(torch(what))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    use glatrain_shim::process_group::StoreServer;
    use glatrain_testing::on_threads;

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

    /// Rank `rank`'s data for parameters of odd sizes (the second gets no gradient).
    fn rank_grads(rank: usize) -> Vec<Option<Tensor>> {
        let mut rng = glatrain_testing::Rng::new(rank as u64 + 7);
        vec![
            Some(rng.randn(&[3, 5], Kind::Float)),
            None,
            Some(rng.randn(&[1], Kind::Float)),
            Some(rng.randn(&[257, 3], Kind::Float)),
        ]
    }

    /// Parameters whose loss has the gradients of [`rank_grads`] on `rank`.
    fn params_with_grads(dp: &mut DataParallel, rank: usize) -> Vec<Tensor> {
        let data = rank_grads(rank);
        let params: Vec<Tensor> = [vec![3, 5], vec![2], vec![1], vec![257, 3]]
            .iter()
            .map(|shape| {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true)
            })
            .collect();
        dp.watch_gradients(&params).unwrap();
        dp.arm();
        let loss: Tensor = params
            .iter()
            .zip(&data)
            .filter_map(|(p, d)| d.as_ref().map(|d| (p * d).sum(Kind::Float)))
            .sum();
        loss.backward();
        params
    }

    #[test]
    fn gradients_become_their_mean_over_the_ranks() {
        let timeout = std::time::Duration::from_secs(30);
        let store = StoreServer::serve(0, timeout).unwrap();
        let port = store.port();
        let world_size = 3;
        let results = on_threads(world_size, |rank| {
            let world = WorldEnv::on_this_host(rank, world_size, port, timeout);
            let mut dp = DataParallel::join(&world, Device::Cpu).unwrap();
            let params = params_with_grads(&mut dp, rank);
            dp.average_gradients().unwrap();
            let grads: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| Some(p.grad()).filter(Tensor::defined))
                .collect();
            let sums = dp.sum("a test sum", &[rank as f64, 1.0]).unwrap();
            let averaged: Vec<Option<Vec<f32>>> = grads
                .iter()
                .map(|g| g.as_ref().map(|g| Vec::try_from(g.reshape([-1])).unwrap()))
                .collect();
            (averaged, sums)
        });
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
}
