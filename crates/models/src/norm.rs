//! RMSNorm, plain, and gated (flash-linear-attention's `FusedRMSNormGated` with swish) before a
//! projection, by [`glatrain_ops::rms_norm`] and [`glatrain_ops::rms_norm_linear`]: fp32
//! statistics and math, the output in the activation dtype; on CUDA one kernel each way that
//! keeps only the inputs and a statistic per row for the backward.

use crate::linear::fused_product;
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

    /// `rmsnorm(x) [* swish(gate)]` with its rows of `dim` taken together as rows of the
    /// product's input and multiplied by `proj_weight^T` (a projection without bias), by
    /// [`glatrain_ops::rms_norm_linear`]: nothing kept for the backward but the norm's own inputs
    /// (the backward computes the normalised values again for the weight gradient).
    ///
    /// # Shapes
    /// `x, gate: [..., dim]`, one dtype; `proj_weight: [out, in]` with `in` a multiple of `dim`
    /// -> `[x.numel() / in, out]`.
    pub fn forward_projected(
        &self,
        x: &Tensor,
        gate: Option<&Tensor>,
        proj_weight: &Tensor,
    ) -> Tensor {
        fused_product(proj_weight, |w, product| {
            glatrain_ops::rms_norm_linear(x, &self.weight, self.eps, gate, w, product)
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
    fn projected_gates_by_swish_then_multiplies_rows_of_heads() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 8, 1e-6);
        let x = Tensor::randn([3, 2, 8], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([3, 2, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
        let gated = norm.forward(&x) * &g * g.sigmoid();
        let want = gated.reshape([3, 16]).matmul(&w.tr());
        let got = norm.forward_projected(&x, Some(&g), &w);
        assert!(got.allclose(&want, 1e-5, 1e-6, false));
        let plain = norm.forward(&x).reshape([3, 16]).matmul(&w.tr());
        assert!(norm
            .forward_projected(&x, None, &w)
            .allclose(&plain, 1e-5, 1e-6, false));
    }
}
