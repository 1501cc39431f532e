//! Launchers of the bf16/fp16 `chunk` schedule (`kernels/gla_tc.cu`).
//!
//! Forward: chunk states (h_n per 64-token chunk, in the input dtype) and each chunk's A, then the
//! outputs of every chunk in parallel; states and A are kept for the backward (the autograd shim
//! saves them). Backward: the adjoint states (reverse walk), then dv and dq/dk/dg per chunk in
//! parallel. Every kernel writes full (not partial) results, so nothing is summed over tiles here.

use std::sync::Arc;

use tch::Tensor;

use super::{
    buffer, buffer_of, opt_ptr, ptr, tiles, Backward, CudaError, Device, Dims, Forward,
    KernelDtype, KernelSource, CHUNK_LEN,
};

/// Threads per block.
const THREADS: u32 = 128;
/// Dynamic shared memory per kernel; `kernels/gla_tc.cu` static_asserts the same values.
const STATES_SMEM: u32 = 55_296;
const ATTN_SMEM: u32 = 38_912;
const FWD_O_SMEM: u32 = 66_560;
const BWD_DV_SMEM: u32 = 66_560;
const BWD_DQK_SMEM: u32 = 58_624;
/// K / V tile.
const TILE: i64 = 64;
/// Largest grid z (batch x heads).
const MAX_GRID_Z: i64 = 65_535;

/// `reverse` argument of `gla_tc_states`.
const FORWARD: i32 = 0;
const REVERSE: i32 = 1;

fn check_grid(d: Dims) -> Result<(), CudaError> {
    if d.b * d.h > MAX_GRID_Z {
        return Err(CudaError::Driver {
            what: "GLA launch".to_string(),
            message: format!(
                "batch x heads = {} x {} = {} exceeds the {MAX_GRID_Z} blocks a grid's z \
                 dimension allows; split the batch",
                d.b,
                d.h,
                d.b * d.h
            ),
        });
    }
    // The kernels address a tile's rows with 32-bit offsets from one base pointer.
    let row_stride = d.h * d.k.max(d.v);
    if row_stride * CHUNK_LEN > i64::from(i32::MAX) {
        return Err(CudaError::Driver {
            what: "GLA launch".to_string(),
            message: format!(
                "heads x head dim = {} x {} = {row_stride} elements per token is more than the \
                 kernels address (64 tokens must span under 2^31 elements)",
                d.h,
                d.k.max(d.v)
            ),
        });
    }
    Ok(())
}

/// The chunk states `[B, H, chunks, K, V]` in the input dtype.
fn states_buffer(d: Dims, like: &Tensor) -> Tensor {
    buffer_of(&[d.b, d.h, d.chunks(), d.k, d.v], like.kind(), like)
}

/// What the forward keeps for the backward, in one buffer of the input dtype: the chunk states
/// (`[B, H, chunks, K, V]`) followed, 16-byte aligned (the kernels copy A in 16-byte pieces), by
/// each chunk's A (`[B, H, chunks, 64, 64]`).
struct Kept {
    states: Tensor,
    attn: Tensor,
}

impl Kept {
    /// Elements of the states part (rounded up to 8, for A's alignment) and of the A part.
    fn sizes(d: Dims) -> (i64, i64) {
        let chunks = d.b * d.h * d.chunks();
        ((chunks * d.k * d.v + 7) / 8 * 8, chunks * TILE * TILE)
    }

    fn new(d: Dims, like: &Tensor) -> (Tensor, Self) {
        let (states, attn) = Self::sizes(d);
        let buf = buffer_of(&[states + attn], like.kind(), like);
        let kept = Self::view(d, &buf);
        (buf, kept)
    }

    fn view(d: Dims, buf: &Tensor) -> Self {
        let (states, attn) = Self::sizes(d);
        let chunks = d.b * d.h * d.chunks();
        Kept {
            states: buf.narrow(0, 0, chunks * d.k * d.v),
            attn: buf.narrow(0, states, attn),
        }
    }
}

/// A of every chunk (`gla_tc_attn`) into `attn`.
fn attention(
    dev: &Arc<Device>,
    dt: KernelDtype,
    d: Dims,
    (q, k, g): (&Tensor, &Tensor, &Tensor),
    attn: &Tensor,
    scale: f32,
) -> Result<(), CudaError> {
    let (tt, hh, kk) = (d.t as i32, d.h as i32, d.k as i32);
    let (qp, kp, gp, ap) = (ptr(q), ptr(k), ptr(g), ptr(attn));
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_attn")?;
    launch!(dev, f, (d.chunks(), d.b * d.h, 1), ATTN_SMEM, THREADS;
        qp, kp, gp, ap, tt, hh, kk, scale)
}

/// A walk splits into segments (walked in parallel, then joined by `gla_tc_carry` and
/// `gla_tc_fixup`) when its (batch, head, state tile) grid leaves room for whole copies of itself
/// on the GPU at this many blocks per SM (the walk kernel's occupancy)...
const WALK_BLOCKS_PER_SM: i64 = 4;
/// ... keeping at least this many chunks per segment.
const MIN_SEGMENT_CHUNKS: i64 = 8;

/// Chunks per segment of a walk over `d` on `dev`: all of them when the grid fills the GPU or
/// the sequence is short.
fn segment_len(dev: &Device, d: Dims) -> i64 {
    let blocks = tiles(d.k, TILE) * tiles(d.v, TILE) * d.b * d.h;
    let slots = WALK_BLOCKS_PER_SM * dev.sm_count() as i64;
    let segments = (slots / blocks)
        .min(d.chunks() / MIN_SEGMENT_CHUNKS)
        .min(MAX_GRID_Z / (d.b * d.h))
        .max(1);
    (d.chunks() + segments - 1) / segments
}

/// One state walk (`gla_tc_states`): x scaled by its decay against y, from `s0` (0: zeros),
/// writing every chunk's state to `states` and the last one to `last` (0: not wanted). Few
/// (batch, head) pairs and many chunks: the sequence is walked in segments in parallel, then
/// their end states are carried across segments and added to the later segments' states.
#[allow(clippy::too_many_arguments)]
fn walk(
    dev: &Arc<Device>,
    dt: KernelDtype,
    d: Dims,
    (x, g, y): (&Tensor, &Tensor, &Tensor),
    s0: u64,
    states: &Tensor,
    last: u64,
    xscale: f32,
    reverse: i32,
) -> Result<(), CudaError> {
    let (tt, hh, kk, vv) = (d.t as i32, d.h as i32, d.k as i32, d.v as i32);
    let (nk, nv, nc, bh) = (tiles(d.k, TILE), tiles(d.v, TILE), d.chunks(), d.b * d.h);
    let (xp, gp, yp, sp) = (ptr(x), ptr(g), ptr(y), ptr(states));
    let len = segment_len(dev, d);
    let segments = (nc + len - 1) / len;
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_states")?;
    let seg_len = len as i32;
    if segments == 1 {
        let nullp = 0u64;
        return launch!(dev, f, (nv, nk, bh), STATES_SMEM, THREADS;
            xp, yp, gp, s0, sp, last, nullp, nullp, nullp, seg_len, tt, hh, kk, vv, xscale, reverse);
    }
    let seg_last = buffer(&[bh, segments, d.k, d.v], x);
    let carry = buffer(&[bh, segments, d.k, d.v], x);
    let seg_decay = buffer(&[bh, segments, d.k], x);
    let cum = buffer(&[bh, nc, d.k], x);
    let (lp, cp, dp, cump) = (ptr(&seg_last), ptr(&carry), ptr(&seg_decay), ptr(&cum));
    launch!(dev, f, (nv, nk, bh * segments), STATES_SMEM, THREADS;
        xp, yp, gp, s0, sp, last, lp, dp, cump, seg_len, tt, hh, kk, vv, xscale, reverse)?;
    let nseg = segments as i32;
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_carry")?;
    let elements = tiles(d.k * d.v, i64::from(THREADS));
    launch!(dev, f, (elements, bh, 1), 0, THREADS; lp, dp, cp, last, nseg, kk, vv)?;
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_fixup")?;
    launch!(dev, f, (nc, bh, 1), 0, THREADS; sp, cump, cp, seg_len, tt, kk, vv, reverse)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    dev: &Arc<Device>,
    dt: KernelDtype,
    d: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: Option<&Tensor>,
    scale: f64,
) -> Result<Forward, CudaError> {
    check_grid(d)?;
    let (tt, hh, kk, vv) = (d.t as i32, d.h as i32, d.k as i32, d.v as i32);
    let (nv, nc, bh) = (tiles(d.v, TILE), d.chunks(), d.b * d.h);
    let (qp, vp, gp, h0p) = (ptr(q), ptr(v), ptr(g), opt_ptr(h0));
    let (buf, kept) = Kept::new(d, q);
    let ht = buffer(&[d.b, d.h, d.k, d.v], q);
    let o = buffer_of(&[d.b, d.t, d.h, d.v], v.kind(), v);
    let (hsp, ap, op) = (ptr(&kept.states), ptr(&kept.attn), ptr(&o));
    let sc = scale as f32;
    walk(
        dev,
        dt,
        d,
        (k, g, v),
        h0p,
        &kept.states,
        ptr(&ht),
        1.0,
        FORWARD,
    )?;
    attention(dev, dt, d, (q, k, g), &kept.attn, sc)?;
    let out = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_fwd_o")?;
    launch!(dev, out, (nv, nc, bh), FWD_O_SMEM, THREADS;
        qp, vp, gp, hsp, ap, h0p, op, tt, hh, kk, vv, sc)?;
    Ok(Forward {
        o,
        final_state: ht,
        saved: Some(buf),
    })
}

/// What [`backward`] reads.
pub(super) struct BackwardInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub h0: Option<&'a Tensor>,
    /// What the forward kept ([`Forward::saved`]), or None to recompute it.
    pub saved: Option<&'a Tensor>,
    pub d_o: &'a Tensor,
    pub dht: Option<&'a Tensor>,
}

pub(super) fn backward(
    dev: &Arc<Device>,
    dt: KernelDtype,
    d: Dims,
    x: BackwardInputs<'_>,
    scale: f64,
) -> Result<Backward, CudaError> {
    check_grid(d)?;
    let (tt, hh, kk, vv) = (d.t as i32, d.h as i32, d.k as i32, d.v as i32);
    let (nk, nv, nc, bh) = (tiles(d.k, TILE), tiles(d.v, TILE), d.chunks(), d.b * d.h);
    let (qp, kp, vp, gp, h0p) = (ptr(x.q), ptr(x.k), ptr(x.v), ptr(x.g), opt_ptr(x.h0));
    let (dop, dhtp) = (ptr(x.d_o), opt_ptr(x.dht));
    let sc = scale as f32;
    let kept = match x.saved {
        Some(buf) => Kept::view(d, buf),
        None => {
            // The views keep the buffer's storage alive.
            let (_, kept) = Kept::new(d, x.q);
            walk(
                dev,
                dt,
                d,
                (x.k, x.g, x.v),
                h0p,
                &kept.states,
                0,
                1.0,
                FORWARD,
            )?;
            attention(dev, dt, d, (x.q, x.k, x.g), &kept.attn, sc)?;
            kept
        }
    };
    let dhs = states_buffer(d, x.q);
    let dh0 = x.h0.map(|h| buffer(&h.size(), x.q));
    let dq = buffer_of(&x.q.size(), x.q.kind(), x.q);
    let dk = buffer_of(&x.k.size(), x.k.kind(), x.k);
    let dv = buffer_of(&x.v.size(), x.v.kind(), x.v);
    let dg = buffer(&x.g.size(), x.q);
    let (hsp, ap) = (ptr(&kept.states), ptr(&kept.attn));
    let (dhsp, dh0p) = (ptr(&dhs), opt_ptr(dh0.as_ref()));
    let (dqp, dkp, dvp, dgp) = (ptr(&dq), ptr(&dk), ptr(&dv), ptr(&dg));
    walk(dev, dt, d, (x.q, x.g, x.d_o), dhtp, &dhs, dh0p, sc, REVERSE)?;
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_bwd_dv")?;
    launch!(dev, f, (nv, nc, bh), BWD_DV_SMEM, THREADS;
        kp, gp, dop, dhsp, ap, dhtp, dvp, tt, hh, kk, vv)?;
    let f = dev.function(KernelSource::GlaTensorCore, dt, "gla_tc_bwd_dqk")?;
    launch!(dev, f, (nk, nc, bh), BWD_DQK_SMEM, THREADS;
        qp, kp, vp, gp, dop, hsp, dhsp, h0p, dhtp, dqp, dkp, dgp, tt, hh, kk, vv, sc)?;
    Ok(Backward {
        dq,
        dk,
        dv,
        dg,
        dh0,
    })
}
