//! Causal depthwise 1-D convolution over the time axis followed by silu: GLA's optional short
//! convolution on q, k, v (flash-linear-attention's `ShortConvolution`, weight `[D, 1, K]`) and
//! Mamba's `conv1d` (with a bias). The state for decoding is the last `K - 1` inputs. Over packed
//! documents ([`DocumentTaps`]) each document is convolved as if it were alone.

use glatrain_ops::Documents;
use tch::{nn, Device, Kind, Tensor};

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
    /// From the start of a sequence the convolution reads `x` in place (zero padding on both
    /// sides, the last `K - 1` outputs dropped), so the autograd graph keeps `x` itself rather
    /// than a padded copy; after a state, it runs on the state and `x` concatenated.
    ///
    /// # Shapes
    /// `x: [B, T, D]`, `state: [B, D, K-1]` -> (`y: [B, T, D]`, `state: [B, D, K-1]`).
    pub fn forward(&self, x: &Tensor, state: Option<&Tensor>) -> (Tensor, Tensor) {
        let (t, past) = (x.size()[1], self.kernel - 1);
        let xt = x.transpose(1, 2); // [B, D, T]
        let conv = |input: &Tensor, padding: i64| {
            input.conv1d(
                &self.weight,
                self.bias.as_ref(),
                [1],
                [padding],
                [1],
                self.channels,
            )
        };
        let (y, new_state) = match state {
            Some(s) => {
                let joined = Tensor::cat(&[s.to_kind(xt.kind()), xt], 2); // [B, D, T + K - 1]
                (conv(&joined, 0), joined.narrow(2, t, past))
            }
            None => {
                let y = conv(&xt, past).narrow(2, 0, t);
                let new_state = if t >= past {
                    xt.narrow(2, t - past, past)
                } else {
                    xt.constant_pad_nd([past - t, 0])
                };
                (y, new_state)
            }
        }; // y: [B, D, T]
        (y.silu().transpose(1, 2), new_state)
    }

    /// The convolution over whole sequences of packed documents, each as if it were alone.
    ///
    /// # Shapes
    /// `x: [B, T, D]` -> `y: [B, T, D]`, with `taps` made for these rows and this width.
    ///
    /// # Panics
    /// When `taps` was made for another width.
    pub fn forward_documents(&self, x: &Tensor, taps: &DocumentTaps) -> Tensor {
        assert_eq!(taps.kernel, self.kernel, "document taps of another width");
        let t = x.size()[1];
        let y = x
            .transpose(1, 2)
            .conv1d(
                &self.weight,
                self.bias.as_ref(),
                [1],
                [self.kernel - 1],
                [1],
                self.channels,
            )
            .narrow(2, 0, t); // [B, D, T]
        let rows = taps.rows.size()[0];
        if rows == 0 {
            return y.silu().transpose(1, 2);
        }
        // The outputs at documents' first steps again, from their documents' inputs alone.
        let inputs = x.index(&[Some(&taps.source_rows), Some(&taps.source_steps)]); // [m, D]
        let weights = self
            .weight
            .squeeze_dim(1)
            .index_select(1, &taps.columns)
            .transpose(0, 1); // [m, D]
        let base = match &self.bias {
            Some(b) => b.to_kind(Kind::Float).unsqueeze(0).repeat([rows, 1]),
            None => Tensor::zeros([rows, self.channels], (Kind::Float, x.device())),
        };
        let fixed = base.index_add(0, &taps.output, &(inputs.to_kind(Kind::Float) * weights));
        let y = y.index_put(
            &[Some(&taps.rows), None, Some(&taps.steps)],
            &fixed.to_kind(y.kind()),
            false,
        );
        y.silu().transpose(1, 2)
    }
}

/// The outputs of a convolution of width `kernel` that would reach across a document's start
/// (its first `kernel - 1` positions), and the taps that stay inside their document: the
/// convolution runs over whole rows, then those outputs are computed again from their own
/// document's inputs and put in place. Made once per batch, used by every layer.
#[derive(Debug)]
pub struct DocumentTaps {
    kernel: i64,
    /// `[n]` i64: row and step of each output computed again.
    rows: Tensor,
    steps: Tensor,
    /// `[m]` i64 per tap kept: its output (`0..n`), source row, source step and weight column.
    output: Tensor,
    source_rows: Tensor,
    source_steps: Tensor,
    columns: Tensor,
}

impl DocumentTaps {
    /// The taps of a width-`kernel` convolution over `documents`, as tensors on `device`.
    pub fn new(documents: &Documents, kernel: i64, device: Device) -> Result<Self, tch::TchError> {
        let (mut rows, mut steps) = (Vec::new(), Vec::new());
        let (mut output, mut source_rows, mut source_steps, mut columns) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let t_len = documents.seq_len() as i64;
        for row in 0..documents.rows() {
            let starts = documents.starts(row);
            for (i, &start) in starts.iter().enumerate() {
                let (start, end) = (start as i64, starts.get(i + 1).map_or(t_len, |&e| e as i64));
                for t in start..(start + kernel - 1).min(end) {
                    let out = rows.len() as i64;
                    rows.push(row as i64);
                    steps.push(t);
                    // Tap j reads step t - (kernel - 1) + j: kept where that is in the document.
                    for j in 0..kernel {
                        let src = t - (kernel - 1) + j;
                        if src >= start {
                            output.push(out);
                            source_rows.push(row as i64);
                            source_steps.push(src);
                            columns.push(j);
                        }
                    }
                }
            }
        }
        let on = |v: &[i64]| Tensor::f_from_slice(v)?.f_to_device(device);
        Ok(DocumentTaps {
            kernel,
            rows: on(&rows)?,
            steps: on(&steps)?,
            output: on(&output)?,
            source_rows: on(&source_rows)?,
            source_steps: on(&source_steps)?,
            columns: on(&columns)?,
        })
    }

    /// Another handle on the same taps (tensors shallow-cloned).
    pub fn shallow_clone(&self) -> Self {
        DocumentTaps {
            kernel: self.kernel,
            rows: self.rows.shallow_clone(),
            steps: self.steps.shallow_clone(),
            output: self.output.shallow_clone(),
            source_rows: self.source_rows.shallow_clone(),
            source_steps: self.source_steps.shallow_clone(),
            columns: self.columns.shallow_clone(),
        }
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
        // Row 0: documents [0, 2), [2, 3), [3, 9); row 1: [0, 8), [8, 9). Width 4 reaches three
        // steps back.
        let (_vs, c) = conv(true);
        let x = Tensor::randn([2, 9, 3], (Kind::Double, Device::Cpu));
        let docs = Documents::new(9, vec![vec![2, 3], vec![8]]).unwrap();
        let taps = DocumentTaps::new(&docs, 4, Device::Cpu).unwrap();
        let y = c.forward_documents(&x.to_kind(Kind::Float), &taps);
        for (row, begin, len) in docs.spans() {
            let piece = x
                .narrow(0, row as i64, 1)
                .narrow(1, begin as i64, len as i64)
                .to_kind(Kind::Float);
            let (want, _) = c.forward(&piece, None);
            let got = y
                .narrow(0, row as i64, 1)
                .narrow(1, begin as i64, len as i64);
            assert!(
                got.allclose(&want, 1e-6, 1e-6, false),
                "row {row} from {begin}"
            );
        }
        // Without boundaries it is the plain convolution.
        let whole = DocumentTaps::new(&Documents::whole_rows(2, 9), 4, Device::Cpu).unwrap();
        let (plain, _) = c.forward(&x.to_kind(Kind::Float), None);
        let got = c.forward_documents(&x.to_kind(Kind::Float), &whole);
        assert!(got.equal(&plain), "{got} {plain}");
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
