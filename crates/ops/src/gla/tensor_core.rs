//! Launchers of the bf16/fp16 `chunk` schedule (`kernels/gla_tc.cu`).
//!
//! Forward: each chunk's A with the gate-scaled operands of the state products (qs, ks) and the
//! chunk decays, then one walk over the chunks that writes the chunk states (h_n per 64-token
//! chunk, in the input dtype) and the outputs; all but the outputs are kept for the backward (the
//! autograd shim saves them). Backward: the adjoint walk (dh_{n+1} per chunk, and dv), then
//! dq/dk/dg per chunk in parallel. Past K = 128 the state no longer fits a block's registers (and
//! on GPUs whose blocks get under ~110 KB of shared memory the walk's step buffers do not fit): the
//! walks write only the states and separate kernels compute o and dv from them. Every kernel
//! writes full (not partial) results, so nothing is summed over tiles here.

use std::sync::Arc;

use glatrain_cuda::{launch, CudaError, Gpu, KernelDtype};
use tch::{Kind, Tensor};

use super::kernels::geometry::CHUNK_LEN;
use super::kernels::{Backward, BackwardInputs, Dims, Forward, Inputs, GLA_TC};
use crate::launch::{buffer, opt_ptr, ptr, tiles};
use crate::OpError;

/// Threads per block.
const THREADS: u32 = 128;
/// Dynamic shared memory per kernel; `kernels/gla_tc.cu` static_asserts the same values.
const STATES_SMEM: u32 = 37_376;
const ATTN_SMEM: u32 = 38_912;
const OUT_SMEM: u32 = 46_080;
const BWD_DQK_SMEM: u32 = 58_624;
/// K / V tile.
const TILE: i64 = 64;
/// The largest K whose whole state a `gla_tc_walk_o` / `gla_tc_walk_dv` block holds.
const WALK_OUT_MAX_K: i64 = 2 * TILE;
/// Largest grid z (batch x heads).
const MAX_GRID_Z: i64 = 65_535;

/// `reverse` argument of `gla_tc_states`.
const FORWARD: i32 = 0;
const REVERSE: i32 = 1;

fn check_grid(d: Dims) -> Result<(), OpError> {
    d.as_i32()?;
    // The per-chunk kernels (A, outputs, dv, dq/dk) put one block row per chunk on grid y.
    if d.chunks() > MAX_GRID_Z {
        return Err(CudaError::Limit {
            kernel: "gla (chunk, tensor cores)".to_string(),
            what: format!(
                "T = {} is {} chunks of {CHUNK_LEN} tokens, more than the {MAX_GRID_Z} a grid's \
                 y dimension allows (T <= {}); use kernels.mode = \"fused_chunk\" or shorter \
                 sequences",
                d.t,
                d.chunks(),
                MAX_GRID_Z * CHUNK_LEN
            ),
        }
        .into());
    }
    if d.b * d.h > MAX_GRID_Z {
        return Err(CudaError::Limit {
            kernel: "gla (chunk, tensor cores)".to_string(),
            what: format!(
                "batch x heads = {} x {} = {} exceeds the {MAX_GRID_Z} blocks a grid's z \
                 dimension allows; split the batch",
                d.b,
                d.h,
                d.b * d.h
            ),
        }
        .into());
    }
    // The kernels address a tile's rows with 32-bit offsets from one base pointer.
    let row_stride = d.h * d.k.max(d.v);
    if row_stride * CHUNK_LEN > i64::from(i32::MAX) {
        return Err(CudaError::Limit {
            kernel: "gla (chunk, tensor cores)".to_string(),
            what: format!(
                "heads x head dim = {} x {} = {row_stride} elements per token is more than the \
                 kernels address (64 tokens must span under 2^31 elements)",
                d.h,
                d.k.max(d.v)
            ),
        }
        .into());
    }
    Ok(())
}

/// The chunk states `[B, H, chunks, K, V]` in the input dtype.
fn states_buffer(d: Dims, like: &Tensor) -> Result<Tensor, OpError> {
    buffer(&[d.b, d.h, d.chunks(), d.k, d.v], like.kind(), like)
}

/// What the forward keeps for the backward, in one buffer of the input dtype, each part 16-byte
/// aligned (the kernels copy in 16-byte pieces): the chunk states (`[B, H, chunks, K, V]`), each
/// chunk's A (`[B, H, chunks, 64, 64]`), qs = scale q exp(b) and ks = k exp(b_L - b) (`[B, T, H,
/// K]`, b the cumulative gate inside the chunk) and the chunk decays exp(b_L) (`[B, H, chunks,
/// K]` f32, two elements of the buffer each). The parts' device addresses: taking no views
/// keeps libtorch calls off the path to the forward's first kernel.
struct Kept {
    states: u64,
    attn: u64,
    qs: u64,
    ks: u64,
    decay: u64,
}

impl Kept {
    /// Element counts of the parts, in buffer order.
    fn sizes(d: Dims) -> [i64; 5] {
        let chunks = d.b * d.h * d.chunks();
        let operand = d.b * d.t * d.h * d.k;
        [
            chunks * d.k * d.v,
            chunks * TILE * TILE,
            operand,
            operand,
            2 * chunks * d.k,
        ]
    }

    fn new(d: Dims, like: &Tensor) -> Result<(Tensor, Self), OpError> {
        let total = Self::sizes(d).iter().map(|n| aligned(*n)).sum::<i64>();
        let buf = buffer(&[total], like.kind(), like)?;
        let kept = Self::view(d, &buf);
        Ok((buf, kept))
    }

    /// The parts of `buf`, which must outlive their use.
    fn view(d: Dims, buf: &Tensor) -> Self {
        let (base, element) = (ptr(buf), buf.kind().elt_size_in_bytes() as u64);
        let mut start = 0;
        let [states, attn, qs, ks, decay] = Self::sizes(d).map(|n| {
            let part = base + start * element;
            start += aligned(n) as u64;
            part
        });
        Kept {
            states,
            attn,
            qs,
            ks,
            decay,
        }
    }
}

/// `n` elements of a 16-bit buffer rounded up to whole 16-byte pieces.
fn aligned(n: i64) -> i64 {
    (n + 7) / 8 * 8
}

/// A of every chunk, qs, ks and the chunk decays (`gla_tc_attn`) into `kept`.
fn attention(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    (q, k, g): (&Tensor, &Tensor, &Tensor),
    kept: &Kept,
    scale: f32,
) -> Result<(), OpError> {
    let (_, tt, hh, kk, _) = d.as_i32()?;
    let (qp, kp, gp, ap) = (ptr(q), ptr(k), ptr(g), kept.attn);
    let (qsp, ksp, dp) = (kept.qs, kept.ks, kept.decay);
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_attn")?;
    Ok(launch!(f, (d.chunks(), d.b * d.h, 1), THREADS, ATTN_SMEM;
        qp, kp, gp, ap, qsp, ksp, dp, tt, hh, kk, scale)?)
}

/// A walk splits into segments (walked in parallel, then joined by `gla_tc_carry`) when its grid
/// of `blocks` leaves room for whole copies of itself in the GPU's `slots` (resident blocks: SMs
/// times the walk kernel's occupancy), keeping at least this many chunks per segment.
const MIN_SEGMENT_CHUNKS: i64 = 8;
/// Occupancy of `gla_tc_states`.
const STATES_BLOCKS_PER_SM: i64 = 4;

/// Chunks per segment of a walk over `d` whose grid has `blocks` blocks per segment, on a GPU with
/// `slots` resident blocks: all of them when the grid fills the GPU or the sequence is short.
fn segment_len(slots: i64, blocks: i64, d: Dims) -> i64 {
    let segments = (slots / blocks)
        .min(d.chunks() / MIN_SEGMENT_CHUNKS)
        .min(MAX_GRID_Z / (d.b * d.h))
        .max(1);
    tiles(d.chunks(), segments)
}

/// A `gla_tc_walk_o` / `gla_tc_walk_dv` walk split into fewer segments than this must keep its
/// segmented grid within one block per SM, or it stays one walk. Past one block per SM the walk
/// is bound by memory bandwidth rather than by each step's latency, and two or three segments
/// save less than the end-state pre-walk and the carry cost (H100, 4 x 4096 x 16 x 128 forward
/// and backward: 1.16 ms in two segments, 1.06 ms in one walk).
const MIN_BUSY_WALK_SEGMENTS: i64 = 4;

/// Chunks per segment of a `gla_tc_walk_o` / `gla_tc_walk_dv` walk over `d` with `blocks` blocks
/// per segment, on `sms` SMs that hold `per_sm` of its blocks each.
fn walk_out_segment_len(sms: i64, per_sm: i64, blocks: i64, d: Dims) -> i64 {
    let len = segment_len(per_sm * sms, blocks, d);
    let segments = tiles(d.chunks(), len);
    if segments < MIN_BUSY_WALK_SEGMENTS && segments * blocks > sms {
        d.chunks()
    } else {
        len
    }
}

/// One state walk (`gla_tc_states`): the scaled x (`Kept::ks` or `Kept::qs`) against y, with the
/// chunk decays, from `s0` (0: zeros), writing every chunk's state to `states` and the last one
/// to `last` (0: not wanted). Few (batch, head) pairs and many chunks: the sequence is walked in
/// segments in parallel, then their end states are carried across segments (`gla_tc_carry`) and
/// added to the later segments' states (`gla_tc_fixup`).
#[allow(clippy::too_many_arguments)]
fn walk(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    (x, y, decay): (u64, &Tensor, u64),
    s0: u64,
    states: u64,
    last: u64,
    reverse: i32,
) -> Result<(), OpError> {
    let (_, tt, hh, kk, vv) = d.as_i32()?;
    let (nk, nv, nc, bh) = (tiles(d.k, TILE), tiles(d.v, TILE), d.chunks(), d.b * d.h);
    let (xp, yp, dcp, sp) = (x, ptr(y), decay, states);
    let slots = STATES_BLOCKS_PER_SM * dev.sm_count() as i64;
    let len = segment_len(slots, nk * nv * bh, d);
    let segments = tiles(nc, len);
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_states")?;
    let seg_len = len as i32;
    if segments == 1 {
        let nullp = 0u64;
        return Ok(launch!(f, (nv, nk, bh), THREADS, STATES_SMEM;
            xp, yp, dcp, s0, sp, last, nullp, nullp, nullp, seg_len, tt, hh, kk, vv, reverse)?);
    }
    let cum = buffer(&[bh, nc, d.k], Kind::Float, y)?;
    let cump = ptr(&cum);
    let walked = Segmented {
        len,
        states: sp,
        cum: cump,
        last,
    };
    let carry = carry_segments(dev, dt, d, (x, y, decay), s0, walked, reverse)?;
    let cp = ptr(&carry);
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_fixup")?;
    Ok(launch!(f, (nc, bh, 1), THREADS, 0; sp, cump, cp, seg_len, tt, kk, vv, reverse)?)
}

/// What the segments of a walk write in [`carry_segments`] (device addresses, 0: nothing).
struct Segmented {
    /// Chunks per segment.
    len: i64,
    /// Every chunk's state from the segment's zero start (0: only the segments' end states, and
    /// not of the last segment).
    states: u64,
    /// Every chunk's decay from its segment's start.
    cum: u64,
    /// The final state.
    last: u64,
}

/// The first passes of a segmented walk: `gla_tc_states` walks every segment from zero, then
/// `gla_tc_carry` joins their end states into each segment's true start state (returned,
/// `[B*H, segments, K, V]` f32; segment 0's entry unused) and the final state.
fn carry_segments(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    (x, y, decay): (u64, &Tensor, u64),
    s0: u64,
    walked: Segmented,
    reverse: i32,
) -> Result<Tensor, OpError> {
    let (_, tt, hh, kk, vv) = d.as_i32()?;
    let (nk, nv, bh) = (tiles(d.k, TILE), tiles(d.v, TILE), d.b * d.h);
    let segments = tiles(d.chunks(), walked.len);
    let seg_last = buffer(&[bh, segments, d.k, d.v], Kind::Float, y)?;
    let carry = buffer(&[bh, segments, d.k, d.v], Kind::Float, y)?;
    let seg_decay = buffer(&[bh, segments, d.k], Kind::Float, y)?;
    let (xp, yp, dcp) = (x, ptr(y), decay);
    let (lp, cp, sdp) = (ptr(&seg_last), ptr(&carry), ptr(&seg_decay));
    let Segmented {
        states, cum, last, ..
    } = walked;
    let (seg_len, nseg, nullp) = (walked.len as i32, segments as i32, 0u64);
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_states")?;
    launch!(f, (nv, nk, bh * segments), THREADS, STATES_SMEM;
        xp, yp, dcp, s0, states, nullp, lp, sdp, cum, seg_len, tt, hh, kk, vv, reverse)?;
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_carry")?;
    let elements = tiles(d.k * d.v, i64::from(THREADS));
    launch!(f, (elements, bh, 1), THREADS, 0; lp, sdp, cp, last, nseg, kk, vv)?;
    Ok(carry)
}

/// A block shape of the output walks (`gla_tc_walk_o` / `gla_tc_walk_dv`, `_wide`): each warp
/// holds 16 V columns of the state for the whole K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WalkBlock {
    warps: i64,
    /// Step buffers (one step's loads in flight per buffer but the one in use).
    stages: i64,
    wide: bool,
}

/// 64 V columns, two step buffers: two blocks per SM at K = 128.
const NARROW_WALK: WalkBlock = WalkBlock {
    warps: 4,
    stages: 2,
    wide: false,
};

/// 128 V columns, three step buffers: one block per SM. A step's qs, ks and A tiles arrive once
/// for twice the columns, and two steps' loads are in flight (H100, K = V = 128: walk 186 -> 175
/// us, fwd+bwd 1.04-1.06 -> 1.01 ms at 8 x 2048 x 16).
const WIDE_WALK: WalkBlock = WalkBlock {
    warps: 8,
    stages: 3,
    wide: true,
};

impl WalkBlock {
    /// The kernel of this shape for the walk in direction `reverse`.
    fn kernel(self, reverse: i32) -> &'static str {
        match (reverse == REVERSE, self.wide) {
            (false, false) => "gla_tc_walk_o",
            (false, true) => "gla_tc_walk_o_wide",
            (true, false) => "gla_tc_walk_dv",
            (true, true) => "gla_tc_walk_dv_wide",
        }
    }

    fn columns(self) -> i64 {
        16 * self.warps
    }

    fn threads(self) -> u32 {
        32 * self.warps as u32
    }

    /// Dynamic shared memory: `stages` step buffers, each a 64 x 72 16-bit tile of x_out and of
    /// x_walk per 64 channels, A, y per 64 columns, then 128 fp32 decays.
    fn smem(self, d: Dims) -> u32 {
        let tile = 64 * 72;
        let buffer = (2 * tiles(d.k, TILE) + 1 + self.warps / 4) * tile + 4 * TILE;
        (2 * self.stages * buffer) as u32
    }
}

/// The walk block for `d` and its chunks per segment on `sms` SMs that hold `narrow_per_sm`
/// narrow blocks and `wide_per_sm` wide ones (None: its shared memory does not fit). Wide blocks
/// where V spans more than a narrow block, unless they would walk in more segments: with fewer
/// (batch, head) pairs than SMs the wide grid needs segments, and their end-state pre-walk, where
/// the narrow grid fills the GPU in one walk (H100, 4 x 4096 x 16 x 128: fwd+bwd 1.05 ms narrow in
/// one walk, 1.11 ms wide in two segments).
fn walk_block_for(
    sms: i64,
    narrow_per_sm: i64,
    wide_per_sm: Option<i64>,
    d: Dims,
) -> (WalkBlock, i64) {
    let plan = |block: WalkBlock, per_sm| {
        let blocks = tiles(d.v, block.columns()) * d.b * d.h;
        (block, walk_out_segment_len(sms, per_sm, blocks, d))
    };
    let narrow = plan(NARROW_WALK, narrow_per_sm);
    match wide_per_sm {
        Some(per_sm) if d.v > NARROW_WALK.columns() => {
            let wide = plan(WIDE_WALK, per_sm);
            if tiles(d.chunks(), wide.1) <= tiles(d.chunks(), narrow.1) {
                wide
            } else {
                narrow
            }
        }
        _ => narrow,
    }
}

/// An output walk's kernel (forward or adjoint) and launch shape.
struct OutputWalk {
    f: glatrain_cuda::launch::Kernel,
    block: WalkBlock,
    smem: u32,
    /// Chunks per segment.
    seg_len: i64,
}

/// The output walk over `d` in direction `reverse`, or None where the state does not fit a
/// block's registers (K > 128) or its step buffers do not fit the GPU's shared memory: then
/// `gla_tc_states` walks and separate kernels compute the outputs.
fn output_walk(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    reverse: i32,
) -> Result<Option<OutputWalk>, OpError> {
    let resident = |block: WalkBlock| -> Result<Option<i64>, CudaError> {
        let smem = block.smem(d);
        if smem > dev.max_shared_per_block() {
            return Ok(None);
        }
        let (name, threads) = (block.kernel(reverse), block.threads());
        dev.resident_blocks(&GLA_TC, dt, name, smem, threads)
            .map(Some)
    };
    if d.k > WALK_OUT_MAX_K {
        return Ok(None);
    }
    let Some(narrow_per_sm) = resident(NARROW_WALK)? else {
        return Ok(None);
    };
    let wide_per_sm = resident(WIDE_WALK)?;
    let (block, seg_len) = walk_block_for(dev.sm_count() as i64, narrow_per_sm, wide_per_sm, d);
    Ok(Some(OutputWalk {
        f: dev.kernel(&GLA_TC, dt, block.kernel(reverse))?,
        block,
        smem: block.smem(d),
        seg_len,
    }))
}

/// One walk that also writes every chunk's outputs (`gla_tc_walk_o`: o = qs h_n + A v, or
/// `gla_tc_walk_dv`: dv = ks dh_{n+1} + A^T do): x_out and x_walk are (qs, ks) forward and
/// (ks, qs) in reverse, y is v or do. `out` 0: states only. Few (batch, head) pairs and many
/// chunks: `gla_tc_states` first walks the segments but the last from zero for their end states
/// alone, `gla_tc_carry` joins them, and every segment then walks from its true start state (the
/// last one to the final state).
#[allow(clippy::too_many_arguments)]
fn walk_out(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    walk: &OutputWalk,
    (x_out, x_walk, y, decay, attn): (u64, u64, &Tensor, u64, u64),
    s0: u64,
    states: u64,
    out: u64,
    last: u64,
    reverse: i32,
) -> Result<(), OpError> {
    let (_, tt, hh, kk, vv) = d.as_i32()?;
    let (nv, nc, bh) = (tiles(d.v, walk.block.columns()), d.chunks(), d.b * d.h);
    let (xop, xwp, yp, dcp, ap, sp) = (x_out, x_walk, ptr(y), decay, attn, states);
    let (smem, threads) = (walk.smem, walk.block.threads());
    let len = walk.seg_len;
    let segments = tiles(nc, len);
    let seg_len = len as i32;
    let nullp = 0u64;
    if segments == 1 {
        return Ok(launch!(walk.f, (nv, bh, 1), threads, smem;
            xop, xwp, yp, dcp, ap, s0, nullp, sp, out, last, seg_len, tt, hh, kk, vv)?);
    }
    // End states only (the last segment's own walk reaches the final state).
    let ends = Segmented {
        len,
        states: nullp,
        cum: nullp,
        last: nullp,
    };
    let carry = carry_segments(dev, dt, d, (x_walk, y, decay), s0, ends, reverse)?;
    let cp = ptr(&carry);
    Ok(launch!(walk.f, (nv, bh * segments, 1), threads, smem;
        xop, xwp, yp, dcp, ap, s0, cp, sp, out, last, seg_len, tt, hh, kk, vv)?)
}

/// The chunk states into `kept` (from `h0`; the final state into `ht`, 0: not wanted) and,
/// unless `o` is 0, the outputs; A, qs, ks and the decays are in `kept` already ([`attention`]).
fn states_and_outputs(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    v: &Tensor,
    h0: u64,
    kept: &Kept,
    (ht, o): (u64, u64),
) -> Result<(), OpError> {
    if let Some(w) = output_walk(dev, dt, d, FORWARD)? {
        let operands = (kept.qs, kept.ks, v, kept.decay, kept.attn);
        return walk_out(dev, dt, d, &w, operands, h0, kept.states, o, ht, FORWARD);
    }
    let operands = (kept.ks, v, kept.decay);
    walk(dev, dt, d, operands, h0, kept.states, ht, FORWARD)?;
    if o == 0 {
        return Ok(());
    }
    let (_, tt, hh, kk, vv) = d.as_i32()?;
    let (qsp, vp, hsp, ap) = (kept.qs, ptr(v), kept.states, kept.attn);
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_fwd_o")?;
    Ok(
        launch!(f, (tiles(d.v, TILE), d.chunks(), d.b * d.h), THREADS, OUT_SMEM;
        qsp, vp, hsp, ap, h0, o, tt, hh, kk, vv)?,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    x: &Inputs,
    scale: f64,
) -> Result<Forward, OpError> {
    check_grid(d)?;
    let Inputs { q, k, v, g, h0 } = *x;
    let (buf, kept) = Kept::new(d, q)?;
    attention(dev, dt, d, (q, k, g), &kept, scale as f32)?;
    // The outputs are allocated while the GPU computes A: the first kernel starts sooner.
    let ht = buffer(&[d.b, d.h, d.k, d.v], Kind::Float, q)?;
    let o = buffer(&[d.b, d.t, d.h, d.v], v.kind(), v)?;
    let outputs = (ptr(&ht), ptr(&o));
    states_and_outputs(dev, dt, d, v, opt_ptr(h0), &kept, outputs)?;
    Ok(Forward {
        o,
        final_state: ht,
        saved: Some(buf),
    })
}

pub(super) fn backward(
    dev: &Arc<Gpu>,
    dt: KernelDtype,
    d: Dims,
    inputs: &BackwardInputs<'_>,
    scale: f64,
) -> Result<Backward, OpError> {
    check_grid(d)?;
    let x = &inputs.x;
    let (_, tt, hh, kk, vv) = d.as_i32()?;
    let (nk, nv, nc, bh) = (tiles(d.k, TILE), tiles(d.v, TILE), d.chunks(), d.b * d.h);
    let (qp, kp, vp, gp, h0p) = (ptr(x.q), ptr(x.k), ptr(x.v), ptr(x.g), opt_ptr(x.h0));
    let (dop, dhtp) = (ptr(inputs.d_o), opt_ptr(inputs.dht));
    let sc = scale as f32;
    // A recomputed buffer lives to the end of the call.
    let mut _recomputed = None;
    let kept = match inputs.saved {
        Some(buf) => Kept::view(d, buf),
        None => {
            let (buf, kept) = Kept::new(d, x.q)?;
            _recomputed = Some(buf);
            attention(dev, dt, d, (x.q, x.k, x.g), &kept, sc)?;
            states_and_outputs(dev, dt, d, x.v, h0p, &kept, (0, 0))?;
            kept
        }
    };
    let dhs = states_buffer(d, x.q)?;
    let dh0 =
        x.h0.map(|h| buffer(&h.size(), Kind::Float, x.q))
            .transpose()?;
    let dq = buffer(&x.q.size(), x.q.kind(), x.q)?;
    let dk = buffer(&x.k.size(), x.k.kind(), x.k)?;
    let dv = buffer(&x.v.size(), x.v.kind(), x.v)?;
    let dg = buffer(&x.g.size(), Kind::Float, x.q)?;
    let (hsp, ap, ksp) = (kept.states, kept.attn, kept.ks);
    let (dhsp, dh0p) = (ptr(&dhs), opt_ptr(dh0.as_ref()));
    let (dqp, dkp, dvp, dgp) = (ptr(&dq), ptr(&dk), ptr(&dv), ptr(&dg));
    if let Some(w) = output_walk(dev, dt, d, REVERSE)? {
        let operands = (kept.ks, kept.qs, inputs.d_o, kept.decay, kept.attn);
        walk_out(
            dev,
            dt,
            d,
            &w,
            operands,
            dhtp,
            ptr(&dhs),
            dvp,
            dh0p,
            REVERSE,
        )?;
    } else {
        let operands = (kept.qs, inputs.d_o, kept.decay);
        walk(dev, dt, d, operands, dhtp, ptr(&dhs), dh0p, REVERSE)?;
        let f = dev.kernel(&GLA_TC, dt, "gla_tc_bwd_dv")?;
        launch!(f, (nv, nc, bh), THREADS, OUT_SMEM;
            ksp, dop, dhsp, ap, dhtp, dvp, tt, hh, kk, vv)?;
    }
    let f = dev.kernel(&GLA_TC, dt, "gla_tc_bwd_dqk")?;
    launch!(f, (nk, nc, bh), THREADS, BWD_DQK_SMEM;
        qp, kp, vp, gp, dop, hsp, dhsp, h0p, dhtp, dqp, dkp, dgp, tt, hh, kk, vv, sc)?;
    Ok(Backward {
        dq,
        dk,
        dv,
        dg,
        dh0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(b: i64, t: i64, h: i64, k: i64, v: i64) -> Dims {
        Dims { b, t, h, k, v }
    }

    #[test]
    fn walks_split_into_segments_that_fill_the_gpu() {
        // H100: 132 SMs; gla_tc_states: 4 blocks each = 528 slots, a 128 x 128 state is 4 tiles.
        let slots = 4 * 132;
        let states = |d: Dims| segment_len(slots, 4 * d.b * d.h, d);
        // 8 x 16 x 4 = 512 blocks fill the GPU: one walk over all 32 chunks.
        assert_eq!(states(dims(8, 2048, 16, 128, 128)), 32);
        // 256 blocks: two segments of 32 chunks (three would need a second wave).
        assert_eq!(states(dims(4, 4096, 16, 128, 128)), 32);
        // 64 blocks: eight segments of 32 chunks.
        assert_eq!(states(dims(1, 16384, 16, 128, 128)), 32);
        // Few chunks: segments keep at least MIN_SEGMENT_CHUNKS of them.
        assert_eq!(segment_len(slots, 1, dims(1, 1000, 1, 64, 64)), 8);
        assert_eq!(segment_len(slots, 1, dims(1, 448, 1, 64, 64)), 7);
    }

    #[test]
    fn output_walks_split_only_where_segments_pay() {
        // gla_tc_walk_o at K = V = 128 on an H100: 2 blocks per SM on 132 SMs, one per V-tile.
        let walk = |d: Dims| walk_out_segment_len(132, 2, 2 * d.b * d.h, d);
        assert_eq!(walk(dims(8, 2048, 16, 128, 128)), 32);
        // Two segments of 128 blocks would pass one block per SM: one walk.
        assert_eq!(walk(dims(4, 4096, 16, 128, 128)), 64);
        assert_eq!(walk(dims(3, 4096, 16, 128, 128)), 64);
        // Four and eight segments.
        assert_eq!(walk(dims(2, 8192, 16, 128, 128)), 32);
        assert_eq!(walk(dims(1, 16384, 16, 128, 128)), 32);
        // A small grid keeps two or three segments while they fit one block per SM.
        assert_eq!(walk(dims(1, 1024, 1, 128, 128)), 8);
        assert_eq!(walk(dims(1, 1536, 1, 128, 128)), 8);
    }

    #[test]
    fn wide_walks_where_they_need_no_more_segments() {
        // H100 at K = 128: 2 narrow or 1 wide block per SM on 132 SMs.
        let block = |d: Dims| walk_block_for(132, 2, Some(1), d);
        // 128 wide blocks fill the GPU in one walk, as 256 narrow ones do.
        assert_eq!(block(dims(8, 2048, 16, 128, 128)), (WIDE_WALK, 32));
        // 64 wide blocks would walk in two segments, 128 narrow ones in one.
        assert_eq!(block(dims(4, 4096, 16, 128, 128)), (NARROW_WALK, 64));
        // Both in four or eight segments.
        assert_eq!(block(dims(2, 8192, 16, 128, 128)), (WIDE_WALK, 32));
        assert_eq!(block(dims(1, 16384, 16, 128, 128)), (WIDE_WALK, 32));
        // GLA-340M's layer (8 x 4 pairs, V = 256): 128 narrow blocks in one walk.
        assert_eq!(block(dims(8, 2048, 4, 128, 256)), (NARROW_WALK, 32));
        // V within one narrow block, or no room for the wide one.
        assert_eq!(block(dims(8, 2048, 16, 64, 64)).0, NARROW_WALK);
        assert_eq!(
            walk_block_for(132, 2, None, dims(8, 2048, 16, 128, 128)).0,
            NARROW_WALK
        );
    }

    #[test]
    fn walk_shared_memory_matches_the_kernel() {
        // kernels/gla_tc.cu static_asserts these for K = 128.
        assert_eq!(NARROW_WALK.smem(dims(1, 64, 1, 128, 64)), 111_616);
        assert_eq!(WIDE_WALK.smem(dims(1, 64, 1, 128, 128)), 195_072);
        assert_eq!(NARROW_WALK.smem(dims(1, 64, 1, 100, 64)), 111_616);
        assert_eq!(NARROW_WALK.smem(dims(1, 64, 1, 64, 512)), 74_752);
    }

    #[test]
    fn rows_past_32_bit_tile_offsets_are_refused() {
        assert!(check_grid(dims(1, 64, 16, 1024, 1024)).is_ok());
        let err = check_grid(dims(1, 64, 32_768, 1024, 64)).unwrap_err();
        assert!(err.to_string().contains("32768 x 1024"), "{err}");
        let err = check_grid(dims(70_000, 64, 1, 64, 64)).unwrap_err();
        assert!(
            err.to_string().contains("exceeds the 65535 blocks"),
            "{err}"
        );
        // One block row per chunk on grid y: T up to 65535 chunks of 64 tokens.
        assert!(check_grid(dims(1, 65_535 * 64, 1, 64, 64)).is_ok());
        let err = check_grid(dims(1, 65_535 * 64 + 1, 1, 64, 64)).unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("T <= 4194240"), "{err}");
        let err = check_grid(dims(1, 1 << 31, 1, 64, 64)).unwrap_err();
        assert!(err.to_string().contains("T = 2147483648 is past"), "{err}");
    }
}
