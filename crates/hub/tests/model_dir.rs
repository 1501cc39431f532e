//! Model directories end to end on tiny models of every type: export then import gives the
//! same weights bit for bit, and every way a directory can disagree with the model is refused
//! with the key or tensor and both values.

use glatrain_fs::sorted_names;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use glatrain_config::{GlaConfig, GlaMode, MambaConfig, ModelConfig, TransformerConfig};
use glatrain_hub::{write_model_dir, Dtype, Export, HubError, ModelDir};
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// One tiny model per type, with the less common options on: GLA untied with the short
/// convolution, Transformer++ tied with grouped-query attention, Mamba untied.
fn models() -> Vec<ModelConfig> {
    vec![
        ModelConfig::Gla(GlaConfig {
            vocab_size: 40,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 2,
            intermediate_size: Some(48),
            use_short_conv: true,
            tie_embeddings: false,
            ..GlaConfig::default()
        }),
        ModelConfig::Transformer(TransformerConfig {
            vocab_size: 40,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: Some(2),
            intermediate_size: Some(48),
            ..TransformerConfig::default()
        }),
        ModelConfig::Mamba(MambaConfig {
            vocab_size: 40,
            hidden_size: 32,
            num_layers: 2,
            d_state: 4,
            tie_embeddings: false,
            ..MambaConfig::default()
        }),
    ]
}

fn gla() -> ModelConfig {
    models().remove(0)
}

/// A freshly initialised model's VarStore.
fn build(model: &ModelConfig) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    glatrain_models::build(&vs.root(), model, GlaMode::Reference).unwrap();
    vs
}

fn weights(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

/// Exports a freshly initialised `model` to `out` as `dtype`: its weights and the files written.
fn export(model: &ModelConfig, out: &Path, dtype: Dtype) -> (VarStore, Vec<&'static str>) {
    let vs = build(model);
    let w = weights(&vs);
    let e = Export {
        model,
        seq_len: 64,
        weights: &w,
        dtype,
        tokenizer: None,
    };
    let files = write_model_dir(out, &e, false).unwrap();
    (vs, files)
}

fn import(model: &ModelConfig, dir: &Path) -> Result<VarStore, HubError> {
    let vs = build(model);
    let hf = ModelDir::open(dir)?;
    hf.check_config(model)?;
    hf.load_into(&vs)?;
    Ok(vs)
}

fn bit_identical(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind() && a.size() == b.size() && a.equal(b)
}

fn names_in(file: &Path) -> Vec<String> {
    let mut names: Vec<String> = Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    names
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn export_then_import_gives_the_same_weights_bit_for_bit() {
    for model in models() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("hf");
        let (src, files) = export(&model, &out, Dtype::Fp32);
        assert_eq!(
            files,
            ["config.json", "generation_config.json", "model.safetensors"]
        );
        assert_eq!(
            sorted_names(tmp.path()).unwrap(),
            ["hf"],
            "nothing temporary is left"
        );
        let dst = build(&model);
        let (a, b) = (weights(&src), weights(&dst));
        assert!(
            a.iter().any(|(name, t)| !bit_identical(t, &b[name])),
            "two initialisations differ, so the import below has something to do"
        );
        let dst = import(&model, &out).unwrap_or_else(|e| panic!("{e}"));
        let b = weights(&dst);
        assert_eq!(a.len(), b.len());
        for (name, t) in &a {
            assert!(bit_identical(t, &b[name]), "{}: {name}", model.type_name());
        }
    }
}

#[test]
fn files_carry_the_class_names() {
    let tmp = tempfile::tempdir().unwrap();
    let [gla, transformer, mamba] = <[ModelConfig; 3]>::try_from(models()).unwrap();
    let cases: [(&ModelConfig, &str, &[&str], &[&str]); 3] = [
        (
            &gla,
            "GLAForCausalLM",
            &[
                "lm_head.weight",
                "model.embeddings.weight",
                "model.layers.1.attn.g_norm_swish_gate.weight",
                "model.layers.1.attn.q_conv1d.weight",
                "model.layers.1.attn.gk_proj.1.bias",
                "model.layers.1.attn_norm.weight",
            ],
            &[],
        ),
        (
            &transformer,
            "LlamaForCausalLM",
            &[
                "model.embed_tokens.weight",
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.self_attn.k_proj.weight",
                "model.layers.1.post_attention_layernorm.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ],
            &["lm_head.weight", "model.embeddings.weight"],
        ),
        (
            &mamba,
            "MambaForCausalLM",
            &[
                "lm_head.weight",
                "backbone.embeddings.weight",
                "backbone.layers.1.mixer.A_log",
                "backbone.layers.1.mixer.D",
                "backbone.layers.1.mixer.conv1d.bias",
                "backbone.norm_f.weight",
            ],
            &[],
        ),
    ];
    for (model, architecture, present, absent) in cases {
        let out = tmp.path().join(model.type_name());
        export(model, &out, Dtype::Fp32);
        let config = read_json(&out.join("config.json"));
        assert_eq!(config["architectures"][0], architecture);
        let names = names_in(&out.join("model.safetensors"));
        for name in present {
            assert!(names.iter().any(|n| n == name), "{architecture}: {name}");
        }
        for name in absent {
            assert!(!names.iter().any(|n| n == name), "{architecture}: {name}");
        }
        let generation = read_json(&out.join("generation_config.json"));
        assert_eq!(generation["eos_token_id"], Value::Null);
    }
}

#[test]
fn half_precision_exports_round_the_master_weights() {
    let model = gla();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let (src, _) = export(&model, &out, Dtype::Bf16);
    assert_eq!(read_json(&out.join("config.json"))["dtype"], "bfloat16");
    let stored = Tensor::read_safetensors(out.join("model.safetensors")).unwrap();
    assert!(stored.iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let dst = import(&model, &out).unwrap();
    let (a, b) = (weights(&src), weights(&dst));
    for (name, t) in &a {
        let rounded = t.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert!(bit_identical(&rounded, &b[name]), "{name}");
    }
}

/// Exports the tiny GLA model and returns the directory.
fn exported_gla(tmp: &Path) -> PathBuf {
    let out = tmp.join("hf");
    export(&gla(), &out, Dtype::Fp32);
    out
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config = read_json(&path);
    edit(config.as_object_mut().unwrap());
    fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut tensors);
    let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&list, &path).unwrap();
}

#[track_caller]
fn assert_refused(result: Result<VarStore, HubError>, expected: &[&str]) {
    let err = result.expect_err("the import must be refused");
    assert!(err.is_bad_input(), "{err}");
    let msg = err.to_string();
    for part in expected {
        assert!(msg.contains(part), "{msg}\nexpected: {part}");
    }
}

#[test]
fn a_changed_config_key_is_named_with_both_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = exported_gla(tmp.path());
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), 64.into());
        c.insert("tie_word_embeddings".into(), true.into());
    });
    assert_refused(
        import(&gla(), &dir),
        &[
            "config.json does not match the run's [model]",
            "hidden_size = 64, but model.hidden_size = 32",
            "tie_word_embeddings = true, but model.tie_embeddings = false",
        ],
    );
    let transformer = models().remove(1);
    assert_refused(
        import(&transformer, &dir),
        &["model_type = \"gla\", but model.type = \"transformer\" needs model_type \"llama\""],
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = exported_gla(tmp.path());
    let name = "model.layers.0.attn.q_proj.weight";
    edit_weights(&dir, |w| {
        w.insert(
            name.into(),
            Tensor::zeros([8, 32], (Kind::Float, Device::Cpu)),
        );
    });
    assert_refused(
        import(&gla(), &dir),
        &[
            "model.safetensors: tensor `model.layers.0.attn.q_proj.weight` has shape [8, 32], \
             the model's is [16, 32]",
        ],
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = exported_gla(tmp.path());
    edit_weights(&dir, |w| {
        w.remove("model.norm.weight");
    });
    assert_refused(
        import(&gla(), &dir),
        &["model.safetensors: no tensor `model.norm.weight` (shape [32]), which the model needs"],
    );
    let dir = tmp.path().join("extra");
    export(&gla(), &dir, Dtype::Fp32);
    edit_weights(&dir, |w| {
        w.insert(
            "model.layers.0.attn.extra.weight".into(),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
    });
    assert_refused(
        import(&gla(), &dir),
        &["tensor `model.layers.0.attn.extra.weight` (shape [3]) is not a parameter of the model"],
    );
}

#[test]
fn a_tied_head_stored_anyway_must_equal_the_embedding() {
    let model = models().remove(1); // tied
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let (src, _) = export(&model, &dir, Dtype::Fp32);
    edit_weights(&dir, |w| {
        let head = w["model.embed_tokens.weight"].copy();
        w.insert("lm_head.weight".into(), head);
    });
    let dst = import(&model, &dir).unwrap();
    assert!(bit_identical(
        &weights(&src)["model.embeddings.weight"],
        &weights(&dst)["model.embeddings.weight"]
    ));
    edit_weights(&dir, |w| {
        w.insert(
            "lm_head.weight".into(),
            Tensor::zeros([40, 32], (Kind::Float, Device::Cpu)),
        );
    });
    assert_refused(
        import(&model, &dir),
        &["tensor `lm_head.weight` (shape [40, 32]) is not a parameter"],
    );
}

#[test]
fn split_weights_and_flas_unfused_norm_names_are_read() {
    let model = gla();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let (src, _) = export(&model, &dir, Dtype::Fp32);
    // Two files and an index, as large published models come; the unfused norm's name.
    let all: Vec<(String, Tensor)> = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n.replace("g_norm_swish_gate", "g_norm"), t))
        .collect();
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for (part, chunk) in all.chunks(all.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", part + 1);
        Tensor::write_safetensors(chunk, dir.join(&file)).unwrap();
        for (name, _) in chunk {
            map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    edit_config(&dir, |c| {
        c.insert("fuse_norm".into(), false.into());
    });
    let dst = import(&model, &dir).unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (weights(&src), weights(&dst));
    for (name, t) in &a {
        assert!(bit_identical(t, &b[name]), "{name}");
    }
}

#[test]
fn the_target_is_never_overwritten_by_accident() {
    let model = gla();
    let vs = build(&model);
    let w = weights(&vs);
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tmp.path().join("tokenizer.json");
    fs::write(&tokenizer, b"{\"model\": {}}").unwrap();
    let e = Export {
        model: &model,
        seq_len: 64,
        weights: &w,
        dtype: Dtype::Fp32,
        tokenizer: Some(&tokenizer),
    };
    let out = tmp.path().join("out");
    let files = write_model_dir(&out, &e, false).unwrap();
    assert!(files.contains(&"tokenizer.json") && files.contains(&"tokenizer_config.json"));
    assert_eq!(
        fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"model\": {}}"
    );
    let tokenizer_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tokenizer_config["model_max_length"], 64);
    assert_eq!(
        tokenizer_config["tokenizer_class"],
        "PreTrainedTokenizerFast"
    );

    let err = write_model_dir(&out, &e, false).unwrap_err();
    assert!(matches!(err, HubError::OutputExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    write_model_dir(&out, &e, true).unwrap();

    let other = tmp.path().join("notes");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("keep.txt"), b"mine").unwrap();
    let err = write_model_dir(&other, &e, true).unwrap_err();
    assert!(matches!(err, HubError::NotAModelDir { .. }), "{err}");
    assert_eq!(fs::read(other.join("keep.txt")).unwrap(), b"mine");

    let unexportable = ModelConfig::Gla(GlaConfig {
        gate_low_rank_dim: 8,
        ..GlaConfig::default()
    });
    let refused = Export {
        model: &unexportable,
        ..e
    };
    let err = write_model_dir(&tmp.path().join("never"), &refused, false).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert_eq!(
        sorted_names(tmp.path()).unwrap(),
        ["notes", "out", "tokenizer.json"],
        "a refused export writes nothing"
    );
}
