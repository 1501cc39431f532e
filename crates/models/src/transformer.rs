//! Transformer++ (LLaMA style) with flash-linear-attention's `TransformerForCausalLM` names:
//! `model.embeddings`, `model.layers.N.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm,
//! mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`. RMSNorm, RoPE, SwiGLU, no biases,
//! grouped-query attention through `num_kv_heads`, causal `scaled_dot_product_attention`
//! (libtorch picks a flash kernel for bf16/fp16 on CUDA). Over packed documents, attention is
//! block-causal (`glatrain_ops::sdpa::block_causal_sdpa`) and positions restart at each document.
//!
//! Initialisation as Hugging Face LLaMA and FLA: every linear and embedding weight
//! `N(0, initializer_range)`, norms one, no depth rescaling.

use crate::attention_block::AttentionBlock;
use crate::error::{check_norm_and_init, require_positive, require_positive_number, ModelError};
use crate::language_model::{Block, ContextSettings, LanguageModel, Parts};
use crate::linear::{Embedding, Linear, LmHead, ProjectedInput};
use crate::norm::RmsNorm;
use crate::rope::Rotary;
use crate::Documents;
use glatrain_config::{ModelConfig, TransformerConfig};
use glatrain_ops::sdpa::{block_causal_sdpa, BlockCausal};
use tch::{nn, Kind, Tensor};

/// Checks that `cfg` describes a buildable model; errors name the offending key.
pub fn validate(cfg: &TransformerConfig) -> Result<(), ModelError> {
    require_positive("vocab_size", cfg.vocab_size)?;
    require_positive("hidden_size", cfg.hidden_size)?;
    require_positive("num_layers", cfg.num_layers)?;
    require_positive("num_heads", cfg.num_heads)?;
    require_positive("num_kv_heads", cfg.kv_heads())?;
    require_positive("intermediate_size", cfg.mlp_size())?;
    if cfg.hidden_size % cfg.num_heads != 0 {
        return Err(ModelError::bad(
            "num_heads",
            cfg.num_heads,
            format!("hidden_size {} is not divisible by it", cfg.hidden_size),
        ));
    }
    if cfg.head_dim() % 2 != 0 {
        return Err(ModelError::bad(
            "num_heads",
            cfg.num_heads,
            format!(
                "head_dim = hidden_size {} / num_heads = {} is odd; rotary embeddings need it even",
                cfg.hidden_size,
                cfg.head_dim()
            ),
        ));
    }
    if cfg.num_heads % cfg.kv_heads() != 0 {
        return Err(ModelError::bad(
            "num_kv_heads",
            cfg.kv_heads(),
            format!("num_heads {} is not divisible by it", cfg.num_heads),
        ));
    }
    require_positive_number("rope_theta", cfg.rope_theta)?;
    check_norm_and_init(cfg.norm_eps, cfg.initializer_range)
}

/// Per-layer key/value cache, `[B, kv_heads, T_past, head_dim]` each.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Multi-head (grouped-query) causal self-attention with rotary positions.
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// Variables under `p` (a block's `attn`). `cfg` must have passed [`validate`].
    pub fn new(p: &nn::Path, cfg: &TransformerConfig) -> Self {
        let hidden = cfg.hidden_size as i64;
        let (h, hkv, d) = (
            cfg.num_heads as i64,
            cfg.kv_heads() as i64,
            cfg.head_dim() as i64,
        );
        let std = cfg.initializer_range;
        Self {
            q_proj: Linear::normal(&(p / "q_proj"), hidden, h * d, false, std),
            k_proj: Linear::normal(&(p / "k_proj"), hidden, hkv * d, false, std),
            v_proj: Linear::normal(&(p / "v_proj"), hidden, hkv * d, false, std),
            o_proj: Linear::normal(&(p / "o_proj"), h * d, hidden, false, std),
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
        }
    }

    /// Attends causally over the cached keys (positions `0 .. past`) and the new tokens
    /// (positions `past .. past + T`), from the outputs of the q, k and v projections (in the
    /// order of [`ProjectedInput::input_weights`]); `at.rope` must cover the new tokens. With a
    /// cache, appends their keys and values to it. With `at.documents` (whole sequences, no
    /// cache), attends within each document only.
    ///
    /// # Shapes
    /// `inputs: [B, T, out_i]` -> `[B, T, hidden]`.
    pub fn forward(
        &self,
        inputs: &[Tensor],
        at: &Positions,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, t, _) = inputs[0]
            .size3()
            .expect("attention's q must be [B, T, H D]");
        let (h, hkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Heads rotated on the projections' [B, T, n, d] layout.
        let heads = |y: &Tensor, n: i64| y.reshape([b, t, n, d]);
        let q = at.rope.apply(&heads(&inputs[0], h));
        let k = at.rope.apply(&heads(&inputs[1], hkv));
        let v = heads(&inputs[2], hkv);
        if let Some(blocks) = &at.documents {
            let o = block_causal_sdpa(&q, &k, &v, blocks).unwrap_or_else(|e| {
                panic!("block-causal attention failed on the layer's own inputs: {e}")
            });
            return self.o_proj.forward(&o.reshape([b, t, h * d]));
        }
        // SDPA's [B, n, T, d] views.
        let [q, mut k, mut v] = [q, k, v].map(|y| y.transpose(1, 2));
        let past = at.past;
        if let Some(cache) = cache {
            if let (Some(pk), Some(pv)) = (cache.k.take(), cache.v.take()) {
                k = Tensor::cat(&[pk, k], 2);
                v = Tensor::cat(&[pv, v], 2);
            }
            cache.k = Some(k.shallow_clone());
            cache.v = Some(v.shallow_clone());
        }
        // SDPA's is_causal aligns the mask top-left, which is right only without a past; a
        // single query sees every key; a block after a past needs the explicit offset mask.
        let mask = (past > 0 && t > 1).then(|| {
            let opts = (Kind::Int64, inputs[0].device());
            let q_pos = Tensor::arange_start(past, past + t, opts).unsqueeze(1);
            let k_pos = Tensor::arange(past + t, opts).unsqueeze(0);
            k_pos.le_tensor(&q_pos) // [T, past + T], true = attend
        });
        let is_causal = past == 0 && t > 1;
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            is_causal,
            None,
            hkv != h,
        ); // [B, H, T, d]
        self.o_proj
            .forward(&o.transpose(1, 2).reshape([b, t, h * d]))
    }
}

impl ProjectedInput for Attention {
    fn input_weights(&self) -> Vec<&Tensor> {
        vec![
            &self.q_proj.weight,
            &self.k_proj.weight,
            &self.v_proj.weight,
        ]
    }
}

/// Transformer++'s residual block.
pub type TransformerBlock = AttentionBlock<Attention>;

/// What a forward's rotary table is made from.
#[derive(Debug)]
pub struct RotarySettings {
    head_dim: i64,
    theta: f64,
}

/// The rotary table of one forward and the position of its first token; with documents, their
/// block-causal pattern (the table then has each token's position inside its document).
pub struct Positions {
    rope: Rotary,
    past: i64,
    documents: Option<BlockCausal>,
}

impl Block for TransformerBlock {
    const FAMILY: &'static str = "transformer";
    type Cache = KvCache;
    type Settings = RotarySettings;

    fn forward(&self, x: &Tensor, at: &Positions, cache: Option<&mut KvCache>) -> Tensor {
        self.forward_with(x, |attn, inputs| attn.forward(inputs, at, cache))
    }
}

impl ContextSettings for RotarySettings {
    type Context = Positions;

    fn context(&self, tokens: &Tensor, past: i64, documents: Option<&Documents>) -> Positions {
        let device = tokens.device();
        match documents.filter(|d| d.has_boundaries()) {
            // Positions restart at each document, as packed-sequence training with flash-attn
            // or Hugging Face's position_ids does: a document's rotations are then exactly those
            // it has alone, while absolute positions would match it only up to the rounding of
            // the larger angles.
            Some(documents) => {
                let built = documents
                    .check_batch("transformer", "tokens", tokens)
                    .and_then(|()| documents.positions(device))
                    .and_then(|p| Ok((p, BlockCausal::new(documents, device)?)));
                let (positions, blocks) = built.unwrap_or_else(|e| panic!("{e}"));
                Positions {
                    rope: Rotary::per_token(self.head_dim, self.theta, &positions),
                    past,
                    documents: Some(blocks),
                }
            }
            None => Positions {
                rope: Rotary::new(self.head_dim, self.theta, past, tokens.size()[1], device),
                past,
                documents: None,
            },
        }
    }

    fn share(at: &Positions) -> Positions {
        Positions {
            rope: at.rope.shallow_clone(),
            past: at.past,
            documents: at.documents.as_ref().map(BlockCausal::shallow_clone),
        }
    }
}

/// LLaMA-style Transformer++ language model.
pub type TransformerModel = LanguageModel<TransformerBlock>;

impl TransformerModel {
    /// Creates the variables under `root` (paths as in the module docs).
    pub fn new(root: &nn::Path, cfg: &TransformerConfig) -> Result<Self, ModelError> {
        validate(cfg)?;
        let hidden = cfg.hidden_size as i64;
        let vocab = cfg.vocab_size as i64;
        let std = cfg.initializer_range;
        let model = root / "model";
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = &model / "layers" / i;
                let mlp = cfg.mlp_size() as i64;
                AttentionBlock::new(&p, hidden, cfg.norm_eps, mlp, std, |p| {
                    Attention::new(p, cfg)
                })
            })
            .collect();
        Ok(Self::assemble(Parts {
            config: ModelConfig::Transformer(cfg.clone()),
            embeddings: Embedding::new(&(&model / "embeddings"), vocab, hidden, std),
            layers,
            norm: RmsNorm::new(&(&model / "norm"), hidden, cfg.norm_eps),
            lm_head: LmHead::new(&(root / "lm_head"), cfg.tie_embeddings, vocab, hidden, std),
            settings: RotarySettings {
                head_dim: cfg.head_dim() as i64,
                theta: cfg.rope_theta,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn slow_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        // q, k, v: [B, H, T, d]
        let t = q.size()[2];
        let d = q.size()[3] as f64;
        let scores = q.matmul(&k.transpose(2, 3)) / d.sqrt();
        let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        scores
            .masked_fill(&future, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float)
            .matmul(v)
    }

    #[test]
    fn grouped_query_attention_matches_repeated_heads() {
        let cfg = TransformerConfig {
            hidden_size: 16,
            num_heads: 4,
            num_kv_heads: Some(2),
            ..TransformerConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = Attention::new(&vs.root(), &cfg);
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let rope = Rotary::new(4, cfg.rope_theta, 0, 5, Device::Cpu);
        let at = Positions {
            rope: rope.shallow_clone(),
            past: 0,
            documents: None,
        };
        let inputs: Vec<Tensor> = attn
            .input_weights()
            .iter()
            .map(|w| x.matmul(&w.tr()))
            .collect();
        let got = attn.forward(&inputs, &at, None);
        let heads = |y: Tensor, n: i64| y.reshape([2, 5, n, 4]);
        let q = rope
            .apply(&heads(attn.q_proj.forward(&x), 4))
            .transpose(1, 2);
        let k = rope
            .apply(&heads(attn.k_proj.forward(&x), 2))
            .transpose(1, 2);
        let v = heads(attn.v_proj.forward(&x), 2).transpose(1, 2);
        let k = k.repeat_interleave_self_int(2, 1, None);
        let v = v.repeat_interleave_self_int(2, 1, None);
        let o = slow_causal_attention(&q, &k, &v)
            .transpose(1, 2)
            .reshape([2, 5, 16]);
        let want = attn.o_proj.forward(&o);
        assert!(got.allclose(&want, 1e-5, 1e-6, false));
    }

    #[test]
    fn odd_head_dim_and_bad_kv_heads_are_rejected_by_key() {
        let odd = TransformerConfig {
            hidden_size: 12,
            num_heads: 4,
            ..TransformerConfig::default()
        };
        let e = validate(&odd).unwrap_err().to_string();
        assert!(
            e.starts_with("model.num_heads = 4:") && e.contains("odd"),
            "{e}"
        );
        let kv = TransformerConfig {
            num_kv_heads: Some(3),
            ..TransformerConfig::default()
        };
        let e = validate(&kv).unwrap_err().to_string();
        assert!(e.starts_with("model.num_kv_heads = 3:"), "{e}");
    }
}
