//! Every family on a GPU: bf16 autocast over fp32 weights (the trainer's default), decoding
//! token by token on the CUDA kernels against the full sequence, and activation checkpointing
//! (gradients and peak memory). Skipped without a CUDA device.

use glatrain_config::{ActivationCheckpointing, GlaMode};
use glatrain_models::{build, CausalLm};
use tch::{nn, Device, Kind, Tensor};

mod common;

use common::{seeded_model, step_through, take_gradients, zoo, VOCAB};

#[test]
fn bf16_autocast_on_cuda_stays_close_to_fp32_and_trains() {
    let Some(device) = glatrain_testing::cuda_or_skip() else {
        return;
    };
    glatrain_shim::autocast::set_autocast_dtype(Kind::BFloat16).unwrap();
    for (name, cfg) in zoo() {
        let (vs, model) = seeded_model(&cfg, GlaMode::Chunk, device, 7);
        let x = Tensor::randint(VOCAB, [2, 100], (Kind::Int64, device));
        let reference = tch::no_grad(|| model.forward(&x));
        let logits = glatrain_shim::autocast::autocast(|| model.forward(&x));
        assert_eq!(logits.kind(), Kind::Float, "{name}: logits must be fp32");
        // Autocast rounds weights and activations at each matmul: the whole-model-cast test's
        // budget (~sqrt(12) * 2^-9 = 7e-3 for independent roundings) with 2x room.
        let err =
            (&logits - &reference).norm().double_value(&[]) / reference.norm().double_value(&[]);
        println!("{name}: bf16 autocast vs fp32 logits: relative RMS {err:.2e}");
        assert!(err <= 1.5e-2, "{name}: relative RMS {err:.2e}");

        let loss = logits
            .narrow(1, 0, 99)
            .reshape([-1, VOCAB])
            .cross_entropy_for_logits(&x.narrow(1, 1, 99).reshape([-1]));
        loss.backward();
        for (var, value) in vs.variables() {
            let grad = value.grad();
            assert!(grad.defined(), "{name}: {var} has no gradient");
            assert_eq!(grad.kind(), Kind::Float, "{name}: {var} gradient dtype");
            let finite = grad.isfinite().all().int64_value(&[]) == 1;
            assert!(finite, "{name}: {var} has a non-finite gradient");
        }
    }
}

#[test]
fn decoding_token_by_token_on_cuda_matches_the_full_sequence() {
    // The CUDA kernels on both paths: the whole sequence at once (GLA chunk, the scan over 100
    // tokens) and one token per call with the carried states (GLA fused_recurrent, the scan with
    // T = 1), in fp32; then a prefill followed by single steps.
    let Some(device) = glatrain_testing::cuda_or_skip() else {
        return;
    };
    let seq = 100;
    for (name, cfg) in zoo() {
        let (_vs, model) = seeded_model(&cfg, GlaMode::Chunk, device, 11);
        let x = Tensor::randint(VOCAB, [2, seq], (Kind::Int64, device));
        tch::no_grad(|| {
            let full = model.forward(&x);
            let stepped = step_through(&*model, &x, &mut model.new_cache(2));
            let err = (&stepped - &full).norm().double_value(&[]) / full.norm().double_value(&[]);
            println!("{name}: token by token vs full sequence on CUDA: relative RMS {err:.2e}");
            assert!(err <= 1e-4, "{name}: relative RMS {err:.2e}");
            // The check can fail: the last token without its history is off by far more than
            // the stepped one. (At this initialisation the history moves the logits little,
            // 5e-5 relative with short convolutions, so the margin is relative to the stepping
            // error, not absolute.)
            let want = full.select(1, seq - 1);
            let off = |y: &Tensor| (y - &want).norm().double_value(&[]);
            let forgetful = off(&model.forward(&x.narrow(1, seq - 1, 1)).squeeze_dim(1));
            let stepped_off = off(&stepped.select(1, seq - 1));
            assert!(
                forgetful > 100.0 * stepped_off && forgetful > 0.0,
                "{name}: history barely matters ({forgetful:.2e} without it, {stepped_off:.2e} stepped)"
            );

            let mut cache = model.new_cache(2);
            let mut pieces = vec![model.forward_cached(&x.narrow(1, 0, 70), &mut cache)];
            pieces.push(step_through(
                &*model,
                &x.narrow(1, 70, seq - 70),
                &mut cache,
            ));
            let pieces = Tensor::cat(&pieces, 1);
            let err = (&pieces - &full).norm().double_value(&[]) / full.norm().double_value(&[]);
            assert!(
                err <= 1e-5,
                "{name}: prefill + steps: relative RMS {err:.2e}"
            );
        });
    }
}

/// The mean next-token cross-entropy of `model` on `x` (fp32), under bf16 autocast if
/// `autocast`.
fn next_token_loss(model: &dyn CausalLm, x: &Tensor, autocast: bool) -> Tensor {
    let (b, t) = x.size2().unwrap();
    let forward = || model.forward(&x.narrow(1, 0, t - 1));
    let logits = if autocast {
        glatrain_shim::autocast::autocast(forward)
    } else {
        forward()
    };
    logits
        .to_kind(Kind::Float)
        .reshape([b * (t - 1), -1])
        .cross_entropy_for_logits(&x.narrow(1, 1, t - 1).reshape([-1]))
}

/// The bf16-autocast cross-entropy gradients of every parameter (sorted by name) of `model` on
/// `x` keeping what `mode` says, and the step's peak allocated bytes above what was held before.
fn checkpointed_step(
    vs: &nn::VarStore,
    model: &mut dyn CausalLm,
    mode: ActivationCheckpointing,
    x: &Tensor,
) -> (Vec<(String, Tensor)>, u64) {
    model.set_activation_checkpointing(mode);
    tch::Cuda::synchronize(0);
    let before = glatrain_shim::memory::stats(0).unwrap().allocated;
    glatrain_shim::memory::reset_peak(0).unwrap();
    next_token_loss(&*model, x, true).backward();
    tch::Cuda::synchronize(0);
    let peak = glatrain_shim::memory::stats(0).unwrap().peak_allocated - before;
    (take_gradients(vs), peak)
}

#[test]
fn checkpointing_on_cuda_keeps_the_gradients_and_less_memory() {
    let Some(device) = glatrain_testing::cuda_or_skip() else {
        return;
    };
    glatrain_shim::autocast::set_autocast_dtype(Kind::BFloat16).unwrap();
    for (name, cfg) in zoo() {
        let (vs, mut model) = seeded_model(&cfg, GlaMode::Chunk, device, 11);
        let x = Tensor::randint(VOCAB, [4, 1000], (Kind::Int64, device));
        let (plain, plain_peak) =
            checkpointed_step(&vs, model.as_mut(), ActivationCheckpointing::None, &x);
        // The same step twice: what run-to-run nondeterminism (atomics in backward kernels) is.
        let (again, _) = checkpointed_step(&vs, model.as_mut(), ActivationCheckpointing::None, &x);
        for mode in [
            ActivationCheckpointing::Selective,
            ActivationCheckpointing::Full,
        ] {
            let (got, peak) = checkpointed_step(&vs, model.as_mut(), mode, &x);
            for (((param, g), (_, want)), (_, repeat)) in got.iter().zip(&plain).zip(&again) {
                // Recomputation is the same computation: within the run-to-run noise, or (where
                // that is 0) within a bf16 rounding of the gradient.
                let noise = glatrain_testing::rel_rms(repeat, want);
                let err = glatrain_testing::rel_rms(g, want);
                assert!(
                    err <= (2.0 * noise).max(1e-2),
                    "{name} {mode:?}: {param}: relative RMS {err:.2e}, run-to-run {noise:.2e}"
                );
            }
            println!(
                "{name} {mode:?}: peak {:.1} MiB (plain {:.1} MiB)",
                peak as f64 / 1048576.0,
                plain_peak as f64 / 1048576.0
            );
            // Selective keeps the products of every layer and recomputes one: it only pays off
            // past a few layers; full keeps one tensor per layer.
            if mode == ActivationCheckpointing::Full {
                assert!(peak < plain_peak, "{name}: {peak} >= {plain_peak}");
            }
        }
    }
}

/// [`next_token_loss`] and the gradients it leaves ([`take_gradients`]).
fn loss_and_gradients(
    vs: &nn::VarStore,
    model: &dyn CausalLm,
    x: &Tensor,
    autocast: bool,
) -> (f64, Vec<(String, Tensor)>) {
    let loss = next_token_loss(model, x, autocast);
    loss.backward();
    (loss.double_value(&[]), take_gradients(vs))
}

#[test]
fn cuda_gradients_equal_the_cpu_reference_model() {
    // The whole model on the GPU (GLA's chunk kernels, the scan kernels, the fused norms and
    // SwiGLU) against the same weights on the CPU (tensor-op references): the loss and every
    // parameter's gradient, in fp32 (1e-4 relative RMS, the kernels' fp32 bound), and under bf16
    // autocast (within 3e-2: a few bf16 roundings of each product, far below what a wrong or
    // missing gradient term gives).
    let Some(device) = glatrain_testing::cuda_or_skip() else {
        return;
    };
    glatrain_shim::autocast::set_autocast_dtype(Kind::BFloat16).unwrap();
    for (name, cfg) in zoo() {
        let (cpu, cpu_model) = seeded_model(&cfg, GlaMode::Chunk, Device::Cpu, 5);
        let x = Tensor::randint(VOCAB, [2, 300], (Kind::Int64, Device::Cpu));
        let (want_loss, want) = loss_and_gradients(&cpu, cpu_model.as_ref(), &x, false);
        let mut gpu = nn::VarStore::new(device);
        let gpu_model = build(&gpu.root(), &cfg, GlaMode::Chunk).unwrap();
        gpu.copy(&cpu).unwrap();
        let xg = x.to_device(device);
        for (autocast, bound) in [(false, 1e-4), (true, 3e-2)] {
            let (loss, got) = loss_and_gradients(&gpu, gpu_model.as_ref(), &xg, autocast);
            let loss_err = (loss - want_loss).abs() / want_loss;
            println!("{name} (autocast {autocast}): loss {loss:.6} vs {want_loss:.6} on the CPU");
            assert!(loss_err <= bound, "{name}: loss off by {loss_err:.2e}");
            for ((param, g), (_, w)) in got.iter().zip(&want) {
                let err = glatrain_testing::rel_rms(&g.to_device(Device::Cpu), w);
                println!("  {param}: relative RMS {err:.2e}");
                assert!(
                    err <= bound,
                    "{name} (autocast {autocast}): {param}: {err:.2e}"
                );
            }
        }
    }
}
