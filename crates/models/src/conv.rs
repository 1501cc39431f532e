//! Causal depthwise 1-D convolution over the time axis followed by silu: GLA's optional short
//! convolution on q, k, v (flash-linear-attention's `ShortConvolution`, weight `[D, 1, K]`) and
//! Mamba's `conv1d` (with a bias), through the fused op `glatrain_ops::causal_conv` (its CUDA
//! kernels on the GPU), over whole rows or packed documents. The state for decoding is the last
//! `K - 1` inputs.

use tch::{nn, Tensor};

/// `y_t = silu(b + sum_{j<K} w_j * x_{t-K+1+j})`, with zeros (or the cached inputs) before the
/// first token.
#[derive(Debug)]
pub struct CausalConv {
    /// `[D, 1, K]`.
    pub weight: Tensor,
    /// `[D]`, when the layer has one.
    pub bias: Option<Tensor>,
    channels: i64,
    kernel: i64,
}

impl CausalConv {
    /// Variables `<path>.weight` (and `<path>.bias`) with the given initialisers.
    pub fn new(
        p: &nn::Path,
        channels: i64,
        kernel: i64,
        weight: nn::Init,
        bias: Option<nn::Init>,
    ) -> Self {
        Self {
            weight: p.var("weight", &[channels, 1, kernel], weight),
            bias: bias.map(|init| p.var("bias", &[channels], init)),
            channels,
            kernel,
        }
    }

    /// Runs the convolution over a whole chunk of time steps. `state` holds the `K - 1` inputs
    /// that precede `x` (None = zeros, the start of a sequence); the returned state holds the
    /// last `K - 1` inputs, ready for the next call.
    ///
    /// From the start of a sequence it is [`CausalConv::forward_sequences`] (the fused op, which
    /// reads `x` in place); after a state, libtorch's convolution on the state and `x`
    /// concatenated.
    ///
    /// # Shapes
    /// `x: [B, T, D]`, `state: [B, D, K-1]` -> (`y: [B, T, D]`, `state: [B, D, K-1]`).
    pub fn forward(&self, x: &Tensor, state: Option<&Tensor>) -> (Tensor, Tensor) {
        let (t, past) = (x.size()[1], self.kernel - 1);
        let xt = x.transpose(1, 2); // [B, D, T]
        match state {
            Some(s) => {
                let joined = Tensor::cat(&[s.to_kind(xt.kind()), xt], 2); // [B, D, T + K - 1]
                let y = joined.conv1d(
                    &self.weight,
                    self.bias.as_ref(),
                    [1],
                    [0],
                    [1],
                    self.channels,
                );
                (y.silu().transpose(1, 2), joined.narrow(2, t, past))
            }
            None => {
                let new_state = if t >= past {
                    xt.narrow(2, t - past, past)
                } else {
                    xt.constant_pad_nd([past - t, 0])
                };
                (self.forward_sequences(x, None), new_state)
            }
        }
    }

    /// The convolution from the start of whole sequences: with `resets` (`[B, T]` bool, where
    /// documents begin), each document as if it were alone.
    ///
    /// # Shapes
    /// `x: [B, T, D]` -> `y: [B, T, D]`.
    pub fn forward_sequences(&self, x: &Tensor, resets: Option<&Tensor>) -> Tensor {
        let weight = self.weight.view([self.channels, self.kernel]);
        glatrain_ops::causal_conv(x, &weight, self.bias.as_ref(), resets)
            .unwrap_or_else(|e| panic!("causal convolution failed on the layer's own inputs: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn conv(bias: bool) -> (nn::VarStore, CausalConv) {
        let vs = nn::VarStore::new(Device::Cpu);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.5,
        };
        let c = CausalConv::new(&(vs.root() / "conv1d"), 3, 4, init, bias.then_some(init));
        (vs, c)
    }

    #[test]
    fn matches_the_direct_sum() {
        let (_vs, c) = conv(true);
        let x = Tensor::randn([2, 6, 3], (Kind::Float, Device::Cpu));
        let (y, _) = c.forward(&x, None);
        let w = c.weight.squeeze_dim(1); // [D, K]
        for t in 0..6 {
            let mut acc = c.bias.as_ref().unwrap().unsqueeze(0).repeat([2, 1]);
            for j in 0..4 {
                let src = t - 3 + j;
                if src >= 0 {
                    acc += x.select(1, src) * w.select(1, j);
                }
            }
            assert!(
                y.select(1, t).allclose(&acc.silu(), 1e-5, 1e-6, false),
                "t={t}"
            );
        }
    }

    #[test]
    fn documents_are_convolved_apart() {
        // Row 0: documents [0, 2), [2, 3), [3, 9); row 1: [0, 8), [8, 9).
        let (_vs, c) = conv(true);
        let x = Tensor::randn([2, 9, 3], (Kind::Float, Device::Cpu));
        let docs = glatrain_ops::Documents::new(9, vec![vec![2, 3], vec![8]]).unwrap();
        let y = c.forward_sequences(&x, Some(&docs.resets(Device::Cpu).unwrap()));
        for (row, begin, len) in docs.spans() {
            let piece = |t: &Tensor| {
                t.narrow(0, row as i64, 1)
                    .narrow(1, begin as i64, len as i64)
            };
            let (want, _) = c.forward(&piece(&x), None);
            assert!(
                piece(&y).allclose(&want, 1e-6, 1e-6, false),
                "row {row} from {begin}"
            );
        }
    }

    #[test]
    fn chunks_with_state_equal_one_pass() {
        let (_vs, c) = conv(false);
        let x = Tensor::randn([2, 7, 3], (Kind::Float, Device::Cpu));
        let (full, _) = c.forward(&x, None);
        // A first piece as long as the state (K - 1 = 3 inputs) and one shorter than it.
        for first in [3, 2] {
            let (a, s) = c.forward(&x.narrow(1, 0, first), None);
            let (b, s) = c.forward(&x.narrow(1, first, 1), Some(&s));
            let (d, _) = c.forward(&x.narrow(1, first + 1, 6 - first), Some(&s));
            let pieces = Tensor::cat(&[a, b, d], 1);
            assert!(pieces.allclose(&full, 1e-6, 1e-6, false), "first {first}");
        }
    }
}
