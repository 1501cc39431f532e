//! Model-level properties on tiny CPU configs: causality, full-sequence logits == cached
//! decoding, finite gradients for every parameter, parameter counts, config errors, dtypes.

mod common;

use common::{seeded_model, step_through, take_gradients};
use glatrain_config::{
    ActivationCheckpointing, GlaConfig, GlaMode, MambaConfig, ModelConfig, TransformerConfig,
};
use glatrain_models::{build, count_parameters, CausalLm};
use tch::{nn, Device, Kind, Tensor};

const VOCAB: usize = 37;
/// Longer than the GLA reference's 64-token chunk and the scan's 16-step chunk.
const SEQ: i64 = 70;

fn gla(f: impl FnOnce(&mut GlaConfig)) -> ModelConfig {
    // hidden 32, 4 heads, expand_k 0.5: head_k_dim 4, head_v_dim 8. At the default init
    // (std 0.02) the short-convolved q, k, v are ~1e-3, the per-head norm's eps swamps the
    // attention output and the layer's contribution to the logits is ~1e-5: too small for
    // the decoding checks to see a broken state. A larger init makes it count.
    let mut c = GlaConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        initializer_range: 0.2,
        ..GlaConfig::default()
    };
    f(&mut c);
    ModelConfig::Gla(c)
}

fn transformer(f: impl FnOnce(&mut TransformerConfig)) -> ModelConfig {
    let mut c = TransformerConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: Some(2),
        ..TransformerConfig::default()
    };
    f(&mut c);
    ModelConfig::Transformer(c)
}

fn mamba(f: impl FnOnce(&mut MambaConfig)) -> ModelConfig {
    let mut c = MambaConfig {
        vocab_size: VOCAB,
        hidden_size: 16,
        num_layers: 2,
        d_state: 4,
        ..MambaConfig::default()
    };
    f(&mut c);
    ModelConfig::Mamba(c)
}

/// Every family, with the variants that change the code path.
fn zoo() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("gla", gla(|_| {})),
        ("gla+short_conv", gla(|c| c.use_short_conv = true)),
        (
            "gla-no-gate-untied",
            gla(|c| {
                c.use_short_conv = true;
                c.use_output_gate = false;
                c.tie_embeddings = false;
            }),
        ),
        (
            "gla-head_k_dim-1",
            gla(|c| {
                c.hidden_size = 16;
                c.num_heads = 8;
                c.gate_low_rank_dim = 3;
            }),
        ),
        ("transformer-gqa", transformer(|_| {})),
        (
            "transformer-mha-untied",
            transformer(|c| {
                c.num_kv_heads = None;
                c.tie_embeddings = false;
            }),
        ),
        ("mamba", mamba(|_| {})),
        ("mamba-untied", mamba(|c| c.tie_embeddings = false)),
    ]
}

fn make(cfg: &ModelConfig, mode: GlaMode) -> (nn::VarStore, Box<dyn CausalLm>) {
    seeded_model(cfg, mode, Device::Cpu, 7)
}

fn tokens(batch: i64, len: i64) -> Tensor {
    Tensor::randint(VOCAB as i64, [batch, len], (Kind::Int64, Device::Cpu))
}

/// ||a - b|| / ||b||.
fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).norm().double_value(&[]);
    diff / b.norm().double_value(&[])
}

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    for (name, cfg) in zoo() {
        let (_vs, model) = make(&cfg, GlaMode::Chunk);
        let x = tokens(2, SEQ);
        let t = 41;
        let y = x.copy();
        let _ = y
            .get(0)
            .get(t)
            .fill_((x.int64_value(&[0, t]) + 1) % VOCAB as i64);
        let (a, b) = tch::no_grad(|| (model.forward(&x), model.forward(&y)));
        assert_eq!(a.size(), [2, SEQ, VOCAB as i64], "{name}");
        let before = (a.narrow(1, 0, t) - b.narrow(1, 0, t))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            before <= 1e-6,
            "{name}: logits before t changed by {before}"
        );
        let at = (a.get(0).get(t) - b.get(0).get(t))
            .abs()
            .max()
            .double_value(&[]);
        assert!(at > 0.0, "{name}: the changed token has no effect");
        let other = (a.get(1) - b.get(1)).abs().max().double_value(&[]);
        assert_eq!(other, 0.0, "{name}: another sequence of the batch changed");
    }
}

#[test]
fn cached_decoding_matches_the_full_sequence() {
    for (name, cfg) in zoo() {
        let (_vs, model) = make(&cfg, GlaMode::Chunk);
        let x = tokens(2, SEQ);
        tch::no_grad(|| {
            let full = model.forward(&x);

            // Token by token from an empty cache.
            let mut cache = model.new_cache(2);
            let stepped = step_through(&*model, &x, &mut cache);
            assert_eq!(cache.len(), SEQ);
            let err = rel_rms(&stepped, &full);
            assert!(
                err <= 1e-4,
                "{name}: step-by-step vs full: relative RMS {err:.2e}"
            );
            // The check can fail: the last token without its history is far off.
            let last = model.forward(&x.narrow(1, SEQ - 1, 1)).squeeze_dim(1);
            let forgetful = rel_rms(&last, &full.select(1, SEQ - 1));
            assert!(
                forgetful > 1e-2,
                "{name}: history barely matters ({forgetful:.2e})"
            );

            // Prefill, a multi-token block after a past, then single steps.
            let mut cache = model.new_cache(2);
            let pieces = [
                model.forward_cached(&x.narrow(1, 0, 5), &mut cache),
                model.forward_cached(&x.narrow(1, 5, 7), &mut cache),
                model.forward_cached(&x.narrow(1, 12, SEQ - 14), &mut cache),
                model.step(&x.select(1, SEQ - 2), &mut cache).unsqueeze(1),
                model.step(&x.select(1, SEQ - 1), &mut cache).unsqueeze(1),
            ];
            let err = rel_rms(&Tensor::cat(&pieces, 1), &full);
            assert!(
                err <= 1e-4,
                "{name}: prefill + blocks + steps vs full: {err:.2e}"
            );
        });
    }
}

#[test]
fn kernel_modes_agree_on_the_reference() {
    let cfg = gla(|c| c.use_short_conv = true);
    let x = tokens(1, SEQ);
    let (vs, chunk) = make(&cfg, GlaMode::Chunk);
    // The same weights copied, not drawn again: tests running beside this one take numbers from
    // libtorch's global generator between a seed and a build.
    let (mut vs2, recurrent) = make(&cfg, GlaMode::FusedRecurrent);
    vs2.copy(&vs).unwrap();
    let (a, b) = tch::no_grad(|| (chunk.forward(&x), recurrent.forward(&x)));
    let err = rel_rms(&b, &a);
    assert!(
        err <= 1e-4,
        "fused_recurrent vs chunk: relative RMS {err:.2e}"
    );
}

#[test]
fn backward_gives_finite_nonzero_gradients_for_every_parameter() {
    for (name, cfg) in zoo() {
        let (vs, model) = make(&cfg, GlaMode::Chunk);
        let x = tokens(2, SEQ + 1);
        let logits = model.forward(&x.narrow(1, 0, SEQ));
        let targets = x.narrow(1, 1, SEQ);
        let loss = logits
            .reshape([-1, VOCAB as i64])
            .cross_entropy_for_logits(&targets.reshape([-1]));
        loss.backward();
        let mut names: Vec<_> = vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (var, value) in names {
            let grad = value.grad();
            assert!(grad.defined(), "{name}: {var} has no gradient");
            let finite = grad.isfinite().all().int64_value(&[]) == 1;
            assert!(finite, "{name}: {var} has a non-finite gradient");
            let norm = grad.norm().double_value(&[]);
            assert!(norm > 0.0, "{name}: {var} has an all-zero gradient");
        }
    }
}

#[test]
fn parameter_formula_matches_the_var_store() {
    let mut cases = zoo();
    cases.push((
        "gla-expand_v-2",
        gla(|c| {
            c.expand_v = 2.0;
            c.intermediate_size = Some(40);
            c.conv_size = 3;
            c.use_short_conv = true;
        }),
    ));
    cases.push((
        "mamba-dt_rank-5",
        mamba(|c| {
            c.dt_rank = Some(5);
            c.expand = 3;
            c.conv_size = 2;
        }),
    ));
    for (name, cfg) in cases {
        let (vs, _model) = make(&cfg, GlaMode::Chunk);
        assert_eq!(
            count_parameters(&vs) as u64,
            cfg.parameter_count(),
            "{name}"
        );
    }
}

/// Paper sizes, shapes as in DESIGN.md (vocab 32000, tied embeddings).
#[test]
fn published_sizes_from_the_design_shapes() {
    let gla = |hidden| {
        ModelConfig::Gla(GlaConfig {
            hidden_size: hidden,
            ..GlaConfig::default()
        })
    };
    let cases = [
        ("GLA-340M", gla(1024), 340e6),
        ("GLA-1.3B", gla(2048), 1.3e9),
        (
            "Transformer++-340M",
            ModelConfig::Transformer(TransformerConfig::default()),
            340e6,
        ),
    ];
    for (name, cfg, published) in cases {
        let n = cfg.parameter_count() as f64;
        println!(
            "{name}: {:.1}M parameters (published {:.0}M)",
            n / 1e6,
            published / 1e6
        );
        assert!(
            (n / published - 1.0).abs() <= 0.02,
            "{name}: {n} vs {published}"
        );
    }
    // Mamba-370M's published size has GPT-NeoX's 50280-token vocabulary.
    let mamba = ModelConfig::Mamba(MambaConfig {
        vocab_size: 50280,
        ..MambaConfig::default()
    });
    let n = mamba.parameter_count() as f64;
    println!("Mamba-370M (vocab 50280): {:.1}M parameters", n / 1e6);
    assert!((n / 370e6 - 1.0).abs() <= 0.02, "Mamba-370M: {n}");
}

/// `gla-340m` -> 340e6, `gla-1.3b` -> 1.3e9; None for names without a size (`gla-tiny`).
fn size_in_name(stem: &str) -> Option<f64> {
    let tag = stem.rsplit('-').next()?;
    let (number, unit) = tag.split_at(tag.len().checked_sub(1)?);
    let scale = match unit {
        "m" => 1e6,
        "b" => 1e9,
        _ => return None,
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

#[test]
fn shipped_configs_have_their_published_sizes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for path in entries {
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        let Some(model) = table.get("model") else {
            continue;
        };
        let cfg: ModelConfig = model.clone().try_into().unwrap();
        glatrain_models::validate(&cfg).unwrap();
        let n = cfg.parameter_count() as f64;
        let stem = path.file_stem().unwrap().to_string_lossy();
        match size_in_name(&stem) {
            Some(published) => {
                let off = n / published - 1.0;
                println!(
                    "{stem}: {:.1}M parameters ({:+.1}% of the name's size)",
                    n / 1e6,
                    off * 100.0
                );
                checked += 1;
                if off.abs() > 0.02 {
                    wrong.push(format!(
                        "{stem}: {:.1}M is {:+.1}% off",
                        n / 1e6,
                        off * 100.0
                    ));
                }
            }
            None => println!("{stem}: {:.3}M parameters", n / 1e6),
        }
    }
    assert!(
        checked > 0,
        "no sized config (like gla-340m.toml) in {}",
        dir.display()
    );
    assert!(
        wrong.is_empty(),
        "more than 2% from the size in the name: {wrong:?}"
    );
}

#[test]
fn impossible_shapes_name_the_key_and_value() {
    let cases = [
        (
            gla(|c| c.hidden_size = 30),
            "model.num_heads = 4: key_dim 15 (hidden_size 30 * expand_k 0.5) is not divisible by it",
        ),
        (
            gla(|c| c.expand_v = 0.5625),
            "model.num_heads = 4: value_dim 18 (hidden_size 32 * expand_v 0.5625) is not divisible by it",
        ),
        (gla(|c| c.expand_k = 0.0), "model.expand_k = 0: key_dim"),
        (gla(|c| c.vocab_size = 0), "model.vocab_size = 0: must be at least 1"),
        (gla(|c| c.gate_logit_normalizer = 0.0), "model.gate_logit_normalizer = 0"),
        (
            transformer(|c| c.num_heads = 5),
            "model.num_heads = 5: hidden_size 32 is not divisible by it",
        ),
        (transformer(|c| c.num_kv_heads = Some(3)), "model.num_kv_heads = 3"),
        (mamba(|c| c.dt_max = 1e-4), "model.dt_max = 0.0001: must be a number >= dt_min"),
        (mamba(|c| c.d_state = 0), "model.d_state = 0"),
    ];
    for (cfg, want) in cases {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = build(&vs.root(), &cfg, GlaMode::Reference)
            .err()
            .expect(want);
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with(want),
            "{err} does not start with {want}"
        );
    }
}

#[test]
fn whole_model_cast_to_bf16_runs_and_returns_fp32_logits() {
    // At the default init (std 0.02), where training starts: larger weights have larger gain
    // and amplify rounding (std 0.2 gives ~2e-2 for every family).
    let default_init = GlaConfig::default().initializer_range;
    for (name, cfg) in [
        ("gla", gla(|c| c.initializer_range = default_init)),
        (
            "gla+short_conv",
            gla(|c| {
                c.use_short_conv = true;
                c.initializer_range = default_init;
            }),
        ),
        ("transformer", transformer(|_| {})),
        ("mamba", mamba(|_| {})),
    ] {
        let (mut vs, model) = make(&cfg, GlaMode::Chunk);
        // The fp32 reference runs on the bf16-rounded weights, so only the rounding of
        // activations separates the two.
        tch::no_grad(|| {
            for mut w in vs.trainable_variables() {
                let rounded = w.to_kind(Kind::BFloat16).to_kind(Kind::Float);
                w.copy_(&rounded);
            }
        });
        let x = tokens(2, 20);
        let reference = tch::no_grad(|| model.forward(&x));
        vs.bfloat16();
        let logits = tch::no_grad(|| model.forward(&x));
        assert_eq!(logits.kind(), Kind::Float, "{name}");
        // Each of the ~12 bf16 roundings between tokens and logits (projections, norms,
        // residual adds, per layer) errs by at most 2^-9 relative; independent errors add in
        // quadrature to ~sqrt(12) * 2^-9 = 7e-3. Measured: 3e-3 to 6e-3.
        let err = rel_rms(&logits, &reference);
        assert!(
            err <= 1.5e-2,
            "{name}: bf16 vs fp32 logits: relative RMS {err:.2e}"
        );
    }
}

/// The gradients of every parameter (sorted by name) for one cross-entropy backward of `x`,
/// the model keeping what `mode` says; leaves the gradients cleared.
fn gradients(
    vs: &nn::VarStore,
    model: &mut dyn CausalLm,
    mode: ActivationCheckpointing,
    x: &Tensor,
) -> Vec<(String, Tensor)> {
    model.set_activation_checkpointing(mode);
    let logits = model.forward(&x.narrow(1, 0, SEQ - 1));
    let targets = x.narrow(1, 1, SEQ - 1).reshape([-1]);
    logits
        .reshape([-1, VOCAB as i64])
        .cross_entropy_for_logits(&targets)
        .backward();
    take_gradients(vs)
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones_bit_for_bit() {
    for (name, cfg) in zoo() {
        let (vs, mut model) = make(&cfg, GlaMode::Chunk);
        let x = tokens(2, SEQ);
        let plain = gradients(&vs, model.as_mut(), ActivationCheckpointing::None, &x);
        for mode in [
            ActivationCheckpointing::Full,
            ActivationCheckpointing::Selective,
        ] {
            let got = gradients(&vs, model.as_mut(), mode, &x);
            for ((param, g), (_, want)) in got.iter().zip(&plain) {
                assert!(
                    want.abs().max().double_value(&[]) > 0.0,
                    "{name}: {param} has no gradient"
                );
                assert!(g.equal(want), "{name} {mode:?}: {param} differs");
            }
        }
    }
}
