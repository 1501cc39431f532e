//! Gated linear attention: the layer and the language model, with flash-linear-attention's
//! module structure and parameter names (`GLAForCausalLM`), so weights can be exchanged:
//!
//! ```text
//! model.embeddings.weight                          [vocab, hidden]
//! model.layers.N.attn_norm.weight                  [hidden]
//! model.layers.N.attn.q_proj.weight                [key_dim, hidden]
//! model.layers.N.attn.k_proj.weight                [key_dim, hidden]
//! model.layers.N.attn.v_proj.weight                [value_dim, hidden]
//! model.layers.N.attn.g_proj.weight                [value_dim, hidden]     (use_output_gate)
//! model.layers.N.attn.{q,k,v}_conv1d.weight        [dim, 1, conv_size]     (use_short_conv)
//! model.layers.N.attn.gk_proj.0.weight             [gate_low_rank_dim, hidden]
//! model.layers.N.attn.gk_proj.1.weight / .bias     [key_dim, gate_low_rank_dim] / [key_dim]
//! model.layers.N.attn.g_norm_swish_gate.weight     [head_v_dim]            (g_norm without gate)
//! model.layers.N.attn.o_proj.weight                [hidden, value_dim]
//! model.layers.N.mlp_norm.weight                   [hidden]
//! model.layers.N.mlp.{gate,up,down}_proj.weight
//! model.norm.weight                                [hidden]
//! lm_head.weight                                   [vocab, hidden]         (untied only)
//! ```
//!
//! Initialisation as FLA's `GLAPreTrainedModel._init_weights`: linear, convolution and
//! embedding weights `N(0, initializer_range)`, biases (the gate's) zero, norms one. FLA's
//! current default applies no depth rescaling of `o_proj` / `down_proj`
//! (`prenorm_residual_strategy = None`), so neither does this.

use crate::attention_block::AttentionBlock;
use crate::conv::CausalConv;
use crate::documents::{PackedDocuments, RecurrentSettings};
use crate::error::{check_norm_and_init, require_positive, require_positive_number, ModelError};
use crate::language_model::{Block, LanguageModel, Parts};
use crate::linear::{Embedding, Linear, LmHead, ProjectedInput};
use crate::norm::RmsNorm;
use glatrain_config::{GlaConfig, GlaMode, ModelConfig};
use glatrain_ops::gla::gla_documents;
use glatrain_ops::reference::gla::default_scale;
use tch::{nn, Device, Tensor};

/// Checks that `cfg` describes a buildable model; errors name the offending key.
pub fn validate(cfg: &GlaConfig) -> Result<(), ModelError> {
    require_positive("vocab_size", cfg.vocab_size)?;
    require_positive("hidden_size", cfg.hidden_size)?;
    require_positive("num_layers", cfg.num_layers)?;
    require_positive("num_heads", cfg.num_heads)?;
    require_positive("gate_low_rank_dim", cfg.gate_low_rank_dim)?;
    require_positive("intermediate_size", cfg.mlp_size())?;
    if cfg.use_short_conv {
        require_positive("conv_size", cfg.conv_size)?;
    }
    for (key, expand, dim, what) in [
        ("expand_k", cfg.expand_k, cfg.key_dim(), "key_dim"),
        ("expand_v", cfg.expand_v, cfg.value_dim(), "value_dim"),
    ] {
        if !(expand.is_finite() && dim >= 1) {
            return Err(ModelError::bad(
                key,
                expand,
                format!(
                    "{what} = hidden_size {} * {key} must be at least 1",
                    cfg.hidden_size
                ),
            ));
        }
        if dim % cfg.num_heads != 0 {
            return Err(ModelError::bad(
                "num_heads",
                cfg.num_heads,
                format!(
                    "{what} {dim} (hidden_size {} * {key} {expand}) is not divisible by it",
                    cfg.hidden_size
                ),
            ));
        }
    }
    require_positive_number("gate_logit_normalizer", cfg.gate_logit_normalizer)?;
    check_norm_and_init(cfg.norm_eps, cfg.initializer_range)
}

/// Per-layer decoding state: the short convolutions' last inputs and the recurrent state.
#[derive(Debug, Default)]
pub struct GlaLayerCache {
    /// q, k, v convolution states `[B, D, conv_size - 1]` (with `use_short_conv`).
    conv: Option<[Tensor; 3]>,
    /// `[B, H, head_k_dim, head_v_dim]` fp32.
    state: Option<Tensor>,
}

/// The q, k, v short convolutions (`q_conv1d`, `k_conv1d`, `v_conv1d`; no bias, silu).
#[derive(Debug)]
struct QkvConv {
    q: CausalConv,
    k: CausalConv,
    v: CausalConv,
}

/// flash-linear-attention's `GatedLinearAttention` layer.
#[derive(Debug)]
pub struct GlaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    g_proj: Option<Linear>,
    gk_down: Linear,
    gk_up: Linear,
    o_proj: Linear,
    conv: Option<QkvConv>,
    /// `g_norm_swish_gate` with the output gate, `g_norm` without.
    out_norm: RmsNorm,
    num_heads: i64,
    head_k_dim: i64,
    head_v_dim: i64,
    gate_logit_normalizer: f64,
    mode: GlaMode,
}

impl GlaAttention {
    /// Variables under `p` (a block's `attn`). `cfg` must have passed [`validate`].
    pub fn new(p: &nn::Path, cfg: &GlaConfig, mode: GlaMode) -> Self {
        let hidden = cfg.hidden_size as i64;
        let key_dim = cfg.key_dim() as i64;
        let value_dim = cfg.value_dim() as i64;
        let rank = cfg.gate_low_rank_dim as i64;
        let std = cfg.initializer_range;
        let normal = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let conv = cfg.use_short_conv.then(|| {
            let k = cfg.conv_size as i64;
            QkvConv {
                q: CausalConv::new(&(p / "q_conv1d"), key_dim, k, normal, None),
                k: CausalConv::new(&(p / "k_conv1d"), key_dim, k, normal, None),
                v: CausalConv::new(&(p / "v_conv1d"), value_dim, k, normal, None),
            }
        });
        let head_v_dim = cfg.head_v_dim() as i64;
        let norm_name = if cfg.use_output_gate {
            "g_norm_swish_gate"
        } else {
            "g_norm"
        };
        Self {
            q_proj: Linear::normal(&(p / "q_proj"), hidden, key_dim, false, std),
            k_proj: Linear::normal(&(p / "k_proj"), hidden, key_dim, false, std),
            v_proj: Linear::normal(&(p / "v_proj"), hidden, value_dim, false, std),
            g_proj: cfg
                .use_output_gate
                .then(|| Linear::normal(&(p / "g_proj"), hidden, value_dim, false, std)),
            gk_down: Linear::normal(&(p / "gk_proj" / 0), hidden, rank, false, std),
            gk_up: Linear::normal(&(p / "gk_proj" / 1), rank, key_dim, true, std),
            o_proj: Linear::normal(&(p / "o_proj"), value_dim, hidden, false, std),
            conv,
            out_norm: RmsNorm::new(&(p / norm_name), head_v_dim, cfg.norm_eps),
            num_heads: cfg.num_heads as i64,
            head_k_dim: cfg.head_k_dim() as i64,
            head_v_dim,
            gate_logit_normalizer: cfg.gate_logit_normalizer,
            mode,
        }
    }

    /// The forget-gate logs `logsigmoid(low_rank W2 + b) / gate_logit_normalizer` from
    /// `low_rank = x W1` (`gk_proj.0`'s output), in fp32, by [`glatrain_ops::log_forget_gate`]
    /// (the backward keeps the logits in the activation dtype).
    ///
    /// # Shapes
    /// `low_rank: [B, T, rank]` -> `[B, T, key_dim]` fp32, every entry <= 0.
    pub fn forget_gate(&self, low_rank: &Tensor) -> Tensor {
        let logits = self.gk_up.forward(low_rank);
        glatrain_ops::log_forget_gate(&logits, self.gate_logit_normalizer)
            .unwrap_or_else(|e| panic!("the forget gate failed on the layer's own logits: {e}"))
    }

    /// Mixes the sequence from the outputs of the input projections, in the order of
    /// [`ProjectedInput::input_weights`] (q, k, v, the forget gate's low rank, and g with the
    /// output gate); with a cache, continues from (and updates) its states; over `documents`,
    /// each as if it were alone.
    ///
    /// # Shapes
    /// `inputs: [B, T, out_i]` -> `[B, T, hidden]`.
    pub fn forward(
        &self,
        inputs: &[Tensor],
        mut cache: Option<&mut GlaLayerCache>,
        documents: Option<&PackedDocuments>,
    ) -> Tensor {
        let (b, t, _) = inputs[0].size3().expect("GLA's q must be [B, T, key_dim]");
        let (h, dk, dv) = (self.num_heads, self.head_k_dim, self.head_v_dim);
        let (mut q, mut k, mut v) = (
            inputs[0].shallow_clone(),
            inputs[1].shallow_clone(),
            inputs[2].shallow_clone(),
        );
        if let (Some(conv), Some(resets)) = (&self.conv, documents.and_then(|d| d.resets.as_ref()))
        {
            (q, k, v) = (
                conv.q.forward_sequences(&q, Some(resets)),
                conv.k.forward_sequences(&k, Some(resets)),
                conv.v.forward_sequences(&v, Some(resets)),
            );
        } else if let Some(conv) = &self.conv {
            let prev = cache.as_mut().and_then(|c| c.conv.take());
            let [pq, pk, pv] =
                prev.map_or([None, None, None], |[a, b, c]| [Some(a), Some(b), Some(c)]);
            let (cq, sq) = conv.q.forward(&q, pq.as_ref());
            let (ck, sk) = conv.k.forward(&k, pk.as_ref());
            let (cv, sv) = conv.v.forward(&v, pv.as_ref());
            (q, k, v) = (cq, ck, cv);
            if let Some(c) = cache.as_mut() {
                c.conv = Some([sq, sk, sv]);
            }
        }
        let gk = self.forget_gate(&inputs[3]).reshape([b, t, h, dk]);
        let q = q.reshape([b, t, h, dk]);
        let k = k.reshape([b, t, h, dk]);
        let v = v.reshape([b, t, h, dv]);
        let initial_state = cache.as_mut().and_then(|c| c.state.take());
        let scale = default_scale(dk);
        let want_state = cache.is_some();
        // The op runs the reference on the CPU and single tokens (decoding) token by token.
        let (o, state) = match documents.and_then(|d| d.gla.as_ref()) {
            Some(laid) => {
                gla_documents(&q, &k, &v, &gk, laid, Some(scale), self.mode).map(|o| (o, None))
            }
            None => glatrain_ops::gla(
                &q,
                &k,
                &v,
                &gk,
                initial_state.as_ref(),
                Some(scale),
                self.mode,
                want_state,
            ),
        }
        .unwrap_or_else(|e| panic!("GLA op failed on the layer's own inputs: {e}"));
        if let Some(c) = cache {
            c.state = state;
        }
        let g = inputs.get(4).map(|g| g.reshape([b, t, h, dv]));
        let mut y = self
            .out_norm
            .forward_products(&o, g.as_ref(), &[&self.o_proj.weight]);
        y.remove(0).reshape([b, t, -1])
    }
}

impl ProjectedInput for GlaAttention {
    fn input_weights(&self) -> Vec<&Tensor> {
        let gate = self.g_proj.as_ref().map(|g| &g.weight);
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.gk_down]
            .map(|p| &p.weight)
            .into_iter()
            .chain(gate)
            .collect()
    }
}

/// GLA's residual block.
pub type GlaBlock = AttentionBlock<GlaAttention>;

impl Block for GlaBlock {
    const FAMILY: &'static str = "gla";
    type Cache = GlaLayerCache;
    type Settings = RecurrentSettings;

    fn forward(
        &self,
        x: &Tensor,
        documents: &Option<PackedDocuments>,
        cache: Option<&mut GlaLayerCache>,
    ) -> Tensor {
        self.forward_with(x, |attn, inputs| {
            attn.forward(inputs, cache, documents.as_ref())
        })
    }
}

/// flash-linear-attention's `GLAForCausalLM`.
pub type GlaModel = LanguageModel<GlaBlock>;

impl GlaModel {
    /// Creates the variables under `root` (paths as in the module docs).
    pub fn new(root: &nn::Path, cfg: &GlaConfig, mode: GlaMode) -> Result<Self, ModelError> {
        validate(cfg)?;
        if let (Device::Cuda(ordinal), false) = (root.device(), mode == GlaMode::Reference) {
            glatrain_cuda::Gpu::get(ordinal)
                .map_err(|source| ModelError::Kernels { ordinal, source })?;
        }
        let hidden = cfg.hidden_size as i64;
        let vocab = cfg.vocab_size as i64;
        let std = cfg.initializer_range;
        let model = root / "model";
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = &model / "layers" / i;
                let mlp = cfg.mlp_size() as i64;
                AttentionBlock::new(&p, hidden, cfg.norm_eps, mlp, std, |p| {
                    GlaAttention::new(p, cfg, mode)
                })
            })
            .collect();
        Ok(Self::assemble(Parts {
            config: ModelConfig::Gla(cfg.clone()),
            embeddings: Embedding::new(&(&model / "embeddings"), vocab, hidden, std),
            layers,
            norm: RmsNorm::new(&(&model / "norm"), hidden, cfg.norm_eps),
            lm_head: LmHead::new(&(root / "lm_head"), cfg.tie_embeddings, vocab, hidden, std),
            settings: RecurrentSettings {
                gla: true,
                resets: cfg.use_short_conv,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny(use_output_gate: bool) -> GlaConfig {
        GlaConfig {
            vocab_size: 11,
            hidden_size: 16,
            num_layers: 1,
            num_heads: 2,
            use_output_gate,
            ..GlaConfig::default()
        }
    }

    #[test]
    fn forget_gate_is_logsigmoid_over_the_normalizer() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = tiny(true);
        let attn = GlaAttention::new(&vs.root(), &cfg, GlaMode::Reference);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let low_rank = x.matmul(&attn.gk_down.weight.tr());
        let gk = attn.forget_gate(&low_rank);
        assert_eq!(gk.size(), [2, 3, 8]);
        assert!(gk.max().double_value(&[]) <= 0.0);
        let logits = low_rank.matmul(&attn.gk_up.weight.tr());
        let want = (logits + attn.gk_up.bias.as_ref().unwrap()).log_sigmoid() / 16.0;
        assert!(gk.allclose(&want, 1e-5, 1e-7, false));
    }

    #[test]
    fn variable_names_follow_flash_linear_attention() {
        for gate in [true, false] {
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = GlaConfig {
                use_short_conv: true,
                ..tiny(gate)
            };
            GlaModel::new(&vs.root(), &cfg, GlaMode::Reference).unwrap();
            let mut names: Vec<String> = vs.variables().into_keys().collect();
            names.sort();
            let norm = if gate { "g_norm_swish_gate" } else { "g_norm" };
            let mut want: Vec<String> = [
                "attn.gk_proj.0.weight",
                "attn.gk_proj.1.bias",
                "attn.gk_proj.1.weight",
                "attn.k_conv1d.weight",
                "attn.k_proj.weight",
                "attn.o_proj.weight",
                "attn.q_conv1d.weight",
                "attn.q_proj.weight",
                "attn.v_conv1d.weight",
                "attn.v_proj.weight",
                "attn_norm.weight",
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp_norm.weight",
            ]
            .iter()
            .map(|n| format!("model.layers.0.{n}"))
            .collect();
            want.push(format!("model.layers.0.attn.{norm}.weight"));
            if gate {
                want.push("model.layers.0.attn.g_proj.weight".into());
            }
            want.extend(["model.embeddings.weight".into(), "model.norm.weight".into()]);
            want.sort();
            assert_eq!(names, want);
        }
    }

    #[test]
    fn decoding_with_short_conv_matches_the_full_pass() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = GlaConfig {
            use_short_conv: true,
            ..tiny(true)
        };
        let attn = GlaAttention::new(&vs.root(), &cfg, GlaMode::Chunk);
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let inputs = |from: i64, len: i64| -> Vec<Tensor> {
            let x = x.narrow(1, from, len);
            attn.input_weights()
                .iter()
                .map(|w| x.matmul(&w.tr()))
                .collect()
        };
        let full = attn.forward(&inputs(0, 5), None, None);
        let mut cache = GlaLayerCache::default();
        let first = attn.forward(&inputs(0, 3), Some(&mut cache), None);
        let mut pieces = vec![first];
        for t in 3..5 {
            pieces.push(attn.forward(&inputs(t, 1), Some(&mut cache), None));
        }
        let pieces = Tensor::cat(&pieces, 1);
        assert!(pieces.allclose(&full, 1e-4, 1e-6, false));
    }
}
