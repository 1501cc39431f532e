//! The NCCL process group on CUDA devices, one rank per device (a thread each): all-reduce sums,
//! broadcast copies and the bucketed gradient average, with one rank and, when two devices are
//! visible, with two. Skips on machines without CUDA.

use std::time::Duration;

use glatrain_dist::{DataParallel, WorldEnv};
use glatrain_shim::process_group::{ProcessGroup, StoreServer};
use glatrain_testing::{cuda_or_skip, on_threads, Rng};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The world sizes this machine can run: 1, and 2 with two CUDA devices.
fn world_sizes() -> Vec<usize> {
    let devices = tch::Cuda::device_count() as usize;
    (1..=devices.min(2)).collect()
}

/// Runs `body(rank, world)` on `world_size` threads, around a store served apart, and returns
/// their results in rank order.
fn on_ranks<T: Send>(world_size: usize, body: impl Fn(usize, WorldEnv) -> T + Sync) -> Vec<T> {
    let store = StoreServer::serve(0, TIMEOUT).unwrap();
    let port = store.port();
    let results = on_threads(world_size, |rank| {
        body(
            rank,
            WorldEnv::on_this_host(rank, world_size, port, TIMEOUT),
        )
    });
    drop(store);
    results
}

/// Rank `rank`'s random values (never zeros) of `n` elements, on the CPU.
fn rank_tensor(rank: usize, n: i64, kind: Kind) -> Tensor {
    Rng::new(rank as u64 * 1000 + n as u64)
        .randn(&[n], Kind::Float)
        .to_kind(kind)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// The largest difference of `a` from `b` relative to `b`'s largest magnitude.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn all_reduce_sums_and_broadcast_copies_on_each_rank_s_device() {
    if cuda_or_skip().is_none() {
        return;
    }
    // fp32 sums of a few terms round once per term; bf16 keeps 8 bits.
    let cases = [
        (7i64, Kind::Float, 1e-6),
        (1, Kind::Float, 1e-6),
        (1031, Kind::Float, 1e-6),
        (300, Kind::BFloat16, 1e-2),
    ];
    for world_size in world_sizes() {
        let results = on_ranks(world_size, move |rank, env| {
            let group = ProcessGroup::nccl(&env.rendezvous(), rank).unwrap();
            let device = Device::Cuda(rank);
            let tensors: Vec<Tensor> = cases
                .iter()
                .map(|&(n, kind, _)| rank_tensor(rank, n, kind).to_device(device))
                .collect();
            group.all_reduce_sum(&tensors).unwrap();
            assert!(tensors.iter().all(|t| t.device() == device));
            let summed: Vec<Vec<f64>> = tensors.iter().map(values).collect();
            let mine = rank_tensor(rank, 5, Kind::Float).to_device(device);
            group
                .broadcast(std::slice::from_ref(&mine), world_size - 1)
                .unwrap();
            group.barrier().unwrap();
            (summed, values(&mine))
        });
        for (i, &(n, kind, tolerance)) in cases.iter().enumerate() {
            let expected: Vec<f64> = (0..world_size)
                .map(|r| values(&rank_tensor(r, n, kind)))
                .reduce(|a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect())
                .unwrap();
            for (rank, (summed, _)) in results.iter().enumerate() {
                let err = relative_error(&summed[i], &expected);
                println!("world {world_size}, rank {rank}, {n} x {kind:?}: sum error {err:e}");
                assert!(err <= tolerance, "{err}");
            }
        }
        let root = values(&rank_tensor(world_size - 1, 5, Kind::Float));
        for (_, broadcast) in &results {
            assert_eq!(broadcast, &root);
        }
    }
}

#[test]
fn gradients_and_scalars_are_averaged_on_each_rank_s_device() {
    if cuda_or_skip().is_none() {
        return;
    }
    let shapes: [&[i64]; 3] = [&[3, 5], &[1], &[257, 3]];
    let data = move |rank: usize| -> Vec<Tensor> {
        let mut rng = Rng::new(rank as u64 + 11);
        shapes.iter().map(|s| rng.randn(s, Kind::Float)).collect()
    };
    for world_size in world_sizes() {
        let results = on_ranks(world_size, move |rank, env| {
            let device = Device::Cuda(rank);
            let mut dp = DataParallel::join(&env, device).unwrap();
            let params: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::ones(*s, (Kind::Float, device)).set_requires_grad(true))
                .collect();
            dp.watch_gradients(&params).unwrap();
            dp.arm();
            let loss: Tensor = params
                .iter()
                .zip(data(rank))
                .map(|(p, d)| (p * d.to_device(device)).sum(Kind::Float))
                .sum();
            loss.backward();
            dp.average_gradients().unwrap();
            let grads: Vec<Vec<f64>> = params.iter().map(|p| values(&p.grad())).collect();
            let sums = dp.sum("a test sum", &[rank as f64, 0.5]).unwrap();
            (grads, sums)
        });
        let all: Vec<Vec<Tensor>> = (0..world_size).map(data).collect();
        for i in 0..shapes.len() {
            let mean = all
                .iter()
                .map(|d| d[i].shallow_clone())
                .reduce(|a, b| a + b)
                .unwrap()
                / world_size as f64;
            let expected = values(&mean);
            for (grads, _) in &results {
                let err = relative_error(&grads[i], &expected);
                assert!(err <= 1e-6, "world {world_size}, parameter {i}: {err}");
            }
        }
        let rank_sum = (0..world_size).sum::<usize>() as f64;
        for (_, sums) in &results {
            assert_eq!(sums, &vec![rank_sum, 0.5 * world_size as f64]);
        }
    }
}
