//! The language-model loss without the full logits: the output projection and the cross-entropy
//! computed chunk by chunk of rows, forward and backward, so neither the `[tokens, vocab]` logits
//! nor their gradient is ever held whole (at GLA-340M's 16384 tokens x 32000 vocabulary that is
//! 2 GiB of fp32 logits, and as much again for their gradient and for the log-softmax).
//!
//! ```text
//! loss = mean_i ( logsumexp_v (h_i . W_v) - h_i . W_{t_i} )
//! ```
//!
//! The forward keeps only each row's logsumexp; the backward computes each chunk's logits again,
//! turns them into `softmax - onehot`, and accumulates dh and dW chunk by chunk.

use glatrain_shim::autograd::{CustomOp, Forward};
use tch::{Kind, Tensor};

use crate::bridge::{self, bridged, bridged_list};
use crate::OpError;

/// Rows per chunk unless the caller says otherwise: 4096 x 32000 fp32 logits are 500 MiB.
pub const DEFAULT_CHUNK_ROWS: i64 = 4096;

const OP: &str = "linear_cross_entropy";

/// The mean cross-entropy of `hidden @ weight^T` against `targets`, differentiable in `hidden`
/// and `weight`, computed `chunk_rows` rows at a time (see the module docs).
///
/// The products run in `compute` (the autocast dtype, or fp32), the softmax and the sums in
/// fp32, as an unfused `cross_entropy(linear(h, W).float(), t)` under autocast would.
///
/// # Shapes
/// `hidden: [N, d]`, `weight: [V, d]`, `targets: [N]` (int64, each in `0..V`) -> a scalar fp32.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    compute: Kind,
    chunk_rows: i64,
) -> Result<Tensor, OpError> {
    let (n, d) = hidden.size2().map_err(|_| OpError::Shape {
        op: OP,
        tensor: "hidden",
        expected: "[N, d]".into(),
        actual: hidden.size(),
    })?;
    if weight.size().len() != 2 || weight.size()[1] != d {
        return Err(OpError::Shape {
            op: OP,
            tensor: "weight",
            expected: format!("[V, {d}]"),
            actual: weight.size(),
        });
    }
    if targets.size() != [n] || targets.kind() != Kind::Int64 {
        return Err(OpError::Shape {
            op: OP,
            tensor: "targets",
            expected: format!("[{n}] int64"),
            actual: targets.size(),
        });
    }
    if chunk_rows < 1 {
        return Err(OpError::Scalar {
            op: OP,
            name: "chunk_rows",
            value: chunk_rows as f64,
            expected: "must be at least 1",
        });
    }
    let op = LinearCrossEntropy {
        compute,
        chunk_rows,
    };
    let [loss] = bridge::apply(OP, op, &[Some(hidden), Some(weight), Some(targets)])?;
    Ok(loss)
}

/// The op as the autograd bridge runs it: inputs (hidden, weight, targets), one output (the
/// loss), saved (hidden, weight, targets, the rows' logsumexp).
struct LinearCrossEntropy {
    compute: Kind,
    chunk_rows: i64,
}

impl LinearCrossEntropy {
    /// The rows `[start, start + len)` of `x`.
    fn rows(x: &Tensor, start: i64, len: i64) -> Result<Tensor, OpError> {
        Ok(x.f_narrow(0, start, len)?)
    }

    /// fp32 logits of hidden rows `h` against the weight already in the compute dtype.
    fn logits(&self, h: &Tensor, w: &Tensor) -> Result<Tensor, OpError> {
        Ok(h.f_to_kind(self.compute)?
            .f_matmul(&w.f_tr()?)?
            .f_to_kind(Kind::Float)?)
    }

    fn forward(&self, h: &Tensor, w: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor), OpError> {
        let _no_grad = tch::no_grad_guard();
        let n = h.size()[0];
        let w = w.f_to_kind(self.compute)?;
        let mut lse_parts = Vec::new();
        let mut total = Tensor::f_zeros([], (Kind::Float, h.device()))?;
        let mut start = 0;
        while start < n {
            let len = self.chunk_rows.min(n - start);
            let logits = self.logits(&Self::rows(h, start, len)?, &w)?;
            let lse = logits.f_logsumexp([1], false)?;
            let picked = logits
                .f_gather(1, &Self::rows(t, start, len)?.f_unsqueeze(1)?, false)?
                .f_squeeze_dim(1)?;
            total = total.f_add(&lse.f_sub(&picked)?.f_sum(Kind::Float)?)?;
            lse_parts.push(lse);
            start += len;
        }
        let loss = total.f_div_scalar(n.max(1) as f64)?;
        let lse = if lse_parts.is_empty() {
            Tensor::f_zeros([0], (Kind::Float, h.device()))?
        } else {
            Tensor::f_cat(&lse_parts, 0)?
        };
        Ok((loss, lse))
    }

    fn backward(
        &self,
        (h, w, t, lse): (&Tensor, &Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor), OpError> {
        let _no_grad = tch::no_grad_guard();
        let n = h.size()[0];
        let w_compute = w.f_to_kind(self.compute)?;
        // d(mean)/d(row) = grad / N for every row.
        let scale = grad.f_to_kind(Kind::Float)?.f_div_scalar(n.max(1) as f64)?;
        let mut dh_parts = Vec::new();
        let mut dw = Tensor::f_zeros(w.size(), (Kind::Float, w.device()))?;
        let mut start = 0;
        while start < n {
            let len = self.chunk_rows.min(n - start);
            let h_rows = Self::rows(h, start, len)?;
            let logits = self.logits(&h_rows, &w_compute)?;
            // softmax - onehot(target), times the incoming gradient over N.
            let lse = Self::rows(lse, start, len)?.f_unsqueeze(1)?;
            let mut p = logits.f_sub(&lse)?.f_exp()?;
            let target = Self::rows(t, start, len)?.f_unsqueeze(1)?;
            let minus_one = Tensor::f_full([len, 1], -1.0, (Kind::Float, p.device()))?;
            p = p.f_scatter_add(1, &target, &minus_one)?;
            let g = p.f_mul(&scale)?.f_to_kind(self.compute)?;
            dh_parts.push(g.f_matmul(&w_compute)?.f_to_kind(h.kind())?);
            dw = dw.f_add(
                &g.f_tr()?
                    .f_matmul(&h_rows.f_to_kind(self.compute)?)?
                    .f_to_kind(Kind::Float)?,
            )?;
            start += len;
        }
        let dh = if dh_parts.is_empty() {
            h.f_zeros_like()?
        } else {
            Tensor::f_cat(&dh_parts, 0)?
        };
        Ok((dh, dw.f_to_kind(w.kind())?))
    }
}

impl CustomOp for LinearCrossEntropy {
    fn forward(&self, inputs: &[Option<&Tensor>]) -> Result<Forward, String> {
        let [h, w, t] = bridged_list(OP, "inputs", inputs)?;
        let (h, w, t) = (
            bridged(OP, *h, "hidden")?,
            bridged(OP, *w, "weight")?,
            bridged(OP, *t, "targets")?,
        );
        let (loss, lse) = self.forward(h, w, t).map_err(|e| e.to_string())?;
        Ok(Forward::saving(
            vec![loss],
            &[Some(h), Some(w), Some(t)],
            [Some(lse)],
        ))
    }

    fn backward(
        &self,
        saved: &[Option<&Tensor>],
        grads: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        let [h, w, t, lse] = bridged_list(OP, "saved tensors", saved)?;
        let saved = (
            bridged(OP, *h, "hidden")?,
            bridged(OP, *w, "weight")?,
            bridged(OP, *t, "targets")?,
            bridged(OP, *lse, "logsumexp")?,
        );
        let Some(grad) = grads.first().copied().flatten() else {
            return Ok(vec![None, None, None]);
        };
        let (dh, dw) = self.backward(saved, grad).map_err(|e| e.to_string())?;
        Ok(vec![Some(dh), Some(dw), None])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};
    use tch::Device;

    /// The unfused loss: full logits, then cross-entropy.
    fn unfused(h: &Tensor, w: &Tensor, t: &Tensor, kind: Kind) -> Tensor {
        h.to_kind(kind)
            .matmul(&w.to_kind(kind).tr())
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(t)
    }

    fn case(n: i64, d: i64, v: i64, kind: Kind, seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let h = rng.randn(&[n, d], kind).set_requires_grad(true);
        let w = (rng.randn(&[v, d], kind) * 0.1)
            .detach()
            .set_requires_grad(true);
        let t = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
        (h, w, t)
    }

    #[test]
    fn equals_the_unfused_loss_and_its_gradients() {
        // Odd sizes, chunks that do not divide the rows, a single chunk and one row per chunk.
        for (n, d, v, chunk) in [(37, 16, 101, 8), (5, 3, 7, 100), (9, 4, 11, 1)] {
            let (h, w, t) = case(n, d, v, Kind::Float, n as u64);
            let fused = linear_cross_entropy(&h, &w, &t, Kind::Float, chunk).unwrap();
            let want = unfused(&h, &w, &t, Kind::Float);
            assert!(rel_rms(&fused, &want) < 1e-6, "{n} {chunk}");
            let grads = |loss: &Tensor| Tensor::run_backward(&[loss], &[&h, &w], false, false);
            let (g, gw) = (grads(&(&fused * 3.0)), grads(&(&want * 3.0)));
            for (name, a, b) in [("dh", &g[0], &gw[0]), ("dW", &g[1], &gw[1])] {
                let err = rel_rms(a, b);
                assert!(err < 1e-5, "{name} {n} {chunk}: {err}");
            }
        }
    }

    #[test]
    fn half_precision_products_match_the_autocast_loss() {
        // Products in bf16 as under autocast: the same roundings as the unfused bf16 loss.
        let (h, w, t) = case(64, 32, 300, Kind::Float, 7);
        let fused = linear_cross_entropy(&h, &w, &t, Kind::BFloat16, 16).unwrap();
        let want = unfused(&h, &w, &t, Kind::BFloat16);
        let exact = unfused(&h, &w, &t, Kind::Float);
        let err = rel_rms(&fused, &exact);
        let naive = rel_rms(&want, &exact);
        assert!(err <= 2.0 * naive.max(1e-6), "{err} vs naive {naive}");
    }

    #[test]
    fn bad_shapes_name_the_tensor() {
        let (h, w, t) = case(4, 3, 5, Kind::Float, 1);
        let err = linear_cross_entropy(&h, &w.narrow(1, 0, 2), &t, Kind::Float, 2).unwrap_err();
        assert!(
            err.is_bad_input() && err.to_string().contains("weight must be [V, 3]"),
            "{err}"
        );
        let err = linear_cross_entropy(&h, &w, &t.narrow(0, 0, 3), Kind::Float, 2).unwrap_err();
        assert!(
            err.to_string().contains("targets must be [4] int64"),
            "{err}"
        );
        let err = linear_cross_entropy(&h, &w, &t, Kind::Float, 0).unwrap_err();
        assert!(err.to_string().contains("chunk_rows = 0"), "{err}");
    }
}
