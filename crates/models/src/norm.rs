//! RMSNorm, plain and gated (flash-linear-attention's `FusedRMSNormGated` with swish): both
//! compute in fp32 and cast back, so bf16 activations and bf16 weights keep full-precision
//! statistics.

use tch::{nn, Kind, Tensor};

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
        normalize(x, &self.weight, self.eps).to_kind(x.kind())
    }

    /// `rmsnorm(x) * swish(g)`, computed in fp32.
    ///
    /// # Shapes
    /// `x, g: [..., dim]` -> same shape, in `g`'s dtype (the activation dtype).
    pub fn forward_gated(&self, x: &Tensor, g: &Tensor) -> Tensor {
        let gate = g.to_kind(Kind::Float).silu();
        (normalize(x, &self.weight, self.eps) * gate).to_kind(g.kind())
    }
}

/// The fp32 normalised and scaled `x`, by libtorch's `rms_norm` (one fused kernel each way on
/// CUDA instead of six elementwise passes and a reduction).
fn normalize(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dim = *x
        .size()
        .last()
        .expect("RMSNorm over the last dimension of a tensor");
    x.to_kind(Kind::Float)
        .rms_norm([dim], Some(weight.to_kind(Kind::Float)), eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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

    /// libtorch's fused RMSNorm against the formula in elementwise ops, values and both gradients,
    /// on the CPU and (where there is one) the GPU, whose kernel is another.
    #[test]
    fn gradients_match_the_formula() {
        gradients_match_on(Device::Cpu);
        if tch::Cuda::is_available() {
            gradients_match_on(Device::Cuda(0));
        } else {
            println!("CUDA part skipped: no CUDA device");
        }
    }

    fn gradients_match_on(device: Device) {
        let x = Tensor::randn([5, 24], (Kind::Float, device)).set_requires_grad(true);
        let w = Tensor::randn([24], (Kind::Float, device)).set_requires_grad(true);
        let dy = Tensor::randn([5, 24], (Kind::Float, device));
        let fused = normalize(&x, &w, 1e-6);
        let formula = &x * (x.square().mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt() * &w;
        let rel = glatrain_testing::rel_rms;
        assert!(rel(&fused, &formula) < 1e-6);
        let g_fused = glatrain_shim::autograd::grad(&fused, &dy, &[&x, &w]).unwrap();
        let g_formula = glatrain_shim::autograd::grad(&formula, &dy, &[&x, &w]).unwrap();
        for (a, b) in g_fused.iter().zip(&g_formula) {
            assert!(rel(a, b) < 1e-5, "{}", rel(a, b));
        }
    }

    #[test]
    fn gated_multiplies_by_swish_of_the_gate() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 8, 1e-6);
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let want = norm.forward(&x) * &g * g.sigmoid();
        assert!(norm
            .forward_gated(&x, &g)
            .allclose(&want, 1e-5, 1e-6, false));
    }
}
