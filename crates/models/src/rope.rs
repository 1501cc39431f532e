//! Rotary position embedding (LLaMA's non-interleaved "rotate half" form, as Hugging Face and
//! flash-linear-attention's Transformer use it).

use tch::{Device, Kind, Tensor};

/// The cos/sin tables of a forward's positions, in fp32: one angle per token and pair of a head.
#[derive(Debug)]
pub struct Rotary {
    /// `[T, head_dim / 2]`, or `[B, T, head_dim / 2]` for positions per row.
    cos: Tensor,
    /// As `cos`.
    sin: Tensor,
}

impl Rotary {
    /// The tables for positions `offset .. offset + len`. `head_dim` must be even (the
    /// Transformer's config check guarantees it).
    pub fn new(head_dim: i64, theta: f64, offset: i64, len: i64, device: Device) -> Self {
        let positions = Tensor::arange_start(offset, offset + len, (Kind::Float, device));
        Self::at(head_dim, theta, &positions)
    }

    /// The tables for each token's own position, `positions` `[B, T]` (integers).
    pub fn per_token(head_dim: i64, theta: f64, positions: &Tensor) -> Self {
        Self::at(head_dim, theta, &positions.to_kind(Kind::Float))
    }

    /// Angles `position * theta^(-2i/head_dim)` for `i < head_dim/2` at fp32 `positions`
    /// `[..., T]`: tables `[..., T, head_dim/2]`.
    fn at(head_dim: i64, theta: f64, positions: &Tensor) -> Self {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(positions.device());
        let angles = positions.unsqueeze(-1) * inv_freq;
        Self {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// Another handle to the same tables (a checkpointed block keeps one for its recomputation).
    pub fn shallow_clone(&self) -> Self {
        Self {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
        }
    }

    /// Rotates query or key heads by [`glatrain_ops::rotary`] (fp32 math, x's dtype out; on
    /// CUDA one kernel each way).
    ///
    /// # Shapes
    /// `x: [B, T, H, head_dim]` -> same.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        glatrain_ops::rotary(x, &self.cos, &self.sin)
            .unwrap_or_else(|e| panic!("the rotary embedding failed on the layer's own heads: {e}"))
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
    fn per_token_tables_rotate_each_token_by_its_own_position() {
        let x = Tensor::randn([2, 4, 3, 6], (Kind::Float, Device::Cpu));
        let positions = Tensor::from_slice(&[0i64, 1, 0, 1, 5, 6, 7, 8]).view([2, 4]);
        let got = Rotary::per_token(6, 500.0, &positions).apply(&x);
        for (row, col, pos) in [(0, 2, 0), (0, 3, 1), (1, 0, 5), (1, 3, 8)] {
            let token = x.narrow(0, row, 1).narrow(1, col, 1);
            let want = Rotary::new(6, 500.0, pos, 1, Device::Cpu).apply(&token);
            let got = got.narrow(0, row, 1).narrow(1, col, 1);
            assert!(
                got.allclose(&want, 1e-6, 1e-6, false),
                "row {row}, token {col}"
            );
        }
    }

    #[test]
    fn table_at_an_offset_is_a_slice_of_the_full_table() {
        let x = Tensor::randn([2, 6, 3, 4], (Kind::Float, Device::Cpu));
        let full = Rotary::new(4, 500.0, 0, 6, Device::Cpu).apply(&x);
        let tail = Rotary::new(4, 500.0, 4, 2, Device::Cpu).apply(&x.narrow(1, 4, 2));
        assert!(full.narrow(1, 4, 2).allclose(&tail, 1e-6, 1e-6, false));
    }
}
