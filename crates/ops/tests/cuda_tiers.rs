//! Tiered compilation on a GPU: with an empty kernel cache, the first call runs the Quick tier,
//! the Full tier replaces it once compiled, both tiers are cached, and the two tiers give the same
//! results bit for bit (training from a cold cache then matches one from a warm cache), for
//! every kernel of every source (GLA's, the selective scan's and the fused ops'). Its own
//! test binary (one process, one test): it points the kernel cache at an empty directory and
//! clears `GLATRAIN_KERNEL_TIER`, which no other test may see. Skips on machines without CUDA.

use glatrain_cuda::{Gpu, KernelDtype, Tier};
use glatrain_ops::fused::FUSED;
use glatrain_ops::gla::kernels::{source_of, GLA_TC};
use glatrain_ops::launch::kernel_dtype;
use glatrain_ops::selective_scan::kernels::SELECTIVE_SCAN;
use glatrain_ops::selective_scan::Segments;
use glatrain_ops::{
    causal_conv, gla, rms_norm, rotary, selective_scan, swiglu, GlaMode, ScanInputs, ScanOptions,
};
use glatrain_testing::Rng;
use tch::{Device, Kind, Tensor};

/// One shape: batch, length, heads, key and value head dims.
type Shape = (i64, i64, i64, i64, i64);

/// A source of random leaves on the GPU: standard normal samples (drawn in f32 from `seed`'s
/// stream) of a shape and dtype, requiring grad.
fn leaves(seed: u64) -> impl FnMut(&[i64], Kind) -> Tensor {
    let mut rng = Rng::new(seed);
    move |size, kind| {
        rng.randn(size, Kind::Float)
            .to_kind(kind)
            .to_device(Device::Cuda(0))
            .set_requires_grad(true)
    }
}

/// o, the final state and the gradients of q, k, v, gk and the initial state, for random inputs
/// (q, k, v, do in `kind`; gates, states f32).
fn run(shape: Shape, kind: Kind, mode: GlaMode) -> Vec<(&'static str, Tensor)> {
    let (b, t, h, k, v) = shape;
    let mut leaf = leaves(5);
    let (q, kk) = (leaf(&[b, t, h, k], kind), leaf(&[b, t, h, k], kind));
    let vv = leaf(&[b, t, h, v], kind);
    let g = leaf(&[b, t, h, k], Kind::Float);
    let h0 = leaf(&[b, h, k, v], Kind::Float);
    let d_o = leaf(&[b, t, h, v], kind).detach();
    let dht = leaf(&[b, h, k, v], Kind::Float).detach();
    let gates = (&g + 2.0).log_sigmoid();
    let (o, ht) = gla(&q, &kk, &vv, &gates, Some(&h0), None, mode, true).unwrap();
    let ht = ht.unwrap();
    let loss = (o.to_kind(Kind::Float) * d_o.to_kind(Kind::Float)).sum(Kind::Float)
        + (&ht * dht).sum(Kind::Float);
    let grads = Tensor::run_backward(&[&loss], &[&q, &kk, &vv, &g, &h0], false, false);
    let names = ["dq", "dk", "dv", "dg", "dh0"];
    let mut out = vec![("o", o), ("final state", ht)];
    out.extend(names.into_iter().zip(grads));
    out
}

/// The outputs and gradients of the fused ops (kernels/fused.cu) for random inputs in `kind`:
/// RMSNorm with and without its gate on rows that take the vector path (256, 1000, 4096) and
/// the element path (7), SwiGLU, the causal convolution over documents (vector and element
/// paths), and the rotary embedding (vector and pair-by-pair paths).
fn run_fused(kind: Kind) -> Vec<(&'static str, Tensor)> {
    let mut leaf = leaves(7);
    let mut out = Vec::new();
    for (rows, n, gated) in [
        (70, 256, true),
        (9, 4096, false),
        (300, 7, true),
        (37, 1000, true),
    ] {
        let (x, g, w) = (
            leaf(&[rows, n], kind),
            leaf(&[rows, n], kind),
            leaf(&[n], Kind::Float),
        );
        let dy = leaf(&[rows, n], kind).detach();
        let y = rms_norm(&x, &w, 1e-6, gated.then_some(&g)).unwrap();
        let inputs = if gated {
            vec![&x, &w, &g]
        } else {
            vec![&x, &w]
        };
        let grads = glatrain_shim::autograd::grad(&y, &dy, &inputs).unwrap();
        out.push(("rms_norm y", y));
        out.extend(
            ["rms_norm dx", "rms_norm dw", "rms_norm dg"]
                .into_iter()
                .zip(grads),
        );
    }
    let (a, b) = (leaf(&[3, 5003], kind), leaf(&[3, 5003], kind));
    let dy = leaf(&[3, 5003], kind).detach();
    let y = swiglu(&a, &b).unwrap();
    let grads = glatrain_shim::autograd::grad(&y, &dy, &[&a, &b]).unwrap();
    out.push(("swiglu y", y));
    out.extend(["swiglu da", "swiglu db"].into_iter().zip(grads));
    for d in [256, 37] {
        let (x, w, bias) = (
            leaf(&[2, 300, d], kind),
            leaf(&[d, 4], Kind::Float),
            leaf(&[d], Kind::Float),
        );
        let dy = leaf(&[2, 300, d], kind).detach();
        let resets = Tensor::arange(600, (Kind::Int64, Device::Cuda(0)))
            .remainder(97)
            .eq(3)
            .view([2, 300]);
        let y = causal_conv(&x, &w, Some(&bias), Some(&resets)).unwrap();
        let grads = glatrain_shim::autograd::grad(&y, &dy, &[&x, &w, &bias]).unwrap();
        out.push(("causal_conv y", y));
        out.extend(
            ["causal_conv dx", "causal_conv dw", "causal_conv dbias"]
                .into_iter()
                .zip(grads),
        );
    }
    for (h, d) in [(4, 64), (3, 6)] {
        let x = leaf(&[2, 33, h, d], kind);
        let (cos, sin) = (
            leaf(&[33, d / 2], Kind::Float),
            leaf(&[33, d / 2], Kind::Float),
        );
        let dy = leaf(&[2, 33, h, d], kind).detach();
        let y = rotary(&x, &cos.detach(), &sin.detach()).unwrap();
        let grads = glatrain_shim::autograd::grad(&y, &dy, &[&x]).unwrap();
        out.push(("rotary y", y));
        out.extend(["rotary dx"].into_iter().zip(grads));
    }
    out
}

/// The selective scan's output, final state and every gradient for random inputs of
/// `[b, t, d, n]` (u, delta, z, B, C in `kind`; the rest f32), every option on, with `segments`.
fn run_scan([b, t, d, n]: [i64; 4], kind: Kind, segments: Segments) -> Vec<(&'static str, Tensor)> {
    let mut leaf = leaves(9);
    let (u, delta, z) = (
        leaf(&[b, t, d], kind),
        leaf(&[b, t, d], kind),
        leaf(&[b, t, d], kind),
    );
    let (bm, cm) = (leaf(&[b, t, n], kind), leaf(&[b, t, n], kind));
    let (a_log, skip, bias) = (
        leaf(&[d, n], Kind::Float),
        leaf(&[d], Kind::Float),
        leaf(&[d], Kind::Float),
    );
    let h0 = leaf(&[b, d, n], Kind::Float);
    let dout = leaf(&[b, t, d], kind).detach();
    let dht = leaf(&[b, d, n], Kind::Float).detach();
    let a = -a_log.exp();
    let inputs = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &bm,
        c: &cm,
        d: Some(&skip),
        z: Some(&z),
        delta_bias: Some(&bias),
        initial_state: Some(&h0),
        resets: None,
    };
    let options = ScanOptions {
        output_final_state: true,
        segments,
        ..ScanOptions::default()
    };
    let (out, ht) = selective_scan(&inputs, &options).unwrap();
    let ht = ht.unwrap();
    let loss = (out.to_kind(Kind::Float) * dout.to_kind(Kind::Float)).sum(Kind::Float)
        + (&ht * dht).sum(Kind::Float);
    let leaves = [&u, &delta, &a_log, &bm, &cm, &skip, &z, &bias, &h0];
    let grads = Tensor::run_backward(&[&loss], &leaves, false, false);
    let names = [
        "du",
        "ddelta",
        "dA_log",
        "dB",
        "dC",
        "dD",
        "dz",
        "ddelta_bias",
        "dh0",
    ];
    let mut results = vec![("out", out), ("final state", ht)];
    results.extend(names.into_iter().zip(grads));
    results
}

/// Names of the results that differ between two runs, with the largest difference.
fn differences(
    what: &str,
    a: &[(&'static str, Tensor)],
    b: &[(&'static str, Tensor)],
) -> Vec<String> {
    a.iter()
        .zip(b)
        .filter(|((_, x), (_, y))| !identical(x, y))
        .map(|((name, x), (_, y))| {
            let largest = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            format!("{what}: {name} differs between the tiers (largest difference {largest:e})")
        })
        .collect()
}

fn identical(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
fn quick_code_first_then_the_optimised_code_with_identical_results() {
    if glatrain_testing::cuda_or_skip().is_none() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    // The only test of this binary: nothing else reads the environment concurrently.
    std::env::set_var("GLATRAIN_CACHE_DIR", cache.path());
    std::env::remove_var("GLATRAIN_KERNEL_TIER");
    let device = Gpu::get(0).unwrap();

    // The mechanism, on the bf16 tensor-core module.
    let (source, dtype) = (&GLA_TC, KernelDtype::Bf16);
    assert_eq!(device.loaded_tier(source, dtype), None);
    run((1, 64, 1, 64, 64), Kind::BFloat16, GlaMode::Chunk);
    // The Full tier compiles on a background thread for ~2-4x the Quick tier's ~0.5 s; this
    // call took milliseconds after the Quick modules were in.
    assert_eq!(device.loaded_tier(source, dtype), Some(Tier::Quick));
    device.prepare_final(source, dtype).unwrap();
    assert_eq!(device.loaded_tier(source, dtype), Some(Tier::Full));
    let files: Vec<String> = std::fs::read_dir(glatrain_fs::cache_dir("kernels").unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for tier in [Tier::Quick, Tier::Full] {
        for name in source.kernels {
            let prefix = format!("gla_tc.cu-{name}-bf16-{}-", tier.name());
            assert!(
                files.iter().any(|f| f.starts_with(&prefix)),
                "no {prefix}* in {files:?}"
            );
        }
    }

    // The same results from both tiers, over shapes that reach every kernel: the output walks
    // (narrow and wide), segmented walks with their pre-walk and carry, the state walk with its
    // fixup and the separate output kernels (K > 128), dq/dk; and gla.cu's three schedules.
    let tensor_core: [(Shape, Kind); 4] = [
        ((2, 300, 3, 64, 96), Kind::BFloat16),
        ((4, 1024, 16, 128, 128), Kind::BFloat16),
        ((1, 4096, 1, 128, 128), Kind::Half),
        ((1, 2048, 1, 256, 200), Kind::Half),
    ];
    let mut cases: Vec<(Shape, Kind, GlaMode)> = tensor_core
        .iter()
        .map(|&(shape, kind)| (shape, kind, GlaMode::Chunk))
        .collect();
    for mode in [GlaMode::Chunk, GlaMode::FusedChunk, GlaMode::FusedRecurrent] {
        for shape in [
            (2, 130, 2, 32, 48),
            (1, 300, 1, 128, 100),
            (1, 65, 1, 256, 64),
        ] {
            cases.push((shape, Kind::Float, mode));
        }
    }
    for mode in [GlaMode::FusedChunk, GlaMode::FusedRecurrent] {
        cases.push(((2, 130, 2, 32, 48), Kind::BFloat16, mode));
        cases.push(((1, 300, 1, 128, 100), Kind::Half, mode));
    }
    let mut differ = Vec::new();
    for (shape, kind, mode) in cases {
        let dtype = kernel_dtype(kind).unwrap();
        let source = source_of(mode, dtype);
        let mut results = Vec::new();
        for tier in [Tier::Quick, Tier::Full] {
            device.use_tier(source, dtype, tier).unwrap();
            results.push(run(shape, kind, mode));
        }
        let what = format!("{shape:?} {kind:?} {mode:?}");
        differ.extend(differences(&what, &results[0], &results[1]));
        println!("{what}: compared");
    }

    // The selective scan: segmented launches (state walk, carry, adjoint walk) and single
    // segments; N <= 16 (one backward pass) and N > 16 (several passes, the adjoint workspace).
    let segmented = Segments::ChunksPerSegment {
        forward: 2,
        backward: 3,
    };
    let scan_cases: [([i64; 4], Kind, Segments); 5] = [
        ([2, 300, 70, 16], Kind::BFloat16, segmented),
        ([1, 200, 9, 256], Kind::Half, segmented),
        ([1, 130, 33, 1], Kind::Float, segmented),
        ([2, 100, 65, 64], Kind::Float, Segments::Auto),
        (
            [2, 70, 40, 4],
            Kind::BFloat16,
            Segments::ChunksPerSegment {
                forward: 1000,
                backward: 1000,
            },
        ),
    ];
    for (shape, kind, segments) in scan_cases {
        let dtype = kernel_dtype(kind).unwrap();
        let mut results = Vec::new();
        for tier in [Tier::Quick, Tier::Full] {
            device.use_tier(&SELECTIVE_SCAN, dtype, tier).unwrap();
            results.push(run_scan(shape, kind, segments));
        }
        let what = format!("selective scan {shape:?} {kind:?} {segments:?}");
        differ.extend(differences(&what, &results[0], &results[1]));
        println!("{what}: compared");
    }
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let dtype = kernel_dtype(kind).unwrap();
        let mut results = Vec::new();
        for tier in [Tier::Quick, Tier::Full] {
            device.use_tier(&FUSED, dtype, tier).unwrap();
            results.push(run_fused(kind));
        }
        differ.extend(differences(
            &format!("fused {kind:?}"),
            &results[0],
            &results[1],
        ));
        println!("fused ops {kind:?}: compared");
    }
    assert!(differ.is_empty(), "\n{}", differ.join("\n"));
}
