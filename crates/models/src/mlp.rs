//! The SwiGLU feed-forward block of GLA and Transformer++ (`mlp.gate_proj`, `mlp.up_proj`,
//! `mlp.down_proj`, no biases).

use crate::linear::Linear;
use tch::{nn, Tensor};

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct SwiGlu {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl SwiGlu {
    /// All three weights `N(0, std)`.
    pub fn new(p: &nn::Path, hidden: i64, intermediate: i64, std: f64) -> Self {
        Self {
            gate_proj: Linear::normal(&(p / "gate_proj"), hidden, intermediate, false, std),
            up_proj: Linear::normal(&(p / "up_proj"), hidden, intermediate, false, std),
            down_proj: Linear::normal(&(p / "down_proj"), intermediate, hidden, false, std),
        }
    }

    /// `silu(gate) * up` by [`glatrain_ops::swiglu`] (on CUDA one kernel each way, keeping only
    /// the two projections for the backward).
    ///
    /// # Shapes
    /// `x: [..., hidden]` -> `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = glatrain_ops::swiglu(&self.gate_proj.forward(x), &self.up_proj.forward(x))
            .unwrap_or_else(|e| panic!("SwiGLU failed on the model's own tensors: {e}"));
        self.down_proj.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn shape_and_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = SwiGlu::new(&(vs.root() / "mlp"), 8, 24, 0.02);
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        assert_eq!(mlp.forward(&x).size(), [2, 3, 8]);
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        // gate_proj, up_proj and down_proj, each hidden x intermediate.
        assert_eq!(n, 3 * 8 * 24);
    }
}
