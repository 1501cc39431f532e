//! Launchers of the GLA kernels (`kernels/gla.cu`) over tch tensors.
//!
//! Inputs must already be validated and contiguous (the public entry point,
//! [`crate::gla::gla`], does that): q, k `[B, T, H, K]` and v `[B, T, H, V]` of one dtype (f32,
//! bf16 or f16), g `[B, T, H, K]` f32, states `[B, H, K, V]` f32, all on one CUDA device.
//! Kernels write fp32 partial sums over K- or V-tiles (`[tiles, ...]`), summed here.
//!
//! [`set_poison_outputs`] (or `GLATRAIN_POISON=1`) fills every kernel output buffer with NaN
//! before the launch, so tests see any element a kernel failed to write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tch::{Kind, Tensor};

use super::{CudaError, Device, KernelDtype, KernelSource};

/// The kernel schedule (see `kernels/gla.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Chunk states materialised every 64 tokens; outputs and gradients parallel over chunks.
    Chunk,
    /// One block walks the whole sequence with the state on chip.
    FusedChunk,
    /// Token by token with the state in registers.
    FusedRecurrent,
}

/// Threads per block of the `gla.cu` kernels.
const THREADS: u32 = 256;
/// State tile of the recurrent kernels (rows x columns).
const RECURRENT_TILE: i64 = 32;
/// State tile of the chunk kernels.
const CHUNK_TILE: i64 = 64;
/// Tokens per materialised chunk state (`LC` in the kernel).
const CHUNK_LEN: i64 = 64;
/// Dynamic shared memory of `gla_chunk_fwd` / `gla_chunk_bwd` (sizeof(Tiles) / sizeof(TilesBwd);
/// the kernel source static_asserts these values and traps if given less).
const CHUNK_FWD_SMEM: u32 = 45_824;
const CHUNK_BWD_SMEM: u32 = 51_200;
/// Channels per block of the gate-gradient kernel.
const DG_CHANNELS: i64 = 32;

/// Kernel flags of `gla_chunk_fwd` / `gla_chunk_bwd` (see the kernel source).
mod flags {
    pub const FWD_OUTPUTS: i32 = 1;
    pub const PARALLEL: i32 = 4;
    pub const BWD_DQ: i32 = 1;
    pub const BWD_DKDV: i32 = 2;
}

/// `reverse` argument of `gla_chunk_states`.
const STATES_FORWARD: i32 = 0;
const STATES_REVERSE: i32 = 1;

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: i64,
    t: i64,
    h: i64,
    k: i64,
    v: i64,
}

impl Dims {
    fn of(q: &Tensor, v: &Tensor) -> Self {
        let s = q.size();
        Dims {
            b: s[0],
            t: s[1],
            h: s[2],
            k: s[3],
            v: v.size()[3],
        }
    }

    fn is_empty(&self) -> bool {
        self.b == 0 || self.t == 0 || self.h == 0
    }

    fn chunks(&self) -> i64 {
        (self.t + CHUNK_LEN - 1) / CHUNK_LEN
    }
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Fill kernel output buffers with NaN before each launch (tests: unwritten elements show up).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

fn poison() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    POISON.load(Ordering::Relaxed)
        || *FROM_ENV.get_or_init(|| std::env::var("GLATRAIN_POISON").is_ok_and(|v| v == "1"))
}

/// An fp32 output buffer on `like`'s device (NaN-filled under `GLATRAIN_POISON=1`).
fn buffer(shape: &[i64], like: &Tensor) -> Tensor {
    buffer_of(shape, Kind::Float, like)
}

/// An output buffer of `kind` on `like`'s device (NaN-filled under `GLATRAIN_POISON=1`).
fn buffer_of(shape: &[i64], kind: Kind, like: &Tensor) -> Tensor {
    let opts = (kind, like.device());
    if poison() {
        Tensor::full(shape, f64::NAN, opts)
    } else {
        Tensor::empty(shape, opts)
    }
}

fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

fn opt_ptr(t: Option<&Tensor>) -> u64 {
    t.map_or(0, ptr)
}

fn tiles(n: i64, tile: i64) -> i64 {
    (n + tile - 1) / tile
}

/// Sums partial results over their leading tile axis (fp32) and casts to `kind`.
fn reduce_parts(parts: Tensor, kind: Kind) -> Tensor {
    let full = if parts.size()[0] == 1 {
        parts.squeeze_dim(0)
    } else {
        parts.sum_dim_intlist(0, false, Kind::Float)
    };
    full.to_kind(kind)
}

fn device_of(t: &Tensor) -> Result<std::sync::Arc<Device>, CudaError> {
    match t.device() {
        tch::Device::Cuda(i) => {
            let d = Device::get(i)?;
            d.bind()?;
            Ok(d)
        }
        other => Err(CudaError::Driver {
            what: "device selection".to_string(),
            message: format!("tensor is on {other:?}, not a CUDA device"),
        }),
    }
}

fn dtype_of(t: &Tensor) -> Result<KernelDtype, CudaError> {
    KernelDtype::of(t.kind()).ok_or_else(|| CudaError::Driver {
        what: "dtype selection".to_string(),
        message: format!("no GLA kernel for dtype {:?}", t.kind()),
    })
}

/// Launches `$f` on the device's default stream; arguments are locals (they must outlive the
/// launch call, which copies their values into the kernel's parameter buffer).
macro_rules! launch {
    ($dev:expr, $f:expr, $grid:expr; $($arg:ident),* $(,)?) => {
        launch!($dev, $f, $grid, 0; $($arg),*)
    };
    ($dev:expr, $f:expr, $grid:expr, $smem:expr; $($arg:ident),* $(,)?) => {
        launch!($dev, $f, $grid, $smem, THREADS; $($arg),*)
    };
    ($dev:expr, $f:expr, $grid:expr, $smem:expr, $threads:expr; $($arg:ident),* $(,)?) => {{
        let (gx, gy, gz): (i64, i64, i64) = $grid;
        let smem: u32 = $smem;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (gx as u32, gy as u32, gz as u32),
            block_dim: ($threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // `Device::function` allowed the kernel all the shared memory the GPU has.
        let f: &cudarc::driver::CudaFunction = &$f;
        let mut builder = $dev.stream().launch_builder(f);
        #[allow(unused_imports)]
        use cudarc::driver::PushKernelArg;
        $( builder.arg(&$arg); )*
        // SAFETY: the argument list matches the kernel's signature in kernels/gla.cu (pointers
        // as u64 device addresses of live, contiguous tensors of the stated shapes, then i32
        // sizes, f32 scale, i32 flags); the tensors outlive the launch because libtorch orders
        // their reuse after it on the same stream.
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| $crate::cuda::CudaError::driver("cuLaunchKernel", e))
    }};
}

/// The kernel source `schedule` runs from for inputs of `dt`: the bf16/fp16 `chunk` schedule on
/// tensor cores (`gla_tc.cu`), everything else in `gla.cu`.
pub fn source_of(schedule: Schedule, dt: KernelDtype) -> KernelSource {
    if schedule == Schedule::Chunk && dt != KernelDtype::F32 {
        KernelSource::GlaTensorCore
    } else {
        KernelSource::Gla
    }
}

/// Compiles (or reads from the disk cache) and loads the kernels `schedule` runs for inputs of
/// `kind` on CUDA device `ordinal`, so that their first call does not wait for NVRTC (kinds
/// without kernels: nothing to do); with `optimised`, also waits for the Full tier.
pub fn prepare(
    ordinal: usize,
    kind: Kind,
    schedule: Schedule,
    optimised: bool,
) -> Result<(), CudaError> {
    let Some(dt) = KernelDtype::of(kind) else {
        return Ok(());
    };
    let (dev, source) = (Device::get(ordinal)?, source_of(schedule, dt));
    if optimised {
        dev.prepare_final(source, dt)
    } else {
        dev.prepare(source, dt)
    }
}

// The bf16/fp16 `chunk` schedule (kernels/gla_tc.cu); after `launch!`, which it uses.
mod tensor_core;

/// Outputs of [`forward`].
#[derive(Debug)]
pub struct Forward {
    /// `[B, T, H, V]` in the input dtype.
    pub o: Tensor,
    /// `[B, H, K, V]` f32.
    pub final_state: Tensor,
    /// What the schedule keeps for [`backward`] (the bf16/fp16 `chunk` schedule: its chunk
    /// states, A, gate-scaled q and k and chunk decays, so the backward need not compute them
    /// again).
    pub saved: Option<Tensor>,
}

/// GLA forward.
///
/// # Shapes
/// q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g: `[B, T, H, K]` f32; h0: `[B, H, K, V]` f32.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: Option<&Tensor>,
    scale: f64,
    schedule: Schedule,
) -> Result<Forward, CudaError> {
    let d = Dims::of(q, v);
    if d.is_empty() {
        let final_state = match h0 {
            Some(h) => h.copy(),
            None => Tensor::zeros([d.b, d.h, d.k, d.v], (Kind::Float, q.device())),
        };
        return Ok(Forward {
            o: Tensor::zeros([d.b, d.t, d.h, d.v], (v.kind(), v.device())),
            final_state,
            saved: None,
        });
    }
    let dev = device_of(q)?;
    let dt = dtype_of(q)?;
    if source_of(schedule, dt) == KernelSource::GlaTensorCore {
        return tensor_core::forward(&dev, dt, d, q, k, v, g, h0, scale);
    }
    let (bb, tt, hh, kk, vv) = (d.b as i32, d.t as i32, d.h as i32, d.k as i32, d.v as i32);
    let sc = scale as f32;
    let (qp, kp, vp, gp, h0p) = (ptr(q), ptr(k), ptr(v), ptr(g), opt_ptr(h0));
    let bh = d.b * d.h;
    let ht = buffer(&[d.b, d.h, d.k, d.v], q);
    let htp = ptr(&ht);
    let o_part = match schedule {
        Schedule::FusedRecurrent => {
            let (nv, nk) = (tiles(d.v, RECURRENT_TILE), tiles(d.k, RECURRENT_TILE));
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], q);
            let op = ptr(&o_part);
            let f = dev.function(KernelSource::Gla, dt, "gla_recurrent_fwd")?;
            launch!(dev, f, (bh, nv, nk); qp, kp, vp, gp, h0p, op, htp, bb, tt, hh, kk, vv, sc)?;
            o_part
        }
        Schedule::FusedChunk => {
            let (nv, nk) = (tiles(d.v, CHUNK_TILE), tiles(d.k, CHUNK_TILE));
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], q);
            let (op, hsp, fl) = (ptr(&o_part), 0u64, flags::FWD_OUTPUTS);
            let f = dev.function(KernelSource::Gla, dt, "gla_chunk_fwd")?;
            launch!(dev, f, (bh, nv, nk), CHUNK_FWD_SMEM;
                qp, kp, vp, gp, h0p, hsp, op, htp, bb, tt, hh, kk, vv, sc, fl)?;
            o_part
        }
        Schedule::Chunk => {
            let (nv, nk, nc) = (tiles(d.v, CHUNK_TILE), tiles(d.k, CHUNK_TILE), d.chunks());
            let hs = buffer(&[d.b, d.h, nc, d.k, d.v], q);
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], q);
            let (hsp, op, nullp) = (ptr(&hs), ptr(&o_part), 0u64);
            let states = dev.function(KernelSource::Gla, dt, "gla_chunk_states")?;
            let (one, dir) = (1f32, STATES_FORWARD);
            launch!(dev, states, (bh, nv, nk);
                kp, vp, gp, h0p, hsp, htp, bb, tt, hh, kk, vv, one, dir)?;
            let f = dev.function(KernelSource::Gla, dt, "gla_chunk_fwd")?;
            let fl = flags::FWD_OUTPUTS | flags::PARALLEL;
            launch!(dev, f, (bh * nc, nv, nk), CHUNK_FWD_SMEM;
                qp, kp, vp, gp, h0p, hsp, op, nullp, bb, tt, hh, kk, vv, sc, fl)?;
            o_part
        }
    };
    Ok(Forward {
        o: reduce_parts(o_part, v.kind()),
        final_state: ht,
        saved: None,
    })
}

/// Gradients from [`backward`].
#[derive(Debug)]
pub struct Backward {
    /// `[B, T, H, K]` in q's dtype.
    pub dq: Tensor,
    /// `[B, T, H, K]` in k's dtype.
    pub dk: Tensor,
    /// `[B, T, H, V]` in v's dtype.
    pub dv: Tensor,
    /// `[B, T, H, K]` f32.
    pub dg: Tensor,
    /// `[B, H, K, V]` f32, when an initial state was given.
    pub dh0: Option<Tensor>,
}

/// GLA backward: gradients of every input from `d_o` (and `dht`, the gradient of the final
/// state, when the final state was used).
///
/// # Shapes
/// As [`forward`]; `final_state`, `dht`: `[B, H, K, V]` f32; `d_o`: `[B, T, H, V]` in v's dtype;
/// `saved`: [`Forward::saved`] of the same inputs.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: Option<&Tensor>,
    final_state: &Tensor,
    saved: Option<&Tensor>,
    d_o: &Tensor,
    dht: Option<&Tensor>,
    scale: f64,
    schedule: Schedule,
) -> Result<Backward, CudaError> {
    let d = Dims::of(q, v);
    if d.is_empty() {
        return Ok(Backward {
            dq: q.zeros_like(),
            dk: k.zeros_like(),
            dv: v.zeros_like(),
            dg: g.zeros_like(),
            dh0: h0.map(|_| match dht {
                Some(x) => x.copy(),
                None => Tensor::zeros([d.b, d.h, d.k, d.v], (Kind::Float, q.device())),
            }),
        });
    }
    let dev = device_of(q)?;
    let dt = dtype_of(q)?;
    if source_of(schedule, dt) == KernelSource::GlaTensorCore {
        let inputs = tensor_core::BackwardInputs {
            q,
            k,
            v,
            g,
            h0,
            saved,
            d_o,
            dht,
        };
        return tensor_core::backward(&dev, dt, d, inputs, scale);
    }
    // The final-state term of the gate gradient: sum over V of S_T * dS_T, on every token.
    let fterm = dht.map(|x| (final_state * x).sum_dim_intlist(-1, false, Kind::Float));
    let (bb, tt, hh, kk, vv) = (d.b as i32, d.t as i32, d.h as i32, d.k as i32, d.v as i32);
    let sc = scale as f32;
    let (qp, kp, vp, gp, h0p) = (ptr(q), ptr(k), ptr(v), ptr(g), opt_ptr(h0));
    let (dop, dhtp) = (ptr(d_o), opt_ptr(dht));
    let bh = d.b * d.h;
    let dh0 = h0.map(|h| buffer(&h.size(), q));
    let dh0p = opt_ptr(dh0.as_ref());
    let nullp = 0u64;
    let tile = match schedule {
        Schedule::FusedRecurrent => RECURRENT_TILE,
        Schedule::FusedChunk | Schedule::Chunk => CHUNK_TILE,
    };
    let (nv, nk) = (tiles(d.v, tile), tiles(d.k, tile));
    let dq_part = buffer(&[nv, d.b, d.t, d.h, d.k], q);
    let dk_part = buffer(&[nv, d.b, d.t, d.h, d.k], q);
    let dv_part = buffer(&[nk, d.b, d.t, d.h, d.v], q);
    let (dqp, dkp, dvp) = (ptr(&dq_part), ptr(&dk_part), ptr(&dv_part));
    match schedule {
        Schedule::FusedRecurrent => {
            let f = dev.function(KernelSource::Gla, dt, "gla_recurrent_bwd")?;
            launch!(dev, f, (bh, nv, nk);
                qp, kp, vp, gp, h0p, dop, dhtp, dqp, dkp, dvp, dh0p, bb, tt, hh, kk, vv, sc)?;
        }
        Schedule::FusedChunk => {
            let f = dev.function(KernelSource::Gla, dt, "gla_chunk_bwd")?;
            let fl = flags::BWD_DQ | flags::BWD_DKDV;
            launch!(dev, f, (bh, nv, nk), CHUNK_BWD_SMEM;
                qp, kp, vp, gp, h0p, dop, dhtp, nullp, nullp, dqp, dkp, dvp, dh0p,
                bb, tt, hh, kk, vv, sc, fl)?;
        }
        Schedule::Chunk => {
            let nc = d.chunks();
            let hs = buffer(&[d.b, d.h, nc, d.k, d.v], q);
            let dhs = buffer(&[d.b, d.h, nc, d.k, d.v], q);
            let (hsp, dhsp) = (ptr(&hs), ptr(&dhs));
            let states = dev.function(KernelSource::Gla, dt, "gla_chunk_states")?;
            let (one, dir) = (1f32, STATES_FORWARD);
            launch!(dev, states, (bh, nv, nk);
                kp, vp, gp, h0p, hsp, nullp, bb, tt, hh, kk, vv, one, dir)?;
            let dir = STATES_REVERSE;
            launch!(dev, states, (bh, nv, nk);
                qp, dop, gp, dhtp, dhsp, dh0p, bb, tt, hh, kk, vv, sc, dir)?;
            let f = dev.function(KernelSource::Gla, dt, "gla_chunk_bwd")?;
            let fl = flags::BWD_DQ | flags::BWD_DKDV | flags::PARALLEL;
            launch!(dev, f, (bh * nc, nv, nk), CHUNK_BWD_SMEM;
                qp, kp, vp, gp, h0p, dop, dhtp, hsp, dhsp, dqp, dkp, dvp, nullp,
                bb, tt, hh, kk, vv, sc, fl)?;
        }
    }
    let dq = reduce_parts(dq_part, Kind::Float);
    let dk = reduce_parts(dk_part, Kind::Float);
    let dv = reduce_parts(dv_part, v.kind());
    let dg = buffer(&[d.b, d.t, d.h, d.k], q);
    let (dqf, dkf, fp, dgp) = (ptr(&dq), ptr(&dk), opt_ptr(fterm.as_ref()), ptr(&dg));
    let f = dev.function(KernelSource::Gla, dt, "gla_dg")?;
    launch!(dev, f, (bh, tiles(d.k, DG_CHANNELS), 1); qp, kp, dqf, dkf, fp, dgp, bb, tt, hh, kk)?;
    Ok(Backward {
        dq: dq.to_kind(q.kind()),
        dk: dk.to_kind(k.kind()),
        dv,
        dg,
        dh0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_round_up() {
        assert_eq!(tiles(1, CHUNK_TILE), 1);
        assert_eq!(tiles(64, CHUNK_TILE), 1);
        assert_eq!(tiles(65, CHUNK_TILE), 2);
        assert_eq!(tiles(1024, RECURRENT_TILE), 32);
    }

    #[test]
    fn chunk_count_covers_the_sequence() {
        let q = Tensor::zeros([2, 129, 3, 8], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::zeros([2, 129, 3, 5], (Kind::Float, tch::Device::Cpu));
        let d = Dims::of(&q, &v);
        assert_eq!((d.b, d.t, d.h, d.k, d.v), (2, 129, 3, 8, 5));
        assert_eq!(d.chunks(), 3);
        assert!(!d.is_empty());
    }

    #[test]
    fn partial_sums_reduce_over_the_tile_axis() {
        let parts = Tensor::from_slice(&[1f32, 2., 3., 10., 20., 30.]).reshape([2, 3]);
        let full = reduce_parts(parts, Kind::Double);
        assert_eq!(full.kind(), Kind::Double);
        assert_eq!(Vec::<f64>::try_from(&full).unwrap(), vec![11., 22., 33.]);
        let one = reduce_parts(
            Tensor::ones([1, 4], (Kind::Float, tch::Device::Cpu)),
            Kind::Float,
        );
        assert_eq!(one.size(), vec![4]);
    }

    #[test]
    fn poisoned_buffers_are_nan() {
        let like = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        set_poison_outputs(true);
        let b = buffer(&[3, 2], &like);
        set_poison_outputs(false);
        assert_eq!(b.size(), vec![3, 2]);
        assert!(b.isnan().all().int64_value(&[]) == 1);
    }

    #[test]
    fn cpu_tensors_are_refused_by_the_launchers() {
        let t = Tensor::zeros([1, 2, 1, 4], (Kind::Float, tch::Device::Cpu));
        let err = forward(&t, &t, &t, &t, None, 1.0, Schedule::Chunk).unwrap_err();
        assert!(err.to_string().contains("not a CUDA device"), "{err}");
    }
}
