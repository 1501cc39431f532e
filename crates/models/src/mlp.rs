//! The SwiGLU feed-forward block of GLA and Transformer++ (`mlp.gate_proj`, `mlp.up_proj`,
//! `mlp.down_proj`, no biases).

use crate::linear::{fused_products, Linear, ProjectedInput};
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

    /// `down(silu(gate) * up)` from the outputs of `gate_proj` and `up_proj` (which the block
    /// computes with its norm, [`ProjectedInput`]), by [`glatrain_ops::swiglu_linear`]: on CUDA
    /// one kernel each way for the activation, and nothing kept for the backward but the two
    /// projections (the backward computes the activation again for `down_proj`'s weight
    /// gradient).
    ///
    /// # Shapes
    /// `gate, up: [..., intermediate]` -> `[..., hidden]`.
    pub fn forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        let mut y = fused_products(&[&self.down_proj.weight], |w, products| {
            let product = products.map(|p| &p[0]);
            glatrain_ops::swiglu_linear(gate, up, w[0], product).map(|y| vec![y])
        });
        let mut shape = gate.size();
        shape.pop();
        shape.push(-1);
        y.remove(0).reshape(shape)
    }
}

impl ProjectedInput for SwiGlu {
    fn input_weights(&self) -> Vec<&Tensor> {
        vec![&self.gate_proj.weight, &self.up_proj.weight]
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
        let [gate, up] = [&mlp.gate_proj, &mlp.up_proj].map(|p| x.matmul(&p.weight.tr()));
        assert_eq!(gate.size(), [2, 3, 24]);
        let want = (gate.silu() * &up).matmul(&mlp.down_proj.weight.tr());
        assert!(mlp.forward(&gate, &up).allclose(&want, 1e-5, 1e-6, false));
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        // gate_proj, up_proj and down_proj, each hidden x intermediate.
        assert_eq!(n, 3 * 8 * 24);
    }
}
