//! Gated linear attention (GLA): recurrent, chunked and naive quadratic forms.
//!
//! ```text
//! S_0 = initial_state (or 0)
//! S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t
//! o_t = scale * q_t S_t
//! ```
//!
//! `gk` is the log of the forget gate and must be <= 0: every form relies on cumulative sums of
//! `gk` being non-increasing, so that each exponent it evaluates is <= 0 and nothing overflows.
//!
//! The three forms compute the same function and differ only in schedule: [`gla_recurrent`]
//! walks tokens (obviously right, slow), [`gla_chunked`] is the training path (batched matmuls
//! over chunks, a sequential walk over chunk states only), [`gla_naive`] builds the full T x T
//! decay tensor (tests only).

use tch::{Device, Kind, Tensor};

use super::common::{compute_kind, div_ceil, future_mask, pad_and_chunk};

/// Default chunk length of [`gla_chunked`].
///
/// Measured forward + backward at B 8, T 128, H 4, K 16, V 32, f32 (2026-11-25): on 2 CPU
/// threads recurrent 32 ms, chunk 16/32/64 24/27/30 ms; on an H100 recurrent 47 ms, chunked
/// 2.6 to 3.3 ms for any of the three.
pub const DEFAULT_CHUNK: i64 = 64;

/// Longest sub-chunk whose diagonal block is computed element-wise inside a chunk.
const MAX_SUB_CHUNK: i64 = 16;

/// The default output scale `head_k_dim^-0.5`.
pub fn default_scale(head_k_dim: i64) -> f64 {
    (head_k_dim as f64).powf(-0.5)
}

/// Sizes shared by the inputs of every form.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: i64,
    seq: i64,
    heads: i64,
    dk: i64,
    dv: i64,
}

/// Checks the input shapes and returns their sizes and the compute dtype.
///
/// # Panics
/// On any shape mismatch, naming the tensor and its shape.
fn check_inputs(
    form: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
) -> (Dims, Kind) {
    let qs = q.size();
    assert!(
        qs.len() == 4,
        "{form}: q must be [B, T, H, K], got shape {qs:?}"
    );
    assert!(
        k.size() == qs,
        "{form}: k has shape {:?}, expected q's shape {qs:?}",
        k.size()
    );
    assert!(
        gk.size() == qs,
        "{form}: gk has shape {:?}, expected q's shape {qs:?}",
        gk.size()
    );
    let vs = v.size();
    assert!(
        vs.len() == 4 && vs[..3] == qs[..3],
        "{form}: v has shape {vs:?}, expected [B, T, H, V] = [{}, {}, {}, V]",
        qs[0],
        qs[1],
        qs[2]
    );
    let dims = Dims {
        batch: qs[0],
        seq: qs[1],
        heads: qs[2],
        dk: qs[3],
        dv: vs[3],
    };
    if let Some(s) = initial_state {
        let expected = [dims.batch, dims.heads, dims.dk, dims.dv];
        assert!(
            s.size() == expected,
            "{form}: initial_state has shape {:?}, expected [B, H, K, V] = {expected:?}",
            s.size()
        );
    }
    (dims, compute_kind(&[q, k, v, gk], initial_state))
}

/// The initial state in the compute dtype, or zeros.
///
/// # Shapes
/// `[B, H, K, V]`.
fn start_state(initial_state: Option<&Tensor>, d: Dims, kind: Kind, device: Device) -> Tensor {
    initial_state.map_or_else(
        || Tensor::zeros([d.batch, d.heads, d.dk, d.dv], (kind, device)),
        |s| s.to_kind(kind),
    )
}

/// Token-by-token recurrence with the state in fp32 (f64 for f64 inputs).
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state: `[B, H, K, V]`.
/// Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` in the compute dtype).
///
/// # Panics
/// On mismatched shapes.
pub fn gla_recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
) -> (Tensor, Tensor) {
    let (d, kind) = check_inputs("gla_recurrent", q, k, v, gk, initial_state);
    let mut state = start_state(initial_state, d, kind, q.device());
    if d.seq == 0 {
        return (v.zeros_like(), state);
    }
    // One [B, H, X] tensor per token. unbind, not select: select's backward would allocate a
    // full [B, T, H, X] gradient per token.
    let tokens = |x: &Tensor| x.to_kind(kind).unbind(1);
    let (q, k, v_c, g) = (tokens(q), tokens(k), tokens(v), tokens(gk));
    let mut outputs = Vec::with_capacity(d.seq as usize);
    for t in 0..d.seq as usize {
        let decay = g[t].exp().unsqueeze(-1); // [B, H, K, 1]
        let update = k[t].unsqueeze(-1) * v_c[t].unsqueeze(-2); // [B, H, K, V]
        state = state * decay + update;
        let o_t = q[t].unsqueeze(-2).matmul(&state).squeeze_dim(-2); // [B, H, V]
        outputs.push(o_t * scale);
    }
    (Tensor::stack(&outputs, 1).to_kind(v.kind()), state)
}

/// Chunked form: the training path.
///
/// Inside each chunk of `chunk_size` tokens (b = inclusive cumulative sum of gk in the chunk):
///
/// ```text
/// o_t   = scale * (q_t * exp(b_t)) S_start + scale * sum_{s<=t in chunk} [(q_t * exp(b_t - b_s)) . k_s] v_s
/// S_end = diag(exp(b_last)) S_start + sum_s (k_s * exp(b_last - b_s))^T v_s
/// ```
///
/// The intra-chunk scores are computed for all chunks at once; only the state recurrence walks
/// the chunks. No exponent is ever positive: the chunk is split into sub-chunks of up to 16
/// tokens whose diagonal blocks are done element-wise (`exp(b_t - b_s)`, s <= t), and blocks
/// between sub-chunks are rebased to the first token r of the query's sub-chunk
/// (`q_t exp(b_t - b_r)` times `k_s exp(b_r - b_s)`, s < r <= t). Any T >= 0 and any head sizes:
/// the last chunk is zero-padded internally (zero k and v leave the state unchanged, a zero gate
/// does not decay it), and a sequence shorter than a chunk uses a shorter chunk.
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state: `[B, H, K, V]`.
/// Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` in the compute dtype).
///
/// # Panics
/// On mismatched shapes, or if `chunk_size` < 1.
pub fn gla_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
    chunk_size: i64,
) -> (Tensor, Tensor) {
    chunked(q, k, v, gk, initial_state, scale, chunk_size, MAX_SUB_CHUNK)
}

/// [`gla_chunked`] with the longest sub-chunk as a parameter, so tests can exercise the
/// between-sub-chunk path on short sequences.
#[allow(clippy::too_many_arguments)]
fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
    chunk_size: i64,
    max_sub_chunk: i64,
) -> (Tensor, Tensor) {
    assert!(
        chunk_size >= 1,
        "gla_chunked: chunk_size must be >= 1, got {chunk_size}"
    );
    let (d, kind) = check_inputs("gla_chunked", q, k, v, gk, initial_state);
    let device = q.device();
    let mut state = start_state(initial_state, d, kind, device);
    if d.seq == 0 {
        return (v.zeros_like(), state);
    }
    // The sub-chunk divides the chunk; a short sequence takes a chunk just long enough for it.
    let sub = (1..=chunk_size.min(max_sub_chunk))
        .rev()
        .find(|s| chunk_size % s == 0)
        .unwrap_or(1);
    let chunk = chunk_size.min(div_ceil(d.seq, sub) * sub);
    let n_chunks = div_ceil(d.seq, chunk);
    let padded = n_chunks * chunk;

    // [B, T, H, X] -> [B, N, C, H, X] -> [B, H, N, C, X]
    let split =
        |x: &Tensor| pad_and_chunk(&x.to_kind(kind), padded, chunk).permute([0, 3, 1, 2, 4]);
    let (q, k, v_c, g) = (split(q), split(k), split(v), split(gk));
    let b = g.cumsum(3, kind); // [B, H, N, C, K]

    let scores = intra_chunk_scores(&q, &k, &b, sub); // [B, H, N, C, C]
    let o_intra = scores.matmul(&v_c); // [B, H, N, C, V]

    // What each chunk adds to the state, and how much it decays the state it starts from.
    // b_last - b_s = sum_{r>s} gk_r, summed from the chunk's end (exact suffix sums) rather than
    // subtracted, which would lose |b_last| * eps.
    let to_end = g.flip([3]).cumsum(3, kind).flip([3]) - &g; // [B, H, N, C, K], <= 0
    let chunk_update = (&k * to_end.exp()).transpose(-1, -2).matmul(&v_c); // [B, H, N, K, V]
    let chunk_decay = b.select(3, chunk - 1).exp().unsqueeze(-1); // [B, H, N, K, 1]
    let mut starts = Vec::with_capacity(n_chunks as usize);
    for (decay, update) in chunk_decay.unbind(2).iter().zip(chunk_update.unbind(2)) {
        starts.push(state.shallow_clone());
        state = decay * state + update;
    }
    let starts = Tensor::stack(&starts, 2); // [B, H, N, K, V]
    let o_inter = (&q * b.exp()).matmul(&starts); // [B, H, N, C, V], exponent <= 0

    // [B, H, N, C, V] -> [B, N, C, H, V] -> [B, T, H, V]
    let o = ((o_intra + o_inter) * scale)
        .permute([0, 2, 3, 1, 4])
        .reshape([d.batch, padded, d.heads, d.dv]);
    (o.narrow(1, 0, d.seq).to_kind(v.kind()), state)
}

/// Causal intra-chunk scores `sum_k q_t,k k_s,k exp(b_t,k - b_s,k)` for s <= t, 0 above.
///
/// Diagonal sub-blocks are element-wise over k (the exponent differs per channel and per pair);
/// blocks below them are one matmul per query sub-chunk, both sides rebased to the sub-chunk's
/// first token so that both exponents are <= 0. Masks are applied before `exp` (as -inf), so no
/// positive exponent is ever evaluated, also in the discarded upper triangle.
///
/// # Shapes
/// q, k, b: `[B, H, N, C, K]` with C a multiple of `sub`; returns `[B, H, N, C, C]`.
fn intra_chunk_scores(q: &Tensor, k: &Tensor, b: &Tensor, sub: i64) -> Tensor {
    let size = q.size();
    let (batch, heads, n, chunk, dk) = (size[0], size[1], size[2], size[3], size[4]);
    let m = chunk / sub;
    let device = q.device();
    // [B, H, N, M, L, K]
    let by_sub = |x: &Tensor| x.reshape([batch, heads, n, m, sub, dk]);
    let (qs, ks, bs) = (by_sub(q), by_sub(k), by_sub(b));

    // Diagonal blocks: [.., L(t), L(s), K] exponents b_t - b_s.
    let exponent = bs.unsqueeze(-2) - bs.unsqueeze(-3);
    let decay = exponent
        .masked_fill(&future_mask(sub, device).unsqueeze(-1), f64::NEG_INFINITY)
        .exp();
    let diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * decay).sum_dim_intlist(-1, false, None);
    if m == 1 {
        return diag.reshape([batch, heads, n, chunk, chunk]);
    }

    // Blocks between sub-chunks, reference point r_i = first token of query sub-chunk i:
    // b_ref [B, H, N, M, K]; queries [B, H, N, M, L, K] with exponent b_t - b_r <= 0.
    let b_ref = bs.select(4, 0);
    let q_ref = &qs * (&bs - b_ref.unsqueeze(4)).exp();
    // Keys of the whole chunk seen from each r_i: exponent b_r - b_s, kept for s < r_i only.
    let key_exponent = b_ref.unsqueeze(4) - b.unsqueeze(3); // [B, H, N, M, C, K]
    let sub_start = Tensor::arange_start_step(0, chunk, sub, (Kind::Int64, device)); // [M]
    let not_before = Tensor::arange(chunk, (Kind::Int64, device))
        .unsqueeze(0)
        .ge_tensor(&sub_start.unsqueeze(1)); // [M, C]: s >= r_i
    let k_ref = k.unsqueeze(3)
        * key_exponent
            .masked_fill(&not_before.unsqueeze(-1), f64::NEG_INFINITY)
            .exp();
    let below = q_ref.matmul(&k_ref.transpose(-1, -2)); // [B, H, N, M, L, C]

    // Place the diagonal blocks: [.., M(i), L, L] -> [.., M(i), L, M(j), L] with i == j.
    let eye = Tensor::eye(m, (q.kind(), device)).reshape([m, 1, m, 1]);
    let diag = diag.unsqueeze(-2) * eye;
    below.reshape([batch, heads, n, chunk, chunk]) + diag.reshape([batch, heads, n, chunk, chunk])
}

/// Naive quadratic form with the full T x T decay tensor `exp(b_t - b_s)` (b = cumulative sum of
/// gk over the whole sequence): memory O(T^2 K). For tests only; its exponents are summed over
/// each segment alone, so in f32 it is more precise than the chunked form under strong decay.
///
/// # Shapes
/// q, k, gk: `[B, T, H, K]`; v: `[B, T, H, V]`; initial_state: `[B, H, K, V]`.
/// Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` in the compute dtype).
///
/// # Panics
/// On mismatched shapes.
pub fn gla_naive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gk: &Tensor,
    initial_state: Option<&Tensor>,
    scale: f64,
) -> (Tensor, Tensor) {
    let (d, kind) = check_inputs("gla_naive", q, k, v, gk, initial_state);
    let device = q.device();
    if d.seq == 0 {
        return (v.zeros_like(), start_state(initial_state, d, kind, device));
    }
    let heads_first = |x: &Tensor| x.to_kind(kind).transpose(1, 2); // [B, H, T, X]
    let (q, k, v_c, g) = (
        heads_first(q),
        heads_first(k),
        heads_first(v),
        heads_first(gk),
    );
    // [B, H, T(t), T(s), K]: the log-decay between s and t, sum_{s<r<=t} gk_r, accumulated over
    // the segment alone (a difference of two long cumulative sums would lose |b| * eps of
    // precision), then masked for s > t before exp.
    let after_s = future_mask(d.seq, device)
        .transpose(0, 1)
        .to_kind(kind)
        .unsqueeze(-1);
    let exponent = (g.unsqueeze(3) * after_s).cumsum(2, kind);
    let decay = exponent
        .masked_fill(&future_mask(d.seq, device).unsqueeze(-1), f64::NEG_INFINITY)
        .exp();
    let scores = (q.unsqueeze(3) * k.unsqueeze(2) * &decay).sum_dim_intlist(-1, false, None);
    let mut o = scores.matmul(&v_c); // [B, H, T, V]
    let to_end = decay.select(2, d.seq - 1); // [B, H, T(s), K]: exp(b_last - b_s)
    let mut state = (&k * to_end).transpose(-1, -2).matmul(&v_c); // [B, H, K, V]
    if let Some(s0) = initial_state {
        let s0 = s0.to_kind(kind);
        let b = g.cumsum(2, kind); // [B, H, T, K]
        o += (&q * b.exp()).matmul(&s0);
        state += b.narrow(2, d.seq - 1, 1).transpose(-1, -2).exp() * s0;
    }
    ((o * scale).transpose(1, 2).to_kind(v.kind()), state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glatrain_testing::{gradcheck, rel_rms, GradcheckOptions, Rng};

    /// Forget-gate regimes: the model's (`logsigmoid(x) / 16`) and a strong one whose cumulative
    /// sums over a chunk overflow `exp(-b_s)` in f32 (and over a sequence of 130, nearly in f64).
    #[derive(Debug, Clone, Copy)]
    enum Gates {
        Mild,
        Strong,
    }

    /// Random inputs, drawn in f64 and cast, so f32 cases are roundings of the f64 ones.
    struct Inputs {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gk: Tensor,
        s0: Tensor,
    }

    fn inputs(seed: u64, shape: [i64; 5], gates: Gates, kind: Kind) -> Inputs {
        let [b, t, h, dk, dv] = shape;
        let mut rng = Rng::new(seed);
        let raw_gate = rng.randn(&[b, t, h, dk], Kind::Double);
        let gk = match gates {
            Gates::Mild => raw_gate.log_sigmoid() / 16.0,
            Gates::Strong => (raw_gate * 4.0).log_sigmoid(),
        };
        Inputs {
            q: rng.randn(&[b, t, h, dk], kind),
            k: rng.randn(&[b, t, h, dk], kind),
            v: rng.randn(&[b, t, h, dv], kind),
            gk: gk.to_kind(kind),
            s0: rng.randn(&[b, h, dk, dv], kind),
        }
    }

    fn all_finite(x: &Tensor) -> bool {
        x.isfinite().all().int64_value(&[]) == 1
    }

    /// chunked == recurrent == naive over odd lengths, head sizes, gate regimes, with and without
    /// an initial state.
    fn forms_agree(kind: Kind, tol: f64) {
        let mut seed = 0;
        for t in [1, 7, 63, 64, 65, 130] {
            for (dk, dv) in [(1, 1), (4, 8), (8, 4), (60, 60), (1, 60), (60, 1)] {
                for gates in [Gates::Mild, Gates::Strong] {
                    for with_state in [false, true] {
                        seed += 1;
                        let x = inputs(seed, [2, t, 2, dk, dv], gates, kind);
                        let s0 = with_state.then_some(&x.s0);
                        let scale = default_scale(dk);
                        let what =
                            format!("{kind:?} T {t} K {dk} V {dv} {gates:?} state {with_state}");
                        let (o_r, s_r) = gla_recurrent(&x.q, &x.k, &x.v, &x.gk, s0, scale);
                        let (o_c, s_c) =
                            gla_chunked(&x.q, &x.k, &x.v, &x.gk, s0, scale, DEFAULT_CHUNK);
                        let (o_n, s_n) = gla_naive(&x.q, &x.k, &x.v, &x.gk, s0, scale);
                        assert!(
                            all_finite(&o_c) && all_finite(&s_c),
                            "{what}: chunked not finite"
                        );
                        for (name, got, want) in [
                            ("chunked o", &o_c, &o_r),
                            ("chunked state", &s_c, &s_r),
                            ("naive o", &o_n, &o_r),
                            ("naive state", &s_n, &s_r),
                        ] {
                            let err = rel_rms(got, want);
                            assert!(err <= tol, "{what}: {name} rel RMS {err:e} > {tol:e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forms_agree_f64() {
        forms_agree(Kind::Double, 1e-10);
    }

    #[test]
    fn forms_agree_f32() {
        forms_agree(Kind::Float, 1e-5);
    }

    /// Odd chunk lengths and short sub-chunks exercise the between-sub-chunk rebasing and the
    /// padding on short sequences.
    #[test]
    fn chunked_agrees_for_any_chunk_and_sub_chunk() {
        let mut seed = 1000;
        for t in [1, 5, 8, 9, 19, 33] {
            for chunk in [1, 6, 7, 8, 16] {
                for max_sub in [2, 4, 16] {
                    seed += 1;
                    let x = inputs(seed, [1, t, 2, 3, 5], Gates::Strong, Kind::Double);
                    let (o_r, s_r) = gla_recurrent(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0), 0.5);
                    let (o_c, s_c) =
                        chunked(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0), 0.5, chunk, max_sub);
                    let (eo, es) = (rel_rms(&o_c, &o_r), rel_rms(&s_c, &s_r));
                    assert!(
                        eo <= 1e-10 && es <= 1e-10,
                        "T {t} chunk {chunk} sub {max_sub}: o {eo:e}, state {es:e}"
                    );
                }
            }
        }
    }

    /// Running two halves with the state carried gives the whole sequence's outputs and state.
    #[test]
    fn split_sequence_with_carried_state_equals_whole() {
        let (t, cut) = (100, 37);
        let x = inputs(7, [2, t, 2, 8, 4], Gates::Mild, Kind::Double);
        type Form = fn(&Tensor, &Tensor, &Tensor, &Tensor, Option<&Tensor>) -> (Tensor, Tensor);
        let forms: [(&str, Form); 2] = [
            ("recurrent", |q, k, v, g, s| {
                gla_recurrent(q, k, v, g, s, 0.3)
            }),
            ("chunked", |q, k, v, g, s| {
                gla_chunked(q, k, v, g, s, 0.3, DEFAULT_CHUNK)
            }),
        ];
        for (name, form) in forms {
            let (o, s) = form(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0));
            let part = |x: &Tensor, start, len| x.narrow(1, start, len);
            let (o1, s1) = form(
                &part(&x.q, 0, cut),
                &part(&x.k, 0, cut),
                &part(&x.v, 0, cut),
                &part(&x.gk, 0, cut),
                Some(&x.s0),
            );
            let rest = t - cut;
            let (o2, s2) = form(
                &part(&x.q, cut, rest),
                &part(&x.k, cut, rest),
                &part(&x.v, cut, rest),
                &part(&x.gk, cut, rest),
                Some(&s1),
            );
            let eo = rel_rms(&Tensor::cat(&[o1, o2], 1), &o);
            let es = rel_rms(&s2, &s);
            assert!(eo <= 1e-12 && es <= 1e-12, "{name}: o {eo:e}, state {es:e}");
        }
    }

    /// Autograd through each form matches central differences for q, k, v, gk and the initial
    /// state; the loss weighs both outputs with fixed random weights.
    #[test]
    fn gradients_match_finite_differences() {
        let shape = [1, 19, 2, 3, 4];
        let x = inputs(11, shape, Gates::Strong, Kind::Double);
        let mut rng = Rng::new(12);
        let w_o = rng.randn(&[1, 19, 2, 4], Kind::Double);
        let w_s = rng.randn(&[1, 2, 3, 4], Kind::Double);
        type Form = fn(&[Tensor]) -> (Tensor, Tensor);
        let forms: [(&str, Form); 4] = [
            ("recurrent", |a| {
                gla_recurrent(&a[0], &a[1], &a[2], &a[3], Some(&a[4]), 0.6)
            }),
            ("chunked default", |a| {
                gla_chunked(&a[0], &a[1], &a[2], &a[3], Some(&a[4]), 0.6, DEFAULT_CHUNK)
            }),
            ("chunked 8/4", |a| {
                chunked(&a[0], &a[1], &a[2], &a[3], Some(&a[4]), 0.6, 8, 4)
            }),
            ("naive", |a| {
                gla_naive(&a[0], &a[1], &a[2], &a[3], Some(&a[4]), 0.6)
            }),
        ];
        let named = [
            ("q", &x.q),
            ("k", &x.k),
            ("v", &x.v),
            ("gk", &x.gk),
            ("initial_state", &x.s0),
        ];
        for (name, form) in forms {
            let loss = |a: &[Tensor]| {
                let (o, s) = form(a);
                (o * &w_o).sum(Kind::Double) + (s * &w_s).sum(Kind::Double)
            };
            let report = gradcheck(loss, &named, &GradcheckOptions::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(report.checked, 5 * 6, "{name}");
        }
    }

    /// Strong decay over a long sequence in f32: a form that multiplied exp(b_t) by exp(-b_s)
    /// would produce inf and then NaN gradients here.
    #[test]
    fn strong_decay_gradients_stay_finite_in_f32() {
        let x = inputs(21, [1, 130, 2, 8, 8], Gates::Strong, Kind::Float);
        let leaves: Vec<Tensor> = [&x.q, &x.k, &x.v, &x.gk, &x.s0]
            .iter()
            .map(|t| t.detach().set_requires_grad(true))
            .collect();
        let (o, s) = gla_chunked(
            &leaves[0],
            &leaves[1],
            &leaves[2],
            &leaves[3],
            Some(&leaves[4]),
            0.3,
            DEFAULT_CHUNK,
        );
        let loss = o.sum(Kind::Float) + s.sum(Kind::Float);
        for (grad, name) in Tensor::run_backward(&[loss], &leaves, false, false)
            .iter()
            .zip(["q", "k", "v", "gk", "s0"])
        {
            assert!(all_finite(grad), "gradient of {name} is not finite");
        }
    }

    /// On a CUDA device (skipped without one) the chunked form, f32 and f64, agrees with the
    /// f64 recurrence on the CPU, and its gradients are finite.
    #[test]
    fn chunked_on_cuda_matches_cpu_recurrence() {
        let Some(cuda) = glatrain_testing::cuda_or_skip() else {
            return;
        };
        let x = inputs(61, [2, 130, 3, 60, 8], Gates::Strong, Kind::Double);
        let (o_ref, s_ref) = gla_recurrent(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0), 0.2);
        for (kind, tol) in [(Kind::Double, 1e-10), (Kind::Float, 1e-5)] {
            let leaves: Vec<Tensor> = [&x.q, &x.k, &x.v, &x.gk, &x.s0]
                .iter()
                .map(|t| t.to_device(cuda).to_kind(kind).set_requires_grad(true))
                .collect();
            let l = &leaves;
            let (o, s) = gla_chunked(&l[0], &l[1], &l[2], &l[3], Some(&l[4]), 0.2, DEFAULT_CHUNK);
            assert_eq!((o.device(), s.device()), (cuda, cuda));
            let (eo, es) = (rel_rms(&o, &o_ref), rel_rms(&s, &s_ref));
            assert!(eo <= tol && es <= tol, "{kind:?}: o {eo:e}, state {es:e}");
            let loss = o.sum(Kind::Double) + s.sum(Kind::Double);
            for grad in Tensor::run_backward(&[loss], l, false, false) {
                assert!(all_finite(&grad), "{kind:?}: a gradient is not finite");
            }
        }
    }

    #[test]
    fn dtypes_output_follows_v_and_state_is_at_least_f32() {
        let x = inputs(31, [1, 9, 1, 4, 4], Gates::Mild, Kind::BFloat16);
        let (o, s) = gla_chunked(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0), 0.5, DEFAULT_CHUNK);
        assert_eq!((o.kind(), s.kind()), (Kind::BFloat16, Kind::Float));
        let (o, s) = gla_recurrent(&x.q, &x.k, &x.v, &x.gk, None, 0.5);
        assert_eq!((o.kind(), s.kind()), (Kind::BFloat16, Kind::Float));
        let x = inputs(32, [1, 9, 1, 4, 4], Gates::Mild, Kind::Double);
        let (o, s) = gla_chunked(&x.q, &x.k, &x.v, &x.gk, None, 0.5, DEFAULT_CHUNK);
        assert_eq!((o.kind(), s.kind()), (Kind::Double, Kind::Double));
    }

    #[test]
    fn empty_sequence_returns_the_initial_state() {
        let x = inputs(41, [1, 0, 2, 3, 4], Gates::Mild, Kind::Float);
        let (o, s) = gla_chunked(&x.q, &x.k, &x.v, &x.gk, Some(&x.s0), 0.5, DEFAULT_CHUNK);
        assert_eq!(o.size(), [1, 0, 2, 4]);
        assert_eq!(rel_rms(&s, &x.s0), 0.0);
    }

    #[test]
    #[should_panic(
        expected = "gla_chunked: v has shape [1, 9, 2, 4], expected [B, T, H, V] = [1, 9, 1, V]"
    )]
    fn mismatched_v_is_reported_with_shapes() {
        let x = inputs(51, [1, 9, 1, 4, 4], Gates::Mild, Kind::Float);
        let v = Tensor::cat(&[&x.v, &x.v], 2);
        let _ = gla_chunked(&x.q, &x.k, &v, &x.gk, None, 0.5, DEFAULT_CHUNK);
    }

    #[test]
    #[should_panic(expected = "gla_chunked: chunk_size must be >= 1, got 0")]
    fn zero_chunk_size_is_rejected() {
        let x = inputs(52, [1, 3, 1, 2, 2], Gates::Mild, Kind::Float);
        let _ = gla_chunked(&x.q, &x.k, &x.v, &x.gk, None, 0.5, 0);
    }
}
