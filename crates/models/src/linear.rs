//! Linear and embedding layers whose variables sit at the checkpoint paths of the Hugging Face
//! layouts (`<path>.weight`, `<path>.bias`). Weights are stored `[out, in]` as in PyTorch.

use glatrain_shim::autocast::{autocast_dtype, autocast_enabled};
use tch::{nn, Kind, Tensor};

/// `y = x W^T (+ b)`; under autocast the matmul runs in the autocast dtype. Selective activation
/// checkpointing keeps its output (`crate::checkpoint`).
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A layer with weight `N(0, std)` and (if `bias`) a zero bias: the initialisation of
    /// flash-linear-attention and Hugging Face LLaMA.
    pub fn normal(p: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> Self {
        Self::with_init(
            p,
            in_dim,
            out_dim,
            nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            bias.then_some(nn::Init::Const(0.0)),
        )
    }

    /// A layer with explicit initialisers for the weight and the optional bias.
    pub fn with_init(
        p: &nn::Path,
        in_dim: i64,
        out_dim: i64,
        weight: nn::Init,
        bias: Option<nn::Init>,
    ) -> Self {
        Self {
            weight: p.var("weight", &[out_dim, in_dim], weight),
            bias: bias.map(|init| p.var("bias", &[out_dim], init)),
        }
    }

    /// # Shapes
    /// `x: [..., in]` -> `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        crate::checkpoint::tape::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A layer that reads its input only through projections without bias, so that the norm before
/// it runs with them as one op ([`crate::norm::RmsNorm::forward_into`]).
pub trait ProjectedInput {
    /// The projections' weights `[out_i, in]`, in the order the layer takes their outputs.
    fn input_weights(&self) -> Vec<&Tensor>;
}

/// The outputs of `op`, an op that ends in products with `weights` (`[out_i, in]`, no biases)
/// and computes the products' input itself (`glatrain_ops::swiglu_linear`, `rms_norm_linear`):
/// called with the weights in the dtype autocast would give them and, when selective
/// checkpointing replays the block, the recorded products.
///
/// # Panics
/// When the op fails (the model's own tensors: a failure is libtorch's, such as out of memory).
pub fn fused_products(
    weights: &[&Tensor],
    op: impl FnOnce(&[&Tensor], Option<&[Tensor]>) -> Result<Vec<Tensor>, glatrain_ops::OpError>,
) -> Vec<Tensor> {
    let cast: Vec<Tensor> = weights.iter().map(|w| autocast_input(w)).collect();
    let cast: Vec<&Tensor> = cast.iter().collect();
    crate::checkpoint::tape::products(weights.len(), |recorded| {
        op(&cast, recorded.as_deref()).unwrap_or_else(|e| {
            panic!("a fused matrix product failed on the model's own tensors: {e}")
        })
    })
}

/// `x` in the dtype autocast gives a matrix product's operands: fp32 CUDA tensors cast to the
/// autocast dtype, anything else as it is (the weights of fused products, the operands of a
/// replayed product).
pub fn autocast_input(x: &Tensor) -> Tensor {
    if autocast_enabled() && x.kind() == Kind::Float && x.device().is_cuda() {
        x.to_kind(autocast_dtype())
    } else {
        x.shallow_clone()
    }
}

/// PyTorch's default `nn.Linear` / `nn.Conv1d` weight initialisation (`kaiming_uniform_` with
/// `a = sqrt(5)`): uniform in `+-1/sqrt(fan_in)`, scaled by `gain`.
pub fn torch_default_uniform(fan_in: i64, gain: f64) -> nn::Init {
    let bound = gain / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Token embedding table, `N(0, std)`.
#[derive(Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`.
    pub weight: Tensor,
}

impl Embedding {
    /// Variable `<path>.weight` `[vocab, hidden]`.
    pub fn new(p: &nn::Path, vocab: i64, hidden: i64, std: f64) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        Self {
            weight: p.var("weight", &[vocab, hidden], init),
        }
    }

    /// # Shapes
    /// `tokens: [B, T]` (i64) -> `[B, T, hidden]` in the table's dtype.
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, tokens, -1, false, false)
    }
}

/// The output projection to the vocabulary: either its own `lm_head.weight` or the embedding
/// table (tied). Logits come back in fp32 whatever the compute dtype, for the loss.
#[derive(Debug)]
pub enum LmHead {
    /// Logits from the embedding table (`tie_embeddings`).
    Tied,
    /// Its own `lm_head.weight`.
    Own(Linear),
}

impl LmHead {
    /// `lm_head.weight` `[vocab, hidden]` with `N(0, std)`, unless `tied`.
    pub fn new(p: &nn::Path, tied: bool, vocab: i64, hidden: i64, std: f64) -> Self {
        if tied {
            LmHead::Tied
        } else {
            LmHead::Own(Linear::normal(p, hidden, vocab, false, std))
        }
    }

    /// The projection's weight `[vocab, hidden]`: its own, or the embedding table.
    pub fn weight<'a>(&'a self, embeddings: &'a Embedding) -> &'a Tensor {
        match self {
            LmHead::Tied => &embeddings.weight,
            LmHead::Own(linear) => &linear.weight,
        }
    }

    /// # Shapes
    /// `h: [..., hidden]` -> `[..., vocab]` fp32.
    pub fn forward(&self, h: &Tensor, embeddings: &Embedding) -> Tensor {
        crate::logits(h, self.weight(embeddings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn linear_matches_matmul_and_paths_mirror_checkpoint_keys() {
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = Linear::normal(&(vs.root() / "attn" / "q_proj"), 3, 5, true, 0.02);
        let x = Tensor::randn([2, 4, 3], (Kind::Float, Device::Cpu));
        let want = x.matmul(&lin.weight.tr()) + lin.bias.as_ref().unwrap();
        assert!(lin.forward(&x).allclose(&want, 1e-6, 1e-6, false));
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(names, ["attn.q_proj.bias", "attn.q_proj.weight"]);
        assert_eq!(
            lin.bias
                .as_ref()
                .unwrap()
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }

    #[test]
    fn tied_head_uses_the_embedding_table_and_returns_fp32() {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let emb = Embedding::new(&(vs.root() / "embeddings"), 7, 4, 0.02);
        let head = LmHead::new(&(vs.root() / "lm_head"), true, 7, 4, 0.02);
        assert_eq!(vs.variables().len(), 1);
        vs.bfloat16();
        let h = Tensor::randn([2, 4], (Kind::BFloat16, Device::Cpu));
        let logits = head.forward(&h, &emb);
        assert_eq!(logits.kind(), Kind::Float);
        assert_eq!(logits.size(), [2, 7]);
    }
}
