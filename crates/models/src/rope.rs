//! Rotary position embedding (LLaMA's non-interleaved "rotate half" form, as Hugging Face and
//! flash-linear-attention's Transformer use it).

use tch::{Device, Kind, Tensor};

/// The cos/sin tables for positions `offset .. offset + len`, in fp32.
#[derive(Debug)]
pub struct Rotary {
    /// `[T, head_dim]`.
    cos: Tensor,
    /// `[T, head_dim]`.
    sin: Tensor,
}

impl Rotary {
    /// `theta^(-2i/head_dim)` frequencies for `i < head_dim/2`, duplicated over both halves.
    /// `head_dim` must be even (the Transformer's config check guarantees it).
    pub fn new(head_dim: i64, theta: f64, offset: i64, len: i64, device: Device) -> Self {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
        let pos = Tensor::arange_start(offset, offset + len, (Kind::Float, device));
        let freqs = pos.outer(&inv_freq); // [T, head_dim/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // [T, head_dim]
        Self {
            cos: emb.cos(),
            sin: emb.sin(),
        }
    }

    /// Another handle to the same tables (a checkpointed block keeps one for its recomputation).
    pub fn shallow_clone(&self) -> Self {
        Self {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
        }
    }

    /// Rotates query or key heads; computes in fp32 and casts back.
    ///
    /// # Shapes
    /// `x: [B, H, T, head_dim]` -> same.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let xf = x.to_kind(Kind::Float);
        let rotated = Tensor::cat(&[-xf.narrow(3, half, half), xf.narrow(3, 0, half)], 3);
        (xf * &self.cos + rotated * &self.sin).to_kind(x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_products_depend_only_on_relative_position() {
        let q = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu));
        let dot = |pq: i64, pk: i64| {
            let rq = Rotary::new(8, 10000.0, pq, 1, Device::Cpu).apply(&q);
            let rk = Rotary::new(8, 10000.0, pk, 1, Device::Cpu).apply(&k);
            (rq * rk).sum(Kind::Float).double_value(&[])
        };
        assert!((dot(5, 2) - dot(13, 10)).abs() < 1e-4);
        assert!(
            (dot(5, 2) - dot(2, 5)).abs() > 1e-6,
            "rotation must not be symmetric"
        );
        let at0 = Rotary::new(8, 10000.0, 0, 1, Device::Cpu).apply(&q);
        assert!(
            at0.allclose(&q, 1e-6, 1e-6, false),
            "position 0 is the identity"
        );
    }

    #[test]
    fn table_at_an_offset_is_a_slice_of_the_full_table() {
        let x = Tensor::randn([2, 3, 6, 4], (Kind::Float, Device::Cpu));
        let full = Rotary::new(4, 500.0, 0, 6, Device::Cpu).apply(&x);
        let tail = Rotary::new(4, 500.0, 4, 2, Device::Cpu).apply(&x.narrow(2, 4, 2));
        assert!(full.narrow(2, 4, 2).allclose(&tail, 1e-6, 1e-6, false));
    }
}
