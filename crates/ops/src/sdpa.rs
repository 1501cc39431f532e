//! libtorch's causal scaled-dot-product attention on `[B, T, H, D]` tensors, which of its
//! backends runs it, and block-causal attention over the documents packed into a batch's rows.
//!
//! libtorch picks a backend per call. On an H100 with libtorch 2.11 and cuDNN 9 it picks cuDNN's
//! kernel for bf16 causal attention, not FlashAttention-2, and the two differ by up to 1.9x
//! (flash-linear-attention's comparisons use FlashAttention-2 alone). `glatrain_shim::sdp::OnlyBackend`
//! narrows the choice the way `torch.nn.attention.sdpa_kernel` does; [`chosen_backend`] says what
//! libtorch would run.
//!
//! [`block_causal_sdpa`] lets a token see only the earlier tokens of its own document
//! ([`BlockCausal`] says where the documents lie), as flash-attn's `flash_attn_varlen_func` does
//! for packed sequences.

use glatrain_shim::sdp::{self, SdpaBackend};
use tch::{Device, Kind, TchError, Tensor};

use crate::{Documents, OpError};

const OP: &str = "block_causal_sdpa";

/// q, k, v as [B, H, T, D] views, SDPA's layout (it handles the strides).
fn heads_first(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[Tensor; 3], TchError> {
    Ok([
        q.f_transpose(1, 2)?,
        k.f_transpose(1, 2)?,
        v.f_transpose(1, 2)?,
    ])
}

/// Causal softmax attention with scale 1/sqrt(D), on whichever backend libtorch picks.
///
/// # Shapes
///
/// q, k: [B, T, H, D], v: [B, T, H, Dv]; returns [B, T, H, Dv] (a view with heads-first strides).
pub fn causal_sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, TchError> {
    let [q, k, v] = heads_first(q, k, v)?;
    Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)?
        .f_transpose(1, 2)
}

/// The backend libtorch would run [`causal_sdpa`] on for these inputs, with the backends enabled
/// now; `None` when none of them supports the inputs.
pub fn chosen_backend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<SdpaBackend>, TchError> {
    let [q, k, v] = heads_first(q, k, v)?;
    let choice =
        Tensor::f_internal_fused_sdp_choice::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)?;
    Ok(SdpaBackend::from_index(choice))
}

/// Where the documents of a packed `[B, T]` batch lie, in the forms block-causal attention takes
/// them, on one device: each document's first token over the rows laid end to end (FlashAttention's
/// `cu_seqlens`, int32) and the longest document, for the varlen kernel; each token's document
/// index, for the mask. Made once per forward, shared by every layer.
#[derive(Debug)]
pub struct BlockCausal {
    cu_seqlens: Tensor,
    longest: i64,
    /// `[B, T]` i64.
    ids: Tensor,
}

impl BlockCausal {
    /// The block-causal pattern of `documents`, its tensors on `device`.
    pub fn new(documents: &Documents, device: Device) -> Result<Self, OpError> {
        let offsets: Vec<i32> = documents
            .offsets()
            .iter()
            .map(|&o| i32::try_from(o))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                OpError::Documents(format!(
                    "{OP}: {} rows of {} tokens are more than FlashAttention's int32 offsets count",
                    documents.rows(),
                    documents.seq_len()
                ))
            })?;
        Ok(Self {
            cu_seqlens: Tensor::f_from_slice(&offsets)?.f_to_device(device)?,
            longest: documents.longest() as i64,
            ids: documents.document_ids(device)?,
        })
    }

    /// Another handle on the same tensors (a checkpointed block keeps one for its recomputation).
    pub fn shallow_clone(&self) -> Self {
        Self {
            cu_seqlens: self.cu_seqlens.shallow_clone(),
            longest: self.longest,
            ids: self.ids.shallow_clone(),
        }
    }

    /// `[B, 1, T, T]` bool, true where query t may attend to key s: s <= t, in one document.
    pub fn mask(&self) -> Result<Tensor, TchError> {
        let t = self.ids.size()[1];
        let same = self
            .ids
            .f_unsqueeze(2)?
            .f_eq_tensor(&self.ids.f_unsqueeze(1)?)?;
        let causal = Tensor::f_ones([t, t], (Kind::Bool, self.ids.device()))?.f_tril(0)?;
        same.f_logical_and(&causal)?.f_unsqueeze(1)
    }

    /// Checks that q, k, v are `[B, T, H, D]`, `[B, T, H_kv, D]`, `[B, T, H_kv, Dv]` over this
    /// batch, with H_kv dividing H.
    fn check(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(), OpError> {
        let (b, t) = (self.ids.size()[0], self.ids.size()[1]);
        let (q_size, k_size, v_size) = (q.size(), k.size(), v.size());
        if q_size.len() != 4 || q_size[..2] != [b, t] {
            let expected = format!("[{b}, {t}, H, D] as its documents");
            return Err(OpError::shape(OP, "q", expected, q_size));
        }
        let (h, d) = (q_size[2], q_size[3]);
        let heads_divide = |h_kv: i64| h_kv > 0 && h % h_kv == 0;
        if k_size.len() != 4 || k_size[..2] != [b, t] || k_size[3] != d || !heads_divide(k_size[2])
        {
            let expected = format!("[{b}, {t}, H_kv, {d}] with H_kv dividing q's {h} heads");
            return Err(OpError::shape(OP, "k", expected, k_size));
        }
        if v_size.len() != 4 || v_size[..3] != k_size[..3] {
            let expected = format!("[{b}, {t}, {}, Dv]", k_size[2]);
            return Err(OpError::shape(OP, "v", expected, v_size));
        }
        Ok(())
    }
}

/// Block-causal softmax attention with scale 1/sqrt(D): query t attends to key s only where
/// s <= t and both lie in one document, so each document is computed as if it were alone. k and
/// v may have fewer heads than q (grouped-query attention: key head j serves query heads
/// j g .. (j + 1) g, g = H / H_kv).
///
/// Runs libtorch's varlen FlashAttention where [`flash_takes`] says so, else SDPA with the
/// block-causal mask on whichever backend libtorch picks for masked attention.
///
/// # Shapes
///
/// q: [B, T, H, D], k: [B, T, H_kv, D], v: [B, T, H_kv, Dv] over `blocks`' batch; returns
/// [B, T, H, Dv].
pub fn block_causal_sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &BlockCausal,
) -> Result<Tensor, OpError> {
    blocks.check(q, k, v)?;
    if flash_takes(q, k, v)? {
        // The documents laid end to end: [B * T, heads, D].
        let packed = |x: &Tensor| -> Result<Tensor, TchError> {
            let s = x.size();
            x.f_contiguous()?.f_view([s[0] * s[1], s[2], s[3]])
        };
        let o = sdp::flash_varlen_causal(
            &packed(q)?,
            &packed(k)?,
            &packed(v)?,
            &blocks.cu_seqlens,
            blocks.longest,
        )
        .map_err(TchError::Torch)?;
        return Ok(o.f_view(q.size().as_slice())?);
    }
    let [qh, kh, vh] = heads_first(q, k, v)?;
    let gqa = qh.size()[1] != kh.size()[1];
    let mask = blocks.mask()?;
    let o =
        Tensor::f_scaled_dot_product_attention(&qh, &kh, &vh, Some(&mask), 0.0, false, None, gqa)?;
    Ok(o.f_transpose(1, 2)?)
}

/// Whether [`block_causal_sdpa`] runs these `[B, T, H, D]` inputs on libtorch's varlen
/// FlashAttention: CUDA tensors that libtorch's flash backend takes for causal attention (its
/// check covers the build, the GPU, fp16/bf16, head dims up to 256 and the backend being enabled),
/// with v's head dim equal to q's and a multiple of 8 (SDPA pads other head dims before calling
/// FlashAttention; the varlen entry point refuses them). Everything else (the CPU, fp32, other
/// head dims) takes the masked path.
pub fn flash_takes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool, OpError> {
    let (d, dv) = (q.size()[3], v.size()[3]);
    if !q.device().is_cuda() || d != dv || d % 8 != 0 {
        return Ok(false);
    }
    let [q, k, v] = heads_first(q, k, v)?;
    Ok(sdp::flash_supports(&q, &k, &v).map_err(TchError::Torch)?)
}

/// The obviously right attention: softmax(q k^T / sqrt(D), keys outside `allowed` masked) v,
/// every product and the softmax in `kind`; k and v heads repeated for grouped-query attention.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, allowed: &Tensor, kind: Kind) -> Tensor {
    let (h, d) = (q.size()[2], q.size()[3]);
    let group = h / k.size()[2];
    let [q, k, v] = [q, k, v].map(|x| x.to_kind(kind).transpose(1, 2));
    let [k, v] = [k, v].map(|x| x.repeat_interleave_self_int(group, 1, None));
    let scores = q.matmul(&k.transpose(2, 3)) / (d as f64).sqrt();
    let p = scores
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
        .softmax(-1, kind);
    p.matmul(&v).transpose(1, 2)
}

/// The obviously right reference of [`causal_sdpa`]: softmax(q k^T / sqrt(D) + causal mask) v,
/// every product and the softmax in `kind`.
///
/// # Shapes
///
/// As [`causal_sdpa`], and k, v may have fewer heads than q (as in [`block_causal_sdpa`]).
pub fn naive_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, kind: Kind) -> Tensor {
    let t = q.size()[1];
    let past = Tensor::ones([t, t], (Kind::Bool, q.device())).tril(0);
    naive_attention(q, k, v, &past, kind)
}

/// The obviously right reference of [`block_causal_sdpa`], in `kind` as
/// [`naive_causal_attention`].
///
/// # Panics
/// When the mask cannot be made (libtorch's message).
pub fn naive_block_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &BlockCausal,
    kind: Kind,
) -> Tensor {
    let allowed = blocks
        .mask()
        .unwrap_or_else(|e| panic!("naive_block_causal_attention: {e}"));
    naive_attention(q, k, v, &allowed, kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_shim::sdp::{enabled_mask, OnlyBackend};
    use tch::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        naive_causal_attention(q, k, v, Kind::Double)
    }

    #[test]
    fn naive_attention_of_one_token_is_its_value_and_later_keys_are_masked() {
        let opts = (Kind::Double, Device::Cpu);
        let (q, k, v) = (
            Tensor::randn([1, 3, 1, 4], opts),
            Tensor::randn([1, 3, 1, 4], opts),
            Tensor::randn([1, 3, 1, 2], opts),
        );
        let o = naive(&q, &k, &v);
        // Token 0 attends only to itself; token 1 mixes values 0 and 1 by the softmax of scores.
        let err0 = (o.get(0).get(0) - v.get(0).get(0))
            .abs()
            .max()
            .double_value(&[]);
        assert!(err0 < 1e-12, "{err0}");
        let s: Vec<f64> = (0..2)
            .map(|j| {
                (q.get(0).get(1) * k.get(0).get(j))
                    .sum(Kind::Double)
                    .double_value(&[])
                    / 2.0
            })
            .collect();
        let w1 = 1.0 / (1.0 + (s[0] - s[1]).exp());
        let want = v.get(0).get(0) * (1.0 - w1) + v.get(0).get(1) * w1;
        let err1 = (o.get(0).get(1) - want).abs().max().double_value(&[]);
        assert!(err1 < 1e-12, "{err1}");
    }

    fn inputs() -> (Tensor, Tensor, Tensor) {
        let opts = (Kind::Double, Device::Cpu);
        (
            Tensor::randn([2, 7, 3, 5], opts),
            Tensor::randn([2, 7, 3, 5], opts),
            Tensor::randn([2, 7, 3, 4], opts),
        )
    }

    #[test]
    fn causal_sdpa_is_masked_softmax_attention_in_the_token_major_layout() {
        let (q, k, v) = inputs();
        let o = causal_sdpa(&q, &k, &v).unwrap();
        assert_eq!(o.size(), [2, 7, 3, 4]);
        let err = (&o - naive(&q, &k, &v)).abs().max().double_value(&[]);
        assert!(err < 1e-12, "{err}");
    }

    #[test]
    fn only_backend_narrows_the_choice_and_restores_it_on_drop() {
        let (q, k, v) = inputs();
        let before = enabled_mask();
        {
            let _only = OnlyBackend::new(SdpaBackend::Math);
            assert_eq!(chosen_backend(&q, &k, &v).unwrap(), Some(SdpaBackend::Math));
            assert_eq!(enabled_mask(), 1);
            // The math backend still computes the same attention.
            let err = (causal_sdpa(&q, &k, &v).unwrap() - naive(&q, &k, &v))
                .abs()
                .max()
                .double_value(&[]);
            assert!(err < 1e-12, "{err}");
        }
        assert_eq!(enabled_mask(), before);
    }

    /// Three rows of 13 tokens: documents of 4, 1 and 8 tokens; one whole row; 12 tokens and a
    /// last one alone.
    fn three_rows() -> Documents {
        Documents::new(13, vec![vec![4, 5], vec![], vec![12]]).unwrap()
    }

    /// Leaves `[B, T, heads, D]` of f64 standard normals, drawn from `seed`.
    fn leaf(seed: u64, shape: [i64; 4]) -> Tensor {
        glatrain_testing::Rng::new(seed)
            .randn(&shape, Kind::Double)
            .set_requires_grad(true)
    }

    /// The output and the q, k, v gradients of `o` for the output gradient `dout`.
    fn with_grads(o: Tensor, dout: &Tensor, qkv: &[&Tensor]) -> Vec<Tensor> {
        let mut all = glatrain_shim::autograd::grad(&o, dout, qkv).unwrap();
        all.insert(0, o.detach());
        all
    }

    #[test]
    fn the_mask_lets_a_token_see_its_own_document_up_to_itself() {
        let docs = Documents::new(4, vec![vec![2], vec![1, 3]]).unwrap();
        let mask = BlockCausal::new(&docs, Device::Cpu)
            .unwrap()
            .mask()
            .unwrap();
        let expected = Tensor::from_slice(&[
            true, false, false, false, //
            true, true, false, false, //
            false, false, true, false, //
            false, false, true, true, //
            true, false, false, false, //
            false, true, false, false, //
            false, true, true, false, //
            false, false, false, true,
        ])
        .view([2, 1, 4, 4]);
        assert!(mask.equal(&expected));
    }

    #[test]
    fn block_causal_attention_equals_each_document_run_alone() {
        let docs = three_rows();
        let blocks = BlockCausal::new(&docs, Device::Cpu).unwrap();
        // Multi-head with v's head dim apart from q's, and grouped-query (2 query heads a key).
        for (h, h_kv, d, dv) in [(3, 3, 5, 7), (4, 2, 5, 5)] {
            let q = leaf(1, [3, 13, h, d]);
            let k = leaf(2, [3, 13, h_kv, d]);
            let v = leaf(3, [3, 13, h_kv, dv]);
            let dout = glatrain_testing::Rng::new(4).randn(&[3, 13, h, dv], Kind::Double);
            let o = block_causal_sdpa(&q, &k, &v, &blocks).unwrap();
            assert!(!flash_takes(&q, &k, &v).unwrap());
            let got = with_grads(o.shallow_clone(), &dout, &[&q, &k, &v]);

            // Each document through causal_sdpa on its own, k and v heads repeated for it.
            let doc = |x: &Tensor, row: usize, begin: usize, len: usize| {
                x.narrow(0, row as i64, 1)
                    .narrow(1, begin as i64, len as i64)
            };
            let repeated = |x: Tensor| x.repeat_interleave_self_int(h / h_kv, 2, None);
            let mut rows: Vec<Vec<Tensor>> = (0..docs.rows()).map(|_| Vec::new()).collect();
            for (row, begin, len) in docs.spans() {
                let o = causal_sdpa(
                    &doc(&q, row, begin, len),
                    &repeated(doc(&k, row, begin, len)),
                    &repeated(doc(&v, row, begin, len)),
                )
                .unwrap();
                rows[row].push(o);
            }
            let rows: Vec<Tensor> = rows.iter().map(|r| Tensor::cat(r, 1)).collect();
            let alone = Tensor::cat(&rows, 0);
            let want = with_grads(alone, &dout, &[&q, &k, &v]);

            for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let err = glatrain_testing::rel_rms(g, w);
                assert!(err < 1e-12, "H {h}, H_kv {h_kv}: {name} rel RMS {err:e}");
            }
            let naive = naive_block_causal_attention(&q, &k, &v, &blocks, Kind::Double);
            let err = glatrain_testing::rel_rms(&o, &naive);
            assert!(err < 1e-12, "H {h}, H_kv {h_kv}: naive rel RMS {err:e}");
            // The check can fail: plain causal attention over the rows differs.
            let across =
                glatrain_testing::rel_rms(&naive_causal_attention(&q, &k, &v, Kind::Double), &o);
            assert!(across > 1e-2, "documents barely matter ({across:e})");
        }
    }

    #[test]
    fn inputs_that_do_not_fit_the_documents_are_shape_errors() {
        let blocks = BlockCausal::new(&three_rows(), Device::Cpu).unwrap();
        let x = |shape: [i64; 4]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let cases = [
            (
                [[3, 12, 4, 8], [3, 12, 4, 8], [3, 12, 4, 8]],
                "q must be [3, 13, H, D]",
            ),
            (
                [[3, 13, 4, 8], [3, 13, 3, 8], [3, 13, 3, 8]],
                "k must be [3, 13, H_kv, 8] with H_kv dividing q's 4 heads",
            ),
            (
                [[3, 13, 4, 8], [3, 13, 2, 6], [3, 13, 2, 8]],
                "k must be [3, 13, H_kv, 8] with",
            ),
            (
                [[3, 13, 4, 8], [3, 13, 2, 8], [3, 13, 4, 8]],
                "v must be [3, 13, 2, Dv]",
            ),
        ];
        for (shapes, want) in cases {
            let [q, k, v] = shapes.map(x);
            let err = block_causal_sdpa(&q, &k, &v, &blocks).unwrap_err();
            assert!(err.is_bad_input(), "{err}");
            assert!(
                err.to_string().starts_with(&format!("{OP}: {want}")),
                "{err}"
            );
        }
    }
}
