//! Gated linear attention over packed documents (flash-linear-attention's `cu_seqlens`): every
//! document of a row computed as if it were alone, its state starting from zero.
//!
//! On CUDA the kernels of any mode run once over one sequence in which the documents of all rows
//! lie end to end, each followed by padding up to the next multiple of the 64-token chunk (at
//! least one padding token). Padding has zero q, k, v and log gate, except its last token, whose
//! log gate is [`RESTART_LOG_GATE`]: its decay `exp(-1e4)` is 0 in fp32, so the state that reaches
//! the next document is exactly zero, and since that document starts a chunk, no chunk mixes two
//! documents. The kernels take such a gate as it is: every exponent they form is a difference
//! `b_t - b_s` with `s <= t` (at most 0), except inside the tensor-core kernels' 16-token blocks,
//! where a block whose gate span is that wide is taken one exp per pair (kernels/gla_tc.cu,
//! "Numerics"). Gradients reach only the documents' tokens; padding's are dropped.
//!
//! On the CPU, and for [`GlaMode::Reference`], each document runs apart through the reference.

use tch::{Device, Kind, Tensor};

use super::{effective_mode, geometry::CHUNK_LEN, gla, GlaMode};
use crate::{Documents, OpError};

const OP: &str = "gla_documents";

/// The log gate of the last padding token before each document: a decay that is exactly zero.
pub const RESTART_LOG_GATE: f64 = -1e4;

/// Documents laid out for [`gla_documents`] on one device: made once per batch, used by every
/// layer.
#[derive(Debug)]
pub struct GlaDocuments {
    documents: Documents,
    device: Device,
    /// The kernels' layout (CUDA only).
    layout: Option<Layout>,
}

/// Where the tokens go in the laid-out sequence.
#[derive(Debug)]
struct Layout {
    /// `[rows * seq_len]` i64: each token's position in the laid-out sequence.
    positions: Tensor,
    /// i64: the restart tokens' positions (the last padding token before each document).
    restarts: Tensor,
    /// Tokens in the laid-out sequence.
    length: i64,
}

impl Layout {
    fn new(documents: &Documents, device: Device) -> Result<Self, OpError> {
        let row_len = documents.seq_len() as i64;
        let mut positions = Vec::with_capacity(documents.rows() * documents.seq_len());
        let mut restarts = Vec::new();
        let mut next = 0i64;
        for (_, _, len) in documents.spans() {
            let len = len as i64;
            positions.extend(next..next + len);
            // At least one padding token, up to the chunk's end.
            let end = crate::launch::tiles(next + len + 1, CHUNK_LEN) * CHUNK_LEN;
            restarts.push(end - 1);
            next = end;
        }
        debug_assert_eq!(positions.len() as i64, documents.rows() as i64 * row_len);
        Ok(Layout {
            positions: Tensor::f_from_slice(&positions)?.f_to_device(device)?,
            restarts: Tensor::f_from_slice(&restarts)?.f_to_device(device)?,
            length: next,
        })
    }

    /// `x` (`[B, T, H, D]`) laid out as `[1, length, H, D]`, zero on the padding.
    fn spread(&self, x: &Tensor) -> Result<Tensor, OpError> {
        let s = x.size();
        let flat = x.f_reshape([1, s[0] * s[1], s[2], s[3]])?;
        // In place into a fresh tensor: one pass over x, and autograd still reaches x.
        let mut laid = Tensor::f_zeros([1, self.length, s[2], s[3]], (x.kind(), x.device()))?;
        Ok(laid.f_index_copy_(1, &self.positions, &flat)?)
    }
}

impl GlaDocuments {
    /// The layout of `documents` for tensors on `device`.
    pub fn new(documents: &Documents, device: Device) -> Result<Self, OpError> {
        let layout = match device {
            Device::Cuda(_) => Some(Layout::new(documents, device)?),
            _ => None,
        };
        Ok(GlaDocuments {
            documents: documents.clone(),
            device,
            layout,
        })
    }

    /// Another handle on the same layout (its tensors shallow-cloned).
    pub fn shallow_clone(&self) -> Self {
        GlaDocuments {
            documents: self.documents.clone(),
            device: self.device,
            layout: self.layout.as_ref().map(|l| Layout {
                positions: l.positions.shallow_clone(),
                restarts: l.restarts.shallow_clone(),
                length: l.length,
            }),
        }
    }
}

/// [`gla`] over the documents of each row, each as if it were alone (zero initial state), in
/// `mode`. No final state: the documents' states are not kept.
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]` with `B, T` the documents' rows and length.
/// Returns o `[B, T, H, V]` in v's dtype.
pub fn gla_documents(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    documents: &GlaDocuments,
    scale: Option<f64>,
    mode: GlaMode,
) -> Result<Tensor, OpError> {
    for (name, x) in [("q", q), ("k", k), ("v", v), ("gk", gk)] {
        documents.documents.check_batch(OP, name, x)?;
        if x.dim() != 4 {
            return Err(OpError::shape(OP, name, "[B, T, H, D]".into(), x.size()));
        }
    }
    if q.device() != documents.device {
        return Err(OpError::Device {
            tensor: "q",
            expected: documents.device,
            actual: q.device(),
        });
    }
    let t = q.size()[1];
    match (&documents.layout, effective_mode(mode, q.device(), t)) {
        (Some(layout), m) if m != GlaMode::Reference => {
            let [qp, kp, vp] = [q, k, v].map(|x| layout.spread(x));
            let gp = layout.spread(&gk.f_to_kind(Kind::Float)?)?.f_index_fill(
                1,
                &layout.restarts,
                RESTART_LOG_GATE,
            )?;
            let (o, _) = gla(&qp?, &kp?, &vp?, &gp, None, scale, mode, false)?;
            let s = v.size();
            Ok(o.f_index_select(1, &layout.positions)?
                .f_view([s[0], s[1], s[2], s[3]])?)
        }
        _ => apart(q, k, v, gk, &documents.documents, scale, mode),
    }
}

/// Each document through [`gla`] on its own; the outputs joined back into rows.
fn apart(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    documents: &Documents,
    scale: Option<f64>,
    mode: GlaMode,
) -> Result<Tensor, OpError> {
    let mut pieces = Vec::new();
    for (row, begin, len) in documents.spans() {
        let piece = |x: &Tensor| -> Result<Tensor, OpError> {
            Ok(x.f_narrow(0, row as i64, 1)?
                .f_narrow(1, begin as i64, len as i64)?)
        };
        let (o, _) = gla(
            &piece(q)?,
            &piece(k)?,
            &piece(v)?,
            &piece(gk)?,
            None,
            scale,
            mode,
            false,
        )?;
        pieces.push(o);
    }
    let s = v.size();
    Ok(Tensor::f_cat(&pieces, 1)?.f_view([s[0], s[1], s[2], s[3]])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{rel_rms, Rng};

    #[test]
    fn documents_start_chunks_after_at_least_one_padding_token() {
        // Lengths 3, 61, 64 and 5 (rows of 64 tokens starting documents at 3 and at 0 and 59).
        let docs = Documents::new(64, vec![vec![3], vec![59]]).unwrap();
        let layout = Layout::new(&docs, Device::Cpu).unwrap();
        let positions = Vec::<i64>::try_from(&layout.positions).unwrap();
        let restarts = Vec::<i64>::try_from(&layout.restarts).unwrap();
        // 3 -> [0, 64), 61 -> [64, 128), 59 -> [128, 192) (59 + 1 fits), 5 -> [192, 256).
        assert_eq!(restarts, [63, 127, 191, 255]);
        assert_eq!(layout.length, 256);
        assert_eq!(&positions[..4], &[0, 1, 2, 64]);
        assert_eq!(positions[64], 128);
        assert_eq!(positions[64 + 59], 192);
        assert_eq!(positions.len(), 128);
    }

    #[test]
    fn a_full_chunk_document_gets_a_whole_chunk_of_padding() {
        let docs = Documents::new(64, vec![vec![]]).unwrap();
        let layout = Layout::new(&docs, Device::Cpu).unwrap();
        assert_eq!(layout.length, 128);
        assert_eq!(Vec::<i64>::try_from(&layout.restarts).unwrap(), [127]);
    }

    #[test]
    fn the_cpu_runs_each_document_apart() {
        let mut rng = Rng::new(5);
        let kd = Kind::Double;
        let (b, t, h, dk, dv) = (2, 11, 2, 3, 5);
        let q = rng.randn(&[b, t, h, dk], kd);
        let k = rng.randn(&[b, t, h, dk], kd);
        let v = rng.randn(&[b, t, h, dv], kd);
        let g = -rng.randn(&[b, t, h, dk], kd).exp();
        let docs = Documents::new(11, vec![vec![4], vec![1, 10]]).unwrap();
        let laid = GlaDocuments::new(&docs, Device::Cpu).unwrap();
        let o = gla_documents(&q, &k, &v, &g, &laid, None, GlaMode::Chunk).unwrap();
        for (row, begin, len) in docs.spans() {
            let piece = |x: &Tensor| {
                x.narrow(0, row as i64, 1)
                    .narrow(1, begin as i64, len as i64)
            };
            let (want, _) = gla(
                &piece(&q),
                &piece(&k),
                &piece(&v),
                &piece(&g),
                None,
                None,
                GlaMode::FusedRecurrent,
                false,
            )
            .unwrap();
            assert!(rel_rms(&piece(&o), &want) < 1e-12, "row {row} from {begin}");
        }
        // The whole row when it is one document.
        let one = GlaDocuments::new(&Documents::whole_rows(2, 11), Device::Cpu).unwrap();
        let o = gla_documents(&q, &k, &v, &g, &one, None, GlaMode::Chunk).unwrap();
        let (want, _) = gla(&q, &k, &v, &g, None, None, GlaMode::Chunk, false).unwrap();
        assert!(rel_rms(&o, &want) < 1e-12);
    }

    #[test]
    fn the_laid_out_sequence_with_restart_gates_equals_the_documents_apart() {
        // The kernels' path with the references in place of the kernels (token by token, and
        // chunked as the chunk kernels are, 64-token chunks in 16-token sub-chunks): outputs and
        // gradients through the layout (index_copy_ in, index_select out) equal the documents
        // run apart.
        type Form = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor;
        let forms: [(&str, Form); 2] = [
            ("recurrent", |q, k, v, g| {
                crate::reference::gla::gla_recurrent(q, k, v, g, None, 0.5).0
            }),
            ("chunked", |q, k, v, g| {
                crate::reference::gla::gla_chunked(q, k, v, g, None, 0.5, CHUNK_LEN).0
            }),
        ];
        let mut rng = Rng::new(9);
        let kd = Kind::Double;
        let (b, t, h, dk, dv) = (2, 70, 1, 3, 4);
        let gates = -rng.randn(&[b, t, h, dk], kd).exp();
        let leaves: Vec<Tensor> = [dk, dk, dv]
            .iter()
            .map(|&d| rng.randn(&[b, t, h, d], kd))
            .chain([gates])
            .map(|x| x.set_requires_grad(true))
            .collect();
        let weights = rng.randn(&[b, t, h, dv], kd);
        let docs = Documents::new(70, vec![vec![1, 64, 65], vec![30]]).unwrap();
        let apart = GlaDocuments::new(&docs, Device::Cpu).unwrap();
        let (q, k, v, g) = (&leaves[0], &leaves[1], &leaves[2], &leaves[3]);
        let want = gla_documents(q, k, v, g, &apart, Some(0.5), GlaMode::Chunk).unwrap();
        let want_grads = Tensor::run_backward(&[(&want * &weights).sum(kd)], &leaves, false, false);

        let layout = Layout::new(&docs, Device::Cpu).unwrap();
        for (name, form) in forms {
            let laid: Vec<Tensor> = leaves.iter().map(|x| layout.spread(x).unwrap()).collect();
            let gates = laid[3].index_fill(1, &layout.restarts, RESTART_LOG_GATE);
            let o = form(&laid[0], &laid[1], &laid[2], &gates);
            let together = o.index_select(1, &layout.positions).view([b, t, h, dv]);
            assert!(rel_rms(&together, &want) < 1e-12, "{name}");
            let loss = (&together * &weights).sum(kd);
            let grads = Tensor::run_backward(&[loss], &leaves, false, false);
            for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
                assert!(
                    rel_rms(g, w) < 1e-12,
                    "{name}: gradient {i}: {}",
                    rel_rms(g, w)
                );
            }
        }
    }

    #[test]
    fn inputs_of_another_batch_are_refused() {
        let x = Tensor::zeros([2, 5, 1, 4], (Kind::Float, Device::Cpu));
        let docs = GlaDocuments::new(&Documents::whole_rows(2, 6), Device::Cpu).unwrap();
        let err = gla_documents(&x, &x, &x, &x, &docs, None, GlaMode::Chunk).unwrap_err();
        assert!(
            err.to_string()
                .contains("gla_documents: q must be [2, 6, ...]"),
            "{err}"
        );
    }
}
