//! `config.json`: a glatrain `[model]` table written as its Hugging Face class's config, and a
//! class's config read back as a `[model]` table.
//!
//! [`to_json`] writes every key the class reads. [`from_json`] reads a file with the class's own
//! defaults for the keys it leaves out and refuses settings that glatrain's model of that type
//! does not have (biases, RoPE scaling, hybrid attention layers, ...). [`differences`] lists
//! the keys that fix shapes and function where a file and a run's config disagree;
//! initialisation-only keys (`initializer_range`, Mamba's `dt_*`) are carried over but never
//! compared.

use std::path::Path;

use glatrain_config::{GlaConfig, MambaConfig, ModelConfig, TransformerConfig};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::dtype::Dtype;
use crate::error::{HubError, Mismatch};

/// A `transformers` model class: `config.json`'s `model_type` and `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfClass {
    pub model_type: &'static str,
    pub architecture: &'static str,
}

/// flash-linear-attention's GLA (`pip install flash-linear-attention`, then `import fla`).
pub const GLA: HfClass = HfClass {
    model_type: "gla",
    architecture: "GLAForCausalLM",
};
/// Transformer++ is LLaMA's architecture.
pub const LLAMA: HfClass = HfClass {
    model_type: "llama",
    architecture: "LlamaForCausalLM",
};
pub const MAMBA: HfClass = HfClass {
    model_type: "mamba",
    architecture: "MambaForCausalLM",
};

/// The class a glatrain model type is exported as.
pub fn class_of(model: &ModelConfig) -> HfClass {
    match model {
        ModelConfig::Gla(_) => GLA,
        ModelConfig::Transformer(_) => LLAMA,
        ModelConfig::Mamba(_) => MAMBA,
    }
}

/// fla's `GatedLinearAttention` layer has its own defaults for these, and `GLAConfig` does not
/// pass the keys on: every fla GLA model has this gate rank and normalizer.
pub const FLA_GATE_LOW_RANK_DIM: usize = 16;
pub const FLA_GATE_LOGIT_NORMALIZER: f64 = 16.0;

/// `config.json` of `model` trained at context `seq_len` (`max_position_embeddings`), its
/// weights stored as `dtype`. Token ids (`bos`, `eos`, `pad`) are null: glatrain trains on
/// plain token streams. A GLA model whose gate differs from fla's fixed one is refused.
pub fn to_json(model: &ModelConfig, seq_len: usize, dtype: Dtype) -> Result<Value, HubError> {
    let class = class_of(model);
    let mut config = match model {
        ModelConfig::Gla(m) => gla_json(m, seq_len)?,
        ModelConfig::Transformer(m) => llama_json(m, seq_len),
        ModelConfig::Mamba(m) => mamba_json(m),
    };
    let common = json!({
        "architectures": [class.architecture],
        "model_type": class.model_type,
        "dtype": dtype.torch_name(),
        // The name before transformers 5, for older readers.
        "torch_dtype": dtype.torch_name(),
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "use_cache": true,
    });
    let object = config
        .as_object_mut()
        .expect("the class configs are JSON objects");
    for (key, value) in common.as_object().expect("a JSON object") {
        object.insert(key.clone(), value.clone());
    }
    Ok(config)
}

fn gla_json(m: &GlaConfig, seq_len: usize) -> Result<Value, HubError> {
    let fixed = |key: &'static str, value: String, fla: String| HubError::NotExportable {
        key,
        value,
        reason: format!(
            "fla's GLAForCausalLM always uses {fla} (its GLAConfig does not pass {key} to the \
             layer), so the export would compute another function"
        ),
    };
    if m.gate_low_rank_dim != FLA_GATE_LOW_RANK_DIM {
        return Err(fixed(
            "gate_low_rank_dim",
            m.gate_low_rank_dim.to_string(),
            FLA_GATE_LOW_RANK_DIM.to_string(),
        ));
    }
    if m.gate_logit_normalizer != FLA_GATE_LOGIT_NORMALIZER {
        return Err(fixed(
            "gate_logit_normalizer",
            m.gate_logit_normalizer.to_string(),
            FLA_GATE_LOGIT_NORMALIZER.to_string(),
        ));
    }
    Ok(json!({
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_heads": m.num_heads,
        "num_kv_heads": null,
        "expand_k": m.expand_k,
        "expand_v": m.expand_v,
        "hidden_ratio": 4,
        "intermediate_size": m.mlp_size(),
        "attn_mode": "chunk",
        "feature_map": null,
        "use_short_conv": m.use_short_conv,
        "conv_size": m.conv_size,
        "use_output_gate": m.use_output_gate,
        "clamp_min": null,
        "hidden_act": "swish",
        "gate_fn": "swish",
        "elementwise_affine": true,
        "norm_eps": m.norm_eps,
        // Written for readers; fla's layer uses its fixed values, which these equal.
        "gate_low_rank_dim": m.gate_low_rank_dim,
        "gate_logit_normalizer": m.gate_logit_normalizer,
        "use_gk": true,
        "use_gv": false,
        "attn": null,
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.initializer_range,
        // fuse_norm names the gated output norm `g_norm_swish_gate`, as glatrain does; the
        // fused norms and SwiGLU are fla's Triton kernels of the same functions. The loss is
        // PyTorch's plain cross-entropy.
        "fuse_norm": true,
        "fuse_swiglu": true,
        "fuse_cross_entropy": false,
        "fuse_linear_cross_entropy": false,
        "use_l2warp": false,
    }))
}

fn llama_json(m: &TransformerConfig, seq_len: usize) -> Value {
    json!({
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.mlp_size(),
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": m.norm_eps,
        // transformers 5 reads rope_parameters, earlier versions rope_theta.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.initializer_range,
    })
}

fn mamba_json(m: &MambaConfig) -> Value {
    json!({
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "state_size": m.d_state,
        "num_hidden_layers": m.num_layers,
        "expand": m.expand,
        "intermediate_size": m.d_inner(),
        "conv_kernel": m.conv_size,
        "time_step_rank": m.dt_rank(),
        "use_bias": false,
        "use_conv_bias": true,
        "hidden_act": "silu",
        "layer_norm_epsilon": m.norm_eps,
        // glatrain's residual stream is fp32 under autocast.
        "residual_in_fp32": true,
        "initializer_range": m.initializer_range,
        "time_step_scale": 1.0,
        "time_step_min": m.dt_min,
        "time_step_max": m.dt_max,
        "time_step_init_scheme": "random",
        "time_step_floor": m.dt_init_floor,
        // Off although glatrain initialises out_proj rescaled: transformers applies the rescaling
        // to loaded weights too (seen in 5.25), which would change the model.
        "rescale_prenorm_residual": false,
        "tie_word_embeddings": m.tie_embeddings,
    })
}

/// The `[model]` table `json` (the contents of `path`) describes: shapes and function from the
/// file, keys it leaves out at its class's defaults. Settings glatrain's model of that type
/// does not have are refused, naming the key and its value.
pub fn from_json(json: &Value, path: &Path) -> Result<ModelConfig, HubError> {
    let model_type = json
        .get("model_type")
        .ok_or_else(|| HubError::json(path, "no model_type key"))?;
    match model_type.as_str() {
        Some("gla") => read_gla(json, path).map(ModelConfig::Gla),
        Some("llama") => read_llama(json, path).map(ModelConfig::Transformer),
        Some("mamba") => read_mamba(json, path).map(ModelConfig::Mamba),
        _ => Err(HubError::Unsupported {
            path: path.to_path_buf(),
            key: "model_type",
            value: model_type.to_string(),
            reason: "glatrain reads \"gla\" (fla's GLAForCausalLM), \"llama\" and \"mamba\"".into(),
        }),
    }
}

fn parse<T: DeserializeOwned>(json: &Value, path: &Path) -> Result<T, HubError> {
    T::deserialize(json).map_err(|e| HubError::json(path, e))
}

/// Refuses `key = value` unless `supported`.
fn require(
    supported: bool,
    path: &Path,
    key: &'static str,
    value: impl serde::Serialize,
    reason: &str,
) -> Result<(), HubError> {
    if supported {
        return Ok(());
    }
    Err(HubError::Unsupported {
        path: path.to_path_buf(),
        key,
        value: serde_json::to_string(&value).expect("config values serialize"),
        reason: reason.to_string(),
    })
}

/// fla's `GLAConfig`, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct GlaJson {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_heads: usize,
    num_kv_heads: Option<usize>,
    expand_k: f64,
    expand_v: f64,
    hidden_ratio: Option<f64>,
    intermediate_size: Option<usize>,
    feature_map: Option<String>,
    use_short_conv: bool,
    conv_size: usize,
    use_output_gate: bool,
    clamp_min: Option<f64>,
    hidden_act: String,
    elementwise_affine: Option<bool>,
    norm_eps: f64,
    tie_word_embeddings: bool,
    initializer_range: f64,
    fuse_norm: bool,
    attn: Option<Value>,
    attnres_block_size: Option<u64>,
    gate_low_rank_dim: Option<usize>,
    gate_logit_normalizer: Option<f64>,
}

impl Default for GlaJson {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 2048,
            num_hidden_layers: 24,
            num_heads: 4,
            num_kv_heads: None,
            expand_k: 0.5,
            expand_v: 1.0,
            hidden_ratio: Some(4.0),
            intermediate_size: None,
            feature_map: None,
            use_short_conv: false,
            conv_size: 4,
            use_output_gate: true,
            clamp_min: None,
            hidden_act: "swish".into(),
            elementwise_affine: Some(true),
            norm_eps: 1e-6,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            fuse_norm: true,
            attn: None,
            attnres_block_size: None,
            gate_low_rank_dim: None,
            gate_logit_normalizer: None,
        }
    }
}

/// Whether a GLA `config.json` names its gated output norm `g_norm` (fla's unfused form).
pub fn gla_norm_unfused(json: &Value) -> bool {
    let flag = |key: &str, default: bool| json.get(key).and_then(Value::as_bool).unwrap_or(default);
    flag("use_output_gate", true) && !flag("fuse_norm", true)
}

fn read_gla(json: &Value, path: &Path) -> Result<GlaConfig, HubError> {
    let g: GlaJson = parse(json, path)?;
    require(
        g.num_kv_heads.is_none_or(|k| k == g.num_heads),
        path,
        "num_kv_heads",
        g.num_kv_heads,
        "glatrain's GLA has as many key/value heads as heads",
    )?;
    require(
        g.feature_map.is_none(),
        path,
        "feature_map",
        &g.feature_map,
        "glatrain's GLA applies no feature map to q and k",
    )?;
    require(
        g.clamp_min.is_none(),
        path,
        "clamp_min",
        g.clamp_min,
        "glatrain's GLA does not clamp the forget gate",
    )?;
    require(
        g.hidden_act == "swish",
        path,
        "hidden_act",
        &g.hidden_act,
        "glatrain's GLA uses swish for the output gate and the MLP",
    )?;
    require(
        g.elementwise_affine == Some(true),
        path,
        "elementwise_affine",
        g.elementwise_affine,
        "glatrain's norms have weights",
    )?;
    require(
        g.attn.is_none(),
        path,
        "attn",
        &g.attn,
        "glatrain's GLA has no softmax-attention layers",
    )?;
    require(
        g.attnres_block_size.is_none(),
        path,
        "attnres_block_size",
        g.attnres_block_size,
        "glatrain's GLA has plain residual connections",
    )?;
    require(
        g.gate_low_rank_dim
            .is_none_or(|r| r == FLA_GATE_LOW_RANK_DIM),
        path,
        "gate_low_rank_dim",
        g.gate_low_rank_dim,
        "fla's GLAForCausalLM ignores this key and uses 16: the file is ambiguous",
    )?;
    require(
        g.gate_logit_normalizer
            .is_none_or(|n| n == FLA_GATE_LOGIT_NORMALIZER),
        path,
        "gate_logit_normalizer",
        g.gate_logit_normalizer,
        "fla's GLAForCausalLM ignores this key and uses 16: the file is ambiguous",
    )?;
    // fla's GatedMLP: int(hidden * ratio * 2 / 3), rounded up to a multiple of 256.
    let intermediate = g.intermediate_size.unwrap_or_else(|| {
        let ratio = g.hidden_ratio.unwrap_or(4.0);
        ((g.hidden_size as f64 * ratio * 2.0 / 3.0) as usize).div_ceil(256) * 256
    });
    Ok(GlaConfig {
        vocab_size: g.vocab_size,
        hidden_size: g.hidden_size,
        num_layers: g.num_hidden_layers,
        num_heads: g.num_heads,
        expand_k: g.expand_k,
        expand_v: g.expand_v,
        intermediate_size: Some(intermediate),
        gate_low_rank_dim: FLA_GATE_LOW_RANK_DIM,
        gate_logit_normalizer: FLA_GATE_LOGIT_NORMALIZER,
        use_short_conv: g.use_short_conv,
        conv_size: g.conv_size,
        use_output_gate: g.use_output_gate,
        norm_eps: g.norm_eps,
        tie_embeddings: g.tie_word_embeddings,
        initializer_range: g.initializer_range,
        init_from: None,
    })
}

/// `LlamaConfig`, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct LlamaJson {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: String,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeJson>,
    rope_scaling: Option<RopeJson>,
    attention_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
    initializer_range: f64,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (earlier, with `type` or `rope_type`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RopeJson {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
}

impl RopeJson {
    fn is_default(&self) -> bool {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .is_none_or(|t| t == "default")
    }
}

impl Default for LlamaJson {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            initializer_range: 0.02,
        }
    }
}

/// `transformers`' RoPE base when a config gives none.
const LLAMA_DEFAULT_ROPE_THETA: f64 = 10000.0;

fn read_llama(json: &Value, path: &Path) -> Result<TransformerConfig, HubError> {
    let l: LlamaJson = parse(json, path)?;
    let no_scaling = "glatrain's Transformer++ has plain RoPE (rope_type \"default\")";
    for (key, rope) in [
        ("rope_parameters", &l.rope_parameters),
        ("rope_scaling", &l.rope_scaling),
    ] {
        if let Some(rope) = rope {
            require(rope.is_default(), path, key, &json[key], no_scaling)?;
        }
    }
    require(
        l.hidden_act == "silu",
        path,
        "hidden_act",
        &l.hidden_act,
        "glatrain's Transformer++ uses SwiGLU (silu)",
    )?;
    require(
        !l.attention_bias,
        path,
        "attention_bias",
        l.attention_bias,
        "glatrain's Transformer++ has no biases",
    )?;
    require(
        !l.mlp_bias,
        path,
        "mlp_bias",
        l.mlp_bias,
        "glatrain's Transformer++ has no biases",
    )?;
    let heads = l.num_attention_heads.max(1);
    require(
        l.head_dim.is_none_or(|d| d * heads == l.hidden_size),
        path,
        "head_dim",
        l.head_dim,
        &format!(
            "glatrain's Transformer++ has head_dim = hidden_size {} / num_attention_heads {}",
            l.hidden_size, l.num_attention_heads
        ),
    )?;
    let rope_theta = l
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_theta)
        .or(l.rope_theta)
        .unwrap_or(LLAMA_DEFAULT_ROPE_THETA);
    Ok(TransformerConfig {
        vocab_size: l.vocab_size,
        hidden_size: l.hidden_size,
        num_layers: l.num_hidden_layers,
        num_heads: l.num_attention_heads,
        num_kv_heads: Some(l.num_key_value_heads.unwrap_or(l.num_attention_heads)),
        intermediate_size: Some(l.intermediate_size),
        rope_theta,
        norm_eps: l.rms_norm_eps,
        tie_embeddings: l.tie_word_embeddings,
        initializer_range: l.initializer_range,
        init_from: None,
    })
}

/// `MambaConfig`, with its defaults.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct MambaJson {
    vocab_size: usize,
    hidden_size: usize,
    state_size: usize,
    num_hidden_layers: usize,
    layer_norm_epsilon: f64,
    expand: usize,
    conv_kernel: usize,
    use_bias: bool,
    use_conv_bias: bool,
    hidden_act: String,
    initializer_range: f64,
    time_step_rank: TimeStepRank,
    time_step_min: f64,
    time_step_max: f64,
    time_step_floor: f64,
    tie_word_embeddings: bool,
}

/// `time_step_rank`: a number or "auto" (ceil(hidden_size / 16)).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TimeStepRank {
    Fixed(usize),
    Named(String),
}

impl Default for MambaJson {
    fn default() -> Self {
        Self {
            vocab_size: 50280,
            hidden_size: 768,
            state_size: 16,
            num_hidden_layers: 32,
            layer_norm_epsilon: 1e-5,
            expand: 2,
            conv_kernel: 4,
            use_bias: false,
            use_conv_bias: true,
            hidden_act: "silu".into(),
            initializer_range: 0.1,
            time_step_rank: TimeStepRank::Named("auto".into()),
            time_step_min: 0.001,
            time_step_max: 0.1,
            time_step_floor: 1e-4,
            tie_word_embeddings: true,
        }
    }
}

fn read_mamba(json: &Value, path: &Path) -> Result<MambaConfig, HubError> {
    let m: MambaJson = parse(json, path)?;
    require(
        !m.use_bias,
        path,
        "use_bias",
        m.use_bias,
        "glatrain's Mamba has no in_proj/out_proj biases",
    )?;
    require(
        m.use_conv_bias,
        path,
        "use_conv_bias",
        m.use_conv_bias,
        "glatrain's Mamba convolution has a bias",
    )?;
    require(
        m.hidden_act == "silu",
        path,
        "hidden_act",
        &m.hidden_act,
        "glatrain's Mamba uses silu",
    )?;
    let dt_rank = match &m.time_step_rank {
        TimeStepRank::Fixed(rank) => *rank,
        TimeStepRank::Named(name) if name == "auto" => m.hidden_size.div_ceil(16),
        TimeStepRank::Named(name) => {
            return Err(HubError::json(
                path,
                format!("time_step_rank = {name:?}: expected a number or \"auto\""),
            ))
        }
    };
    Ok(MambaConfig {
        vocab_size: m.vocab_size,
        hidden_size: m.hidden_size,
        num_layers: m.num_hidden_layers,
        d_state: m.state_size,
        expand: m.expand,
        conv_size: m.conv_kernel,
        dt_rank: Some(dt_rank),
        dt_min: m.time_step_min,
        dt_max: m.time_step_max,
        dt_init_floor: m.time_step_floor,
        norm_eps: m.layer_norm_epsilon,
        tie_embeddings: m.tie_word_embeddings,
        initializer_range: m.initializer_range,
        init_from: None,
    })
}

/// One key that fixes shapes or function: its `[model]` name, its `config.json` name, its value.
type Field = (&'static str, &'static str, Value);

/// The keys of `model` that fix its shapes and function (derived values resolved).
fn function_fields(model: &ModelConfig) -> Vec<Field> {
    match model {
        ModelConfig::Gla(m) => {
            let mut fields = vec![
                ("vocab_size", "vocab_size", json!(m.vocab_size)),
                ("hidden_size", "hidden_size", json!(m.hidden_size)),
                ("num_layers", "num_hidden_layers", json!(m.num_layers)),
                ("num_heads", "num_heads", json!(m.num_heads)),
                ("expand_k", "expand_k", json!(m.expand_k)),
                ("expand_v", "expand_v", json!(m.expand_v)),
                (
                    "intermediate_size",
                    "intermediate_size",
                    json!(m.mlp_size()),
                ),
                (
                    "gate_low_rank_dim",
                    "gate_low_rank_dim",
                    json!(m.gate_low_rank_dim),
                ),
                (
                    "gate_logit_normalizer",
                    "gate_logit_normalizer",
                    json!(m.gate_logit_normalizer),
                ),
                ("use_short_conv", "use_short_conv", json!(m.use_short_conv)),
                (
                    "use_output_gate",
                    "use_output_gate",
                    json!(m.use_output_gate),
                ),
                ("norm_eps", "norm_eps", json!(m.norm_eps)),
                (
                    "tie_embeddings",
                    "tie_word_embeddings",
                    json!(m.tie_embeddings),
                ),
            ];
            if m.use_short_conv {
                fields.push(("conv_size", "conv_size", json!(m.conv_size)));
            }
            fields
        }
        ModelConfig::Transformer(m) => vec![
            ("vocab_size", "vocab_size", json!(m.vocab_size)),
            ("hidden_size", "hidden_size", json!(m.hidden_size)),
            ("num_layers", "num_hidden_layers", json!(m.num_layers)),
            ("num_heads", "num_attention_heads", json!(m.num_heads)),
            ("num_kv_heads", "num_key_value_heads", json!(m.kv_heads())),
            (
                "intermediate_size",
                "intermediate_size",
                json!(m.mlp_size()),
            ),
            ("rope_theta", "rope_theta", json!(m.rope_theta)),
            ("norm_eps", "rms_norm_eps", json!(m.norm_eps)),
            (
                "tie_embeddings",
                "tie_word_embeddings",
                json!(m.tie_embeddings),
            ),
        ],
        ModelConfig::Mamba(m) => vec![
            ("vocab_size", "vocab_size", json!(m.vocab_size)),
            ("hidden_size", "hidden_size", json!(m.hidden_size)),
            ("num_layers", "num_hidden_layers", json!(m.num_layers)),
            ("d_state", "state_size", json!(m.d_state)),
            ("expand", "expand", json!(m.expand)),
            ("conv_size", "conv_kernel", json!(m.conv_size)),
            ("dt_rank", "time_step_rank", json!(m.dt_rank())),
            ("norm_eps", "layer_norm_epsilon", json!(m.norm_eps)),
            (
                "tie_embeddings",
                "tie_word_embeddings",
                json!(m.tie_embeddings),
            ),
        ],
    }
}

/// Where `theirs` (read from a `config.json`) and `ours` (a run's `[model]`, of the same type)
/// disagree on a key that fixes shapes or function.
pub fn differences(ours: &ModelConfig, theirs: &ModelConfig) -> Vec<Mismatch> {
    let theirs = function_fields(theirs);
    function_fields(ours)
        .into_iter()
        .filter_map(|(key, hf_key, value)| {
            // A key present on one side only (conv_size without the short convolution) follows a
            // mismatch already listed.
            let (_, _, hf_value) = theirs.iter().find(|(k, _, _)| *k == key)?;
            (*hf_value != value).then(|| Mismatch {
                hf_key,
                hf_value: hf_value.to_string(),
                key,
                value: value.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("hf/config.json")
    }

    fn models() -> Vec<ModelConfig> {
        vec![
            ModelConfig::Gla(GlaConfig {
                vocab_size: 300,
                hidden_size: 96,
                num_layers: 3,
                num_heads: 3,
                expand_k: 1.0,
                expand_v: 2.0,
                intermediate_size: Some(200),
                use_short_conv: true,
                conv_size: 3,
                use_output_gate: false,
                norm_eps: 1e-5,
                tie_embeddings: false,
                initializer_range: 0.01,
                ..GlaConfig::default()
            }),
            ModelConfig::Transformer(TransformerConfig {
                vocab_size: 300,
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: Some(2),
                intermediate_size: Some(160),
                rope_theta: 500000.0,
                norm_eps: 1e-5,
                tie_embeddings: true,
                initializer_range: 0.03,
                init_from: None,
            }),
            ModelConfig::Mamba(MambaConfig {
                vocab_size: 300,
                hidden_size: 64,
                num_layers: 2,
                d_state: 8,
                expand: 3,
                conv_size: 3,
                dt_rank: Some(5),
                dt_min: 0.002,
                dt_max: 0.2,
                dt_init_floor: 1e-3,
                norm_eps: 1e-6,
                tie_embeddings: false,
                initializer_range: 0.05,
                init_from: None,
            }),
        ]
    }

    #[test]
    fn every_model_reads_back_as_written() {
        for model in models() {
            let json = to_json(&model, 512, Dtype::Bf16).unwrap();
            assert_eq!(from_json(&json, path()).unwrap(), model, "{json:#}");
            assert!(differences(&model, &model).is_empty());
        }
    }

    #[test]
    fn config_json_has_the_class_keys_and_values() {
        let [gla, llama, mamba] = <[ModelConfig; 3]>::try_from(models()).unwrap();
        let g = to_json(&gla, 512, Dtype::Fp32).unwrap();
        assert_eq!(g["model_type"], "gla");
        assert_eq!(g["architectures"], json!(["GLAForCausalLM"]));
        for (key, value) in [
            ("hidden_size", json!(96)),
            ("num_hidden_layers", json!(3)),
            ("num_heads", json!(3)),
            ("expand_k", json!(1.0)),
            ("expand_v", json!(2.0)),
            ("intermediate_size", json!(200)),
            ("use_short_conv", json!(true)),
            ("conv_size", json!(3)),
            ("use_output_gate", json!(false)),
            ("hidden_act", json!("swish")),
            ("gate_fn", json!("swish")),
            ("norm_eps", json!(1e-5)),
            ("gate_logit_normalizer", json!(16.0)),
            ("gate_low_rank_dim", json!(16)),
            ("attn_mode", json!("chunk")),
            ("tie_word_embeddings", json!(false)),
            ("initializer_range", json!(0.01)),
            ("fuse_norm", json!(true)),
            ("fuse_cross_entropy", json!(false)),
            ("max_position_embeddings", json!(512)),
            ("vocab_size", json!(300)),
            ("dtype", json!("float32")),
        ] {
            assert_eq!(g[key], value, "gla {key}");
        }
        let l = to_json(&llama, 512, Dtype::Bf16).unwrap();
        assert_eq!(l["architectures"], json!(["LlamaForCausalLM"]));
        for (key, value) in [
            ("model_type", json!("llama")),
            ("num_attention_heads", json!(4)),
            ("num_key_value_heads", json!(2)),
            ("head_dim", json!(16)),
            ("intermediate_size", json!(160)),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_theta", json!(500000.0)),
            (
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": 500000.0}),
            ),
            ("hidden_act", json!("silu")),
            ("attention_bias", json!(false)),
            ("mlp_bias", json!(false)),
            ("max_position_embeddings", json!(512)),
            ("tie_word_embeddings", json!(true)),
            ("dtype", json!("bfloat16")),
        ] {
            assert_eq!(l[key], value, "llama {key}");
        }
        let m = to_json(&mamba, 512, Dtype::Fp16).unwrap();
        assert_eq!(m["architectures"], json!(["MambaForCausalLM"]));
        for (key, value) in [
            ("model_type", json!("mamba")),
            ("state_size", json!(8)),
            ("expand", json!(3)),
            ("intermediate_size", json!(192)),
            ("conv_kernel", json!(3)),
            ("time_step_rank", json!(5)),
            ("time_step_min", json!(0.002)),
            ("time_step_max", json!(0.2)),
            ("time_step_floor", json!(1e-3)),
            ("use_bias", json!(false)),
            ("use_conv_bias", json!(true)),
            ("residual_in_fp32", json!(true)),
            ("rescale_prenorm_residual", json!(false)),
            ("layer_norm_epsilon", json!(1e-6)),
            ("tie_word_embeddings", json!(false)),
            ("dtype", json!("float16")),
        ] {
            assert_eq!(m[key], value, "mamba {key}");
        }
    }

    #[test]
    fn left_out_keys_take_the_class_defaults() {
        let gla = from_json(&json!({"model_type": "gla", "hidden_size": 1024}), path()).unwrap();
        let ModelConfig::Gla(g) = gla else {
            panic!("gla")
        };
        // fla's GatedMLP: hidden_ratio 4 gives 2816 at hidden 1024, glatrain's default too.
        assert_eq!(g.intermediate_size, Some(2816));
        assert_eq!((g.num_layers, g.num_heads, g.vocab_size), (24, 4, 32000));
        assert!(!g.tie_embeddings && g.use_output_gate && !g.use_short_conv);

        let llama = from_json(
            &json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                    "rope_theta": 1000.0}),
            path(),
        )
        .unwrap();
        let ModelConfig::Transformer(l) = llama else {
            panic!("llama")
        };
        assert_eq!((l.num_kv_heads, l.rope_theta), (Some(4), 1000.0));

        let mamba = from_json(
            &json!({"model_type": "mamba", "hidden_size": 100, "time_step_rank": "auto"}),
            path(),
        )
        .unwrap();
        let ModelConfig::Mamba(m) = mamba else {
            panic!("mamba")
        };
        assert_eq!((m.dt_rank, m.vocab_size), (Some(7), 50280));
        assert!(m.tie_embeddings);
    }

    #[test]
    fn unsupported_settings_name_key_and_value() {
        for (json, expected) in [
            (
                json!({"model_type": "llama", "attention_bias": true}),
                "hf/config.json: attention_bias = true: glatrain's Transformer++ has no biases",
            ),
            (
                json!({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "rope_scaling = {\"factor\":8.0,\"rope_type\":\"llama3\"}: glatrain's Transformer++ has plain RoPE",
            ),
            (
                json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}),
                "head_dim = 32: glatrain's Transformer++ has head_dim = hidden_size 64 / num_attention_heads 4",
            ),
            (
                json!({"model_type": "gla", "feature_map": "relu"}),
                "feature_map = \"relu\"",
            ),
            (
                json!({"model_type": "gla", "attn": {"layers": [1], "num_heads": 8}}),
                "attn = {",
            ),
            (
                json!({"model_type": "gla", "gate_logit_normalizer": 8}),
                "gate_logit_normalizer = 8.0: fla's GLAForCausalLM ignores this key",
            ),
            (
                json!({"model_type": "mamba", "use_conv_bias": false}),
                "use_conv_bias = false",
            ),
            (
                json!({"model_type": "rwkv7"}),
                "model_type = \"rwkv7\": glatrain reads",
            ),
        ] {
            let err = from_json(&json, path()).unwrap_err();
            assert!(err.is_bad_input());
            let msg = err.to_string();
            assert!(msg.contains(expected), "{msg}\nexpected: {expected}");
        }
        let err = from_json(&json!({"model_type": "gla", "hidden_size": "big"}), path())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("hf/config.json: invalid type: string \"big\""),
            "{err}"
        );
    }

    #[test]
    fn differences_list_function_keys_only() {
        let ours = ModelConfig::Mamba(MambaConfig::default());
        let theirs = ModelConfig::Mamba(MambaConfig {
            hidden_size: 512,
            dt_rank: Some(64),
            dt_min: 0.01,
            initializer_range: 0.1,
            ..MambaConfig::default()
        });
        let d = differences(&ours, &theirs);
        let text: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["hidden_size = 512, but model.hidden_size = 1024"],
            "dt_rank 64 equals the default's; dt_min and initializer_range only initialise"
        );
    }

    #[test]
    fn gla_with_another_gate_than_flas_is_not_exported() {
        let model = ModelConfig::Gla(GlaConfig {
            gate_logit_normalizer: 8.0,
            ..GlaConfig::default()
        });
        let err = to_json(&model, 128, Dtype::Fp32).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with(
                "model.gate_logit_normalizer = 8: fla's GLAForCausalLM always uses 16"
            ),
            "{err}"
        );
    }

    #[test]
    fn unfused_gla_norm_is_recognised() {
        assert!(!gla_norm_unfused(&json!({"model_type": "gla"})));
        assert!(gla_norm_unfused(
            &json!({"model_type": "gla", "fuse_norm": false})
        ));
        assert!(!gla_norm_unfused(
            &json!({"model_type": "gla", "fuse_norm": false, "use_output_gate": false})
        ));
    }
}
