//! RMSNorm, plain, and gated (flash-linear-attention's `FusedRMSNormGated` with swish) before a
//! projection, by [`glatrain_ops::rms_norm`] and [`glatrain_ops::rms_norm_linear`]: fp32
//! statistics and math, the output in the activation dtype; on CUDA one kernel each way that
//! keeps only the inputs and a statistic per row for the backward.

use crate::linear::{fused_products, ProjectedInput};
use tch::{nn, Tensor};

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension; variable `<path>.weight`.
#[derive(Debug)]
pub struct RmsNorm {
    /// `[dim]`, initialised to ones.
    pub weight: Tensor,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// Variable `<path>.weight` `[dim]` of ones.
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }

    /// # Shapes
    /// `x: [..., dim]` -> same shape and dtype.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        glatrain_ops::rms_norm(x, &self.weight, self.eps, None)
            .unwrap_or_else(|e| panic!("RMSNorm failed on the model's own tensors: {e}"))
    }

    /// The input of `layer`, normed, through the layer's projections: `proj_i(rmsnorm(x))` for
    /// each of [`ProjectedInput::input_weights`], by one [`glatrain_ops::rms_norm_linear`], which
    /// keeps no normed copy for the backward.
    ///
    /// # Shapes
    /// `x: [..., dim]` -> `[..., out_i]` per projection, in the activation dtype.
    pub fn forward_into(&self, x: &Tensor, layer: &impl ProjectedInput) -> Vec<Tensor> {
        let mut shape = x.size();
        shape.pop();
        shape.push(-1);
        self.forward_products(x, None, &layer.input_weights())
            .into_iter()
            .map(|y| y.reshape(shape.as_slice()))
            .collect()
    }

    /// `rmsnorm(x) [* swish(gate)]` with its rows of `dim` taken together as rows of the
    /// products' input and multiplied by each `weights_i^T` (projections without bias), by
    /// [`glatrain_ops::rms_norm_linear`]: nothing kept for the backward but the norm's own inputs
    /// (the backward computes the normalised values again for the weight gradients).
    ///
    /// # Shapes
    /// `x, gate: [..., dim]`, one dtype; `weights: [out_i, in]` with `in` a multiple of `dim`
    /// -> `[x.numel() / in, out_i]` per weight.
    pub fn forward_products(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        weights: &[&Tensor],
    ) -> Vec<Tensor> {
        fused_products(weights, |w, products| {
            glatrain_ops::rms_norm_linear(x, &self.weight, self.eps, gate, w, products)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn slow_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter()
            .zip(w)
            .map(|(v, w)| v / (ms + eps).sqrt() * w)
            .collect()
    }

    #[test]
    fn matches_the_formula_and_keeps_the_dtype() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut norm = RmsNorm::new(&vs.root(), 4, 1e-6);
        norm.weight = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0]);
        let x = [0.3f32, -1.2, 2.0, 0.01];
        let got = Vec::<f64>::try_from(norm.forward(&Tensor::from_slice(&x))).unwrap();
        let want = slow_rms_norm(&x.map(f64::from), &[1.0, 2.0, 0.5, -1.0], 1e-6);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let xb = Tensor::from_slice(&x).to_kind(Kind::BFloat16);
        assert_eq!(norm.forward(&xb).kind(), Kind::BFloat16);
    }

    #[test]
    fn products_gate_by_swish_then_multiply_rows_of_heads() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 8, 1e-6);
        let x = Tensor::randn([3, 2, 8], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([3, 2, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let w2 = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        let gated = (norm.forward(&x) * &g * g.sigmoid()).reshape([3, 16]);
        let got = norm.forward_products(&x, Some(&g), &[&w, &w2]);
        assert!(got[0].allclose(&gated.matmul(&w.tr()), 1e-5, 1e-6, false));
        assert!(got[1].allclose(&gated.matmul(&w2.tr()), 1e-5, 1e-6, false));
        let plain = norm.forward(&x).reshape([3, 16]).matmul(&w.tr());
        assert!(norm.forward_products(&x, None, &[&w])[0].allclose(&plain, 1e-5, 1e-6, false));
    }
}
