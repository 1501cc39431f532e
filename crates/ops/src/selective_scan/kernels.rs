//! Launchers of `kernels/selective_scan.cu` over tch tensors: the forward (optionally segmented:
//! local segment walks, their carry, then the walk from the carried states) and the backward
//! (the same for the adjoint in reverse, then the reductions of dB / dC and of dA, dD and
//! d(delta_bias) partials).
//!
//! Inputs ([`ScanInputs`]) are validated ([`super::selective_scan`] sees to it): u, delta, z
//! `[B, T, D]` and B, C `[B, T, N]` of one dtype (f32, bf16 or f16), each with its innermost
//! dimension contiguous (column slices of a larger projection are read in place, through their
//! batch and step strides); A `[D, N]`, D and delta_bias `[D]`, states `[B, D, N]` contiguous
//! f32; resets `[B, T]` bool contiguous; all on one CUDA device. Every kernel takes one
//! [`ScanParams`] by value.

use glatrain_cuda::cudarc::driver::DeviceRepr;
use glatrain_cuda::{launch, CudaError, Gpu, KernelDtype, KernelSource};
use tch::{Kind, Tensor};

use super::ScanInputs;
use crate::launch::{buffer, device_of, kernel_dtype_of, opt_ptr, ptr, tiles};
use crate::OpError;

/// `kernels/selective_scan.cu`. Entry points in the order of their `KERNEL_INDEX`.
pub static SELECTIVE_SCAN: KernelSource = KernelSource {
    file: "selective_scan.cu",
    embedded: include_str!("../../../../kernels/selective_scan.cu"),
    kernels: &[
        "selective_scan_fwd",
        "selective_scan_fwd_states",
        "selective_scan_carry",
        "selective_scan_bwd",
        "selective_scan_bwd_dh",
        "selective_scan_reduce_bc",
        "selective_scan_reduce_params",
    ],
    dtypes: &KernelDtype::ALL,
};

/// The launch geometry of the scan kernels, for whoever plans around them (the preflight's
/// memory estimate, the benchmark's floors) instead of restating it.
pub mod geometry {
    /// Steps per chunk (`SS_CHUNK`): the forward keeps the fp32 state at each chunk start for
    /// the backward, `[B, ceil(T / 32), D, N]`.
    pub const CHUNK_LEN: i64 = 32;
    /// Channels per backward block (`SS_BWD_TILE`): dB / dC partial sums per tile of this many
    /// channels, `[ceil(D / 64), B, T, 2, N]` fp32.
    pub const BWD_TILE: i64 = 64;
    /// The largest `d_state` the kernels take.
    pub const MAX_STATES: i64 = 256;
    /// Kernel launches of a forward + backward without segments (forward; backward, the two
    /// reductions); segments add a state walk and a carry each way.
    pub const LAUNCHES: u32 = 4;
}

use geometry::{BWD_TILE, CHUNK_LEN};

/// Threads per block of the element-wise kernels (carry, reductions).
const FLAT_THREADS: u32 = 256;
/// `reverse` of `selective_scan_carry`: states forward, adjoints backward.
const CARRY_FORWARD: i32 = 0;
const CARRY_BACKWARD: i32 = 1;

/// A `[B, T, W]` tensor as the kernels read it: element (b, t, i) at `p + b sb + t st + i`
/// (strides in elements; `p = 0`: absent). `Rows` in the kernel source.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Rows {
    p: u64,
    sb: i64,
    st: i64,
}

impl Rows {
    /// `t`'s rows; its innermost dimension must be contiguous (see [`row_major`]).
    fn of(t: &Tensor) -> Rows {
        let s = t.stride();
        Rows {
            p: ptr(t),
            sb: s[0],
            st: s[1],
        }
    }

    fn of_opt(t: Option<&Tensor>) -> Rows {
        t.map_or(Rows::default(), Rows::of)
    }
}

/// Whether the kernels can read `t` (`[B, T, W]`) in place: its innermost dimension contiguous.
pub fn row_major(t: &Tensor) -> bool {
    let (size, stride) = (t.size(), t.stride());
    size.len() == 3 && (size[2] <= 1 || stride[2] == 1)
}

/// The one argument of every scan kernel: `ScanParams` in `kernels/selective_scan.cu`, field for
/// field (device addresses as u64, 0 = absent).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanParams {
    u: Rows,
    delta: Rows,
    z: Rows,
    bm: Rows,
    cm: Rows,
    out: Rows,
    ypre: Rows,
    dout: Rows,
    du: Rows,
    ddelta: Rows,
    dz: Rows,
    db: Rows,
    dc: Rows,
    a: u64,
    dskip: u64,
    bias: u64,
    h0: u64,
    dht: u64,
    ht: u64,
    ckpt: u64,
    seg: u64,
    dsum: u64,
    part_bc: u64,
    part_a: u64,
    part_dd: u64,
    work: u64,
    dh0: u64,
    da: u64,
    dd: u64,
    dbias: u64,
    reset: u64,
    b: i32,
    t: i32,
    d: i32,
    n: i32,
    segments: i32,
    seg_chunks: i32,
    softplus: i32,
    reverse: i32,
}

// The kernel source static_asserts the same size.
const _: () = assert!(std::mem::size_of::<ScanParams>() == 13 * 24 + 18 * 8 + 8 * 4);
const _: () = assert!(std::mem::align_of::<ScanParams>() == 8);

// SAFETY: ScanParams is #[repr(C)], made of u64, i64 and i32 fields only (no padding: 488 bytes,
// asserted above), laid out as the kernels' `ScanParams` struct, which they take by value. The
// device addresses in it are never dereferenced on the host.
unsafe impl DeviceRepr for ScanParams {}

/// How a call splits its chunks into segments walked in parallel (one segment: the whole
/// sequence per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Segments {
    /// The launchers' rule ([`segment_split`]): segments only where the grid cannot fill the GPU.
    #[default]
    Auto,
    /// At most this many chunks per segment in the forward and in the backward (>= 1): for
    /// tests and tuning.
    ChunksPerSegment { forward: i64, backward: i64 },
}

/// The segments of a walk of `chunks` chunks on a grid of `blocks` blocks (per segment) on a GPU
/// of `sms` multiprocessors: one segment when the blocks fill the SMs, else enough segments for
/// about two blocks per SM (at most one per chunk). Returns (segments, chunks per segment): each
/// segment but the last has exactly that many chunks.
pub fn segment_split(chunks: i64, blocks: i64, sms: i64) -> (i64, i64) {
    let wanted = if blocks >= sms {
        1
    } else {
        chunks.min(tiles(2 * sms, blocks.max(1)))
    };
    per_segment(chunks, wanted.max(1))
}

/// (segments, chunks per segment) for `wanted` segments of `chunks` chunks.
fn per_segment(chunks: i64, wanted: i64) -> (i64, i64) {
    let seg_chunks = tiles(chunks, wanted).max(1);
    (tiles(chunks, seg_chunks).max(1), seg_chunks)
}

/// (segments, chunks per segment) for at most `per` chunks per segment.
fn fixed_split(chunks: i64, per: i64) -> (i64, i64) {
    let seg_chunks = per.clamp(1, chunks.max(1));
    (tiles(chunks, seg_chunks).max(1), seg_chunks)
}

/// `d_state` rounded up to a power of two >= 4: the states a channel's thread lanes hold.
fn padded_states(n: i64) -> i64 {
    (n.max(4) as u64).next_power_of_two() as i64
}

/// Forward geometry for `d_state = n`: (threads per block, channels per block).
fn forward_block(n: i64) -> (u32, i64) {
    let lanes = padded_states(n) / 4;
    let threads = (8 * lanes).max(128);
    (threads as u32, threads / lanes)
}

/// Backward threads per block for `d_state = n`: 32 channel pairs x up to 4 state lanes.
fn backward_threads(n: i64) -> u32 {
    (32 * (padded_states(n) / 4).min(4)) as u32
}

/// States per backward pass: 4 per lane.
fn backward_pass_states(n: i64) -> i64 {
    4 * (padded_states(n) / 4).min(4)
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: i64,
    pub t: i64,
    pub d: i64,
    pub n: i64,
}

impl Dims {
    fn of(u: &Tensor, a: &Tensor) -> Dims {
        let (s, n) = (u.size(), a.size()[1]);
        Dims {
            b: s[0],
            t: s[1],
            d: s[2],
            n,
        }
    }

    fn is_empty(&self) -> bool {
        self.b == 0 || self.t == 0 || self.d == 0
    }

    /// Chunks of [`geometry::CHUNK_LEN`] steps covering T.
    pub fn chunks(&self) -> i64 {
        tiles(self.t, CHUNK_LEN)
    }

    /// The sizes as the kernels' 32-bit ints, or an error naming the size past that range.
    fn as_i32(&self) -> Result<[i32; 4], OpError> {
        let int = |name: &str, n: i64| {
            i32::try_from(n).map_err(|_| {
                OpError::Cuda(CudaError::Limit {
                    kernel: "selective_scan".to_string(),
                    what: format!("{name} = {n} is past the kernels' 32-bit sizes (2^31 - 1)"),
                })
            })
        };
        Ok([
            int("B", self.b)?,
            int("T", self.t)?,
            int("D", self.d)?,
            int("N", self.n)?,
        ])
    }

    /// The common fields of every launch of this call: the sizes, the inputs `x` and the
    /// softplus flag.
    fn params(&self, x: &ScanInputs, softplus: bool) -> Result<ScanParams, OpError> {
        let [b, t, d, n] = self.as_i32()?;
        Ok(ScanParams {
            u: Rows::of(x.u),
            delta: Rows::of(x.delta),
            z: Rows::of_opt(x.z),
            bm: Rows::of(x.b),
            cm: Rows::of(x.c),
            a: ptr(x.a),
            dskip: opt_ptr(x.d),
            bias: opt_ptr(x.delta_bias),
            h0: opt_ptr(x.initial_state),
            reset: opt_ptr(x.resets),
            b,
            t,
            d,
            n,
            softplus: i32::from(softplus),
            ..ScanParams::default()
        })
    }
}

/// Compiles (or reads from the disk cache) and loads the scan kernels for inputs of `dt` on CUDA
/// device `ordinal`, so that their first call does not wait for NVRTC; with `optimised`, also
/// waits for the Full tier.
pub fn prepare(ordinal: usize, dt: KernelDtype, optimised: bool) -> Result<(), CudaError> {
    let dev = Gpu::get(ordinal)?;
    if optimised {
        dev.prepare_final(&SELECTIVE_SCAN, dt)
    } else {
        dev.prepare(&SELECTIVE_SCAN, dt)
    }
}

/// Outputs of [`forward`].
#[derive(Debug)]
pub struct Forward {
    /// `[B, T, D]` in the input dtype: `y silu(z)`, or `y` without z.
    pub out: Tensor,
    /// `[B, D, N]` f32.
    pub final_state: Tensor,
    /// The fp32 state at each chunk start, `[B, chunks, D, N]`, for [`backward`] (when kept).
    pub checkpoints: Option<Tensor>,
    /// The pre-gate `y` `[B, T, D]` in the input dtype, for dz (when kept and z was given).
    pub ypre: Option<Tensor>,
}

/// Scan forward. With `keep`, also returns what [`backward`] needs (the chunk-start states, and
/// the pre-gate output when z is given); without, the kernels write neither.
pub fn forward(
    x: &ScanInputs,
    softplus: bool,
    segments: Segments,
    keep: bool,
) -> Result<Forward, OpError> {
    let dims = Dims::of(x.u, x.a);
    let Dims { b, t, d, n } = dims;
    if dims.is_empty() {
        let final_state = match x.initial_state {
            Some(h) => h.f_detach_copy()?,
            None => Tensor::f_zeros([b, d, n], (Kind::Float, x.u.device()))?,
        };
        return Ok(Forward {
            out: Tensor::f_zeros([b, t, d], (x.u.kind(), x.u.device()))?,
            final_state,
            checkpoints: keep
                .then(|| Tensor::f_zeros([b, dims.chunks(), d, n], (Kind::Float, x.u.device())))
                .transpose()?,
            ypre: None,
        });
    }
    let dev = device_of(x.u)?;
    let dt = kernel_dtype_of("selective_scan", "u", x.u)?;
    let out = buffer(&[b, t, d], x.u.kind(), x.u)?;
    let final_state = buffer(&[b, d, n], Kind::Float, x.u)?;
    let checkpoints = keep
        .then(|| buffer(&[b, dims.chunks(), d, n], Kind::Float, x.u))
        .transpose()?;
    let ypre =
        x.z.filter(|_| keep)
            .map(|_| buffer(&[b, t, d], x.u.kind(), x.u))
            .transpose()?;

    let mut p = dims.params(x, softplus)?;
    (p.out, p.ypre) = (Rows::of(&out), Rows::of_opt(ypre.as_ref()));
    (p.ht, p.ckpt) = (ptr(&final_state), opt_ptr(checkpoints.as_ref()));

    let (threads, channels) = forward_block(n);
    let np = padded_states(n);
    let blocks = tiles(d, channels);
    let (segs, seg_chunks) = match segments {
        Segments::Auto => segment_split(dims.chunks(), blocks * b, dev.sm_count() as i64),
        Segments::ChunksPerSegment { forward, .. } => fixed_split(dims.chunks(), forward),
    };
    (p.segments, p.seg_chunks) = (segs as i32, seg_chunks as i32);
    // Workspaces live until the launches are queued (libtorch orders any reuse after them).
    let mut workspace = Vec::new();
    if segs > 1 {
        let seg = buffer(&[segs, b, d, n], Kind::Float, x.u)?;
        let dsum = buffer(&[segs, b, d], Kind::Float, x.u)?;
        (p.seg, p.dsum) = (ptr(&seg), ptr(&dsum));
        workspace.extend([seg, dsum]);
        let states = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_fwd_states")?;
        let smem = (4 * CHUNK_LEN * (2 * channels + np)) as u32;
        launch!(states, (blocks, b, segs - 1), threads, smem; p)?;
        p.reverse = CARRY_FORWARD;
        let carry = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_carry")?;
        launch!(carry, (tiles(b * d * n, FLAT_THREADS as i64), 1, 1), FLAT_THREADS, 0; p)?;
    }
    let fwd = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_fwd")?;
    let smem = (4 * CHUNK_LEN * (3 * channels + 2 * np + threads as i64)) as u32;
    launch!(fwd, (blocks, b, segs), threads, smem; p)?;
    Ok(Forward {
        out,
        final_state,
        checkpoints,
        ypre,
    })
}

/// Gradients from [`backward`], each `None` where its input was absent.
#[derive(Debug)]
pub struct Backward {
    /// `[B, T, D]` in the input dtype.
    pub du: Tensor,
    /// `[B, T, D]` in the input dtype: the gradient of delta before the bias and softplus.
    pub ddelta: Tensor,
    /// `[D, N]` f32.
    pub da: Tensor,
    /// `[B, T, N]` in the input dtype.
    pub db: Tensor,
    /// `[B, T, N]` in the input dtype.
    pub dc: Tensor,
    /// `[D]` f32.
    pub dd: Option<Tensor>,
    /// `[B, T, D]` in the input dtype.
    pub dz: Option<Tensor>,
    /// `[D]` f32.
    pub dbias: Option<Tensor>,
    /// `[B, D, N]` f32.
    pub dh0: Option<Tensor>,
}

/// The inputs of [`backward`].
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a> {
    /// The forward's inputs.
    pub x: ScanInputs<'a>,
    /// [`Forward::checkpoints`] of the same inputs.
    pub checkpoints: &'a Tensor,
    /// [`Forward::ypre`] of the same inputs (when z was given).
    pub ypre: Option<&'a Tensor>,
    /// The gradient of the output, `[B, T, D]` in the input dtype, innermost dimension
    /// contiguous.
    pub dout: &'a Tensor,
    /// The gradient of the final state, `[B, D, N]` f32 contiguous, when it was used.
    pub dht: Option<&'a Tensor>,
}

/// Scan backward: the gradient of every input from the output's (and the final state's).
pub fn backward(
    inputs: &BackwardInputs,
    softplus: bool,
    segments: Segments,
) -> Result<Backward, OpError> {
    let x = inputs.x;
    let dims = Dims::of(x.u, x.a);
    let Dims { b, t, d, n } = dims;
    let dt_kind = x.u.kind();
    let zeros = |shape: &[i64], kind: Kind| Tensor::f_zeros(shape, (kind, x.u.device()));
    if dims.is_empty() {
        let dh0 = match (x.initial_state, inputs.dht) {
            (None, _) => None,
            (Some(_), Some(g)) => Some(g.f_detach_copy()?),
            (Some(_), None) => Some(zeros(&[b, d, n], Kind::Float)?),
        };
        let per_channel =
            |given: Option<&Tensor>| given.map(|_| zeros(&[d], Kind::Float)).transpose();
        return Ok(Backward {
            du: zeros(&[b, t, d], dt_kind)?,
            ddelta: zeros(&[b, t, d], dt_kind)?,
            da: zeros(&[d, n], Kind::Float)?,
            db: zeros(&[b, t, n], dt_kind)?,
            dc: zeros(&[b, t, n], dt_kind)?,
            dd: per_channel(x.d)?,
            dz: x.z.map(|_| zeros(&[b, t, d], dt_kind)).transpose()?,
            dbias: per_channel(x.delta_bias)?,
            dh0,
        });
    }
    let dev = device_of(x.u)?;
    let dt = kernel_dtype_of("selective_scan", "u", x.u)?;
    let u = x.u;
    let du = buffer(&[b, t, d], dt_kind, u)?;
    let ddelta = buffer(&[b, t, d], dt_kind, u)?;
    let db = buffer(&[b, t, n], dt_kind, u)?;
    let dc = buffer(&[b, t, n], dt_kind, u)?;
    let da = buffer(&[d, n], Kind::Float, u)?;
    let dd = x.d.map(|_| buffer(&[d], Kind::Float, u)).transpose()?;
    let dz = x.z.map(|_| buffer(&[b, t, d], dt_kind, u)).transpose()?;
    let dbias = x
        .delta_bias
        .map(|_| buffer(&[d], Kind::Float, u))
        .transpose()?;
    let dh0 = x
        .initial_state
        .map(|_| buffer(&[b, d, n], Kind::Float, u))
        .transpose()?;

    let mut p = dims.params(&x, softplus)?;
    (p.ypre, p.dout) = (Rows::of_opt(inputs.ypre), Rows::of(inputs.dout));
    (p.du, p.ddelta, p.dz) = (Rows::of(&du), Rows::of(&ddelta), Rows::of_opt(dz.as_ref()));
    (p.db, p.dc) = (Rows::of(&db), Rows::of(&dc));
    (p.dht, p.ckpt) = (opt_ptr(inputs.dht), ptr(inputs.checkpoints));
    (p.da, p.dd, p.dbias, p.dh0) = (
        ptr(&da),
        opt_ptr(dd.as_ref()),
        opt_ptr(dbias.as_ref()),
        opt_ptr(dh0.as_ref()),
    );

    let channel_tiles = tiles(d, BWD_TILE);
    let (segs, seg_chunks) = match segments {
        Segments::Auto => segment_split(dims.chunks(), channel_tiles * b, dev.sm_count() as i64),
        Segments::ChunksPerSegment { backward, .. } => fixed_split(dims.chunks(), backward),
    };
    (p.segments, p.seg_chunks) = (segs as i32, seg_chunks as i32);
    let part_bc = buffer(&[channel_tiles, b, t, 2, n], Kind::Float, u)?;
    let part_a = buffer(&[segs, b, d, n], Kind::Float, u)?;
    let part_dd = buffer(&[segs, b, 2, d], Kind::Float, u)?;
    // Adjoints carried between chunks when a block walks the states in several passes (N > 16).
    let work = (padded_states(n) > backward_pass_states(n))
        .then(|| buffer(&[segs, b, d, n], Kind::Float, u))
        .transpose()?;
    (p.part_bc, p.part_a, p.part_dd) = (ptr(&part_bc), ptr(&part_a), ptr(&part_dd));
    p.work = opt_ptr(work.as_ref());

    let threads = backward_threads(n);
    let sp = backward_pass_states(n);
    let mut workspace = Vec::new();
    if segs > 1 {
        let seg = buffer(&[segs, b, d, n], Kind::Float, u)?;
        let dsum = buffer(&[segs, b, d], Kind::Float, u)?;
        (p.seg, p.dsum) = (ptr(&seg), ptr(&dsum));
        workspace.extend([seg, dsum]);
        let adjoints = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_bwd_dh")?;
        let smem = (4 * (CHUNK_LEN * (192 + sp) + 16 * threads as i64)) as u32;
        launch!(adjoints, (channel_tiles, b, segs - 1), threads, smem; p)?;
        p.reverse = CARRY_BACKWARD;
        let carry = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_carry")?;
        launch!(carry, (tiles(b * d * n, FLAT_THREADS as i64), 1, 1), FLAT_THREADS, 0; p)?;
    }
    let bwd = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_bwd")?;
    let smem = (4 * (CHUNK_LEN * (320 + 2 * sp) + 112 * threads as i64)) as u32;
    launch!(bwd, (channel_tiles, b, segs), threads, smem; p)?;
    let reduce_bc = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_reduce_bc")?;
    let flat = FLAT_THREADS as i64;
    launch!(reduce_bc, (tiles(2 * b * t * n, flat), 1, 1), FLAT_THREADS, 0; p)?;
    let reduce_params = dev.kernel(&SELECTIVE_SCAN, dt, "selective_scan_reduce_params")?;
    launch!(reduce_params, (tiles(d * n + 2 * d, flat), 1, 1), FLAT_THREADS, 0; p)?;
    Ok(Backward {
        du,
        ddelta,
        da,
        db,
        dc,
        dd,
        dz,
        dbias,
        dh0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_only_where_the_grid_does_not_fill_the_gpu() {
        // 8 x 2048 x 2048 x 16 on 132 SMs: 512 forward blocks, one segment of all 64 chunks.
        assert_eq!(segment_split(64, 512, 132), (1, 64));
        // 1 x 16384 x 2048: 64 blocks want ceil(264 / 64) = 5 segments of ceil(512 / 5) chunks.
        assert_eq!(segment_split(512, 64, 132), (5, 103));
        // 32 backward blocks: 9 segments of 57 chunks (the last has 56).
        assert_eq!(segment_split(512, 32, 132), (9, 57));
        // Never more segments than chunks; a split that leaves no chunk for a last segment
        // comes out with fewer segments.
        assert_eq!(segment_split(3, 1, 132), (3, 1));
        assert_eq!(segment_split(10, 2, 132), (10, 1));
        assert_eq!(per_segment(10, 4), (4, 3));
        assert_eq!(per_segment(9, 4), (3, 3));
        assert_eq!(per_segment(1, 1), (1, 1));
        // Fixed splits: the last segment takes what is left; huge counts mean one segment.
        assert_eq!(fixed_split(10, 3), (4, 3));
        assert_eq!(fixed_split(10, i64::MAX), (1, 10));
        assert_eq!(fixed_split(10, 0), (10, 1));
    }

    #[test]
    fn block_geometry_follows_the_state_size() {
        // Forward: max(128, 8 lanes) threads, threads / lanes channels (NP = N up to a power of
        // two >= 4, 4 states per lane).
        assert_eq!(forward_block(1), (128, 128));
        assert_eq!(forward_block(16), (128, 32));
        assert_eq!(forward_block(17), (128, 16));
        assert_eq!(forward_block(256), (512, 8));
        // Backward: 32 channel pairs x min(lanes, 4), 16 states per pass at most.
        assert_eq!((backward_threads(4), backward_pass_states(4)), (32, 4));
        assert_eq!((backward_threads(16), backward_pass_states(16)), (128, 16));
        assert_eq!(
            (backward_threads(256), backward_pass_states(256)),
            (128, 16)
        );
        assert_eq!(padded_states(100), 128);
    }

    /// The field names of `ScanParams` in declaration order, from its Debug form.
    fn rust_fields() -> Vec<String> {
        let text = format!("{:?}", ScanParams::default());
        let (_, body) = text.split_once('{').unwrap();
        let (mut depth, mut token, mut names) = (0, String::new(), Vec::new());
        for ch in body.chars() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ':' if depth == 0 => names.push(std::mem::take(&mut token).trim().to_string()),
                ',' if depth == 0 => token.clear(),
                _ if depth == 0 => token.push(ch),
                _ => {}
            }
        }
        names
    }

    /// The field names of the kernels' `ScanParams`, lower-cased, in declaration order.
    fn kernel_fields() -> Vec<String> {
        let (_, rest) = SELECTIVE_SCAN
            .embedded
            .split_once("struct ScanParams {")
            .unwrap();
        let (body, _) = rest.split_once("};").unwrap();
        body.lines()
            .filter_map(|l| l.split("//").next().unwrap().trim().strip_suffix(';'))
            .flat_map(|decl| {
                let decl = decl.trim_start_matches("const ");
                let (_, names) = decl.split_once(' ').unwrap();
                names
                    .split(',')
                    .map(|n| n.trim().trim_start_matches('*').to_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn params_match_the_kernel_struct() {
        // Same fields in the same order (the kernel's names lower-cased: Bm -> bm, dhT -> dht);
        // the kernel source static_asserts the same 488 bytes.
        let kernel = kernel_fields();
        assert_eq!(kernel.len(), 13 + 18 + 8, "{kernel:?}");
        assert_eq!(rust_fields(), kernel);
        assert!(SELECTIVE_SCAN
            .embedded
            .contains("sizeof(ScanParams) == 13 * 24 + 18 * 8 + 8 * 4"));
        assert_eq!(std::mem::size_of::<ScanParams>(), 488);
    }

    #[test]
    fn every_entry_point_is_its_own_program() {
        for (i, name) in SELECTIVE_SCAN.kernels.iter().enumerate() {
            let guard = format!("#if WANT_KERNEL({i})\n");
            let section = SELECTIVE_SCAN
                .embedded
                .split_once(&guard)
                .and_then(|(_, rest)| rest.split_once("#endif"))
                .map(|(section, _)| section)
                .unwrap_or_else(|| panic!("{name}: no {guard}"));
            assert!(section.contains(&format!("ENTRY({name})(")), "{name}");
        }
    }

    #[test]
    fn row_layouts_the_kernels_read_in_place() {
        let x = Tensor::zeros([2, 5, 12], (Kind::Float, tch::Device::Cpu));
        assert!(row_major(&x));
        assert!(row_major(&x.narrow(2, 3, 4)), "a column slice");
        assert!(!row_major(&x.transpose(1, 2)), "channel-major");
        assert!(
            row_major(&x.narrow(1, 0, 1).transpose(1, 2)),
            "one column, whatever its stride"
        );
        let rows = Rows::of(&x.narrow(2, 3, 4));
        assert_eq!((rows.sb, rows.st), (60, 12));
    }

    #[test]
    fn cpu_tensors_are_refused_by_the_launchers() {
        let t = Tensor::zeros([1, 2, 4], (Kind::Float, tch::Device::Cpu));
        let a = Tensor::zeros([4, 2], (Kind::Float, tch::Device::Cpu));
        let x = ScanInputs {
            u: &t,
            delta: &t,
            a: &a,
            b: &t.narrow(2, 0, 2),
            c: &t.narrow(2, 0, 2),
            d: None,
            z: None,
            delta_bias: None,
            initial_state: None,
            resets: None,
        };
        let err = forward(&x, true, Segments::Auto, true).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }
}
