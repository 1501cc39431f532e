//! Launchers of the GLA kernels of `kernels/gla.cu` (every mode in fp32, `fused_chunk` and
//! `fused_recurrent` in every dtype) over tch tensors; the bf16/fp16 `chunk` mode runs
//! `kernels/gla_tc.cu` (`tensor_core.rs`).
//!
//! Inputs are validated and contiguous ([`super::gla`] sees to it): q, k `[B, T, H, K]` and v
//! `[B, T, H, V]` of one dtype (f32, bf16 or f16), g `[B, T, H, K]` f32, states `[B, H, K, V]`
//! f32, all on one CUDA device. The gla.cu kernels write fp32 partial sums over K- or V-tiles
//! (`[tiles, ...]`), summed here.

use glatrain_config::GlaMode;
use glatrain_cuda::{launch, Gpu, KernelDtype, KernelSource};
use tch::{Kind, Tensor};

use crate::launch::{buffer, device_of, kernel_dtype_of, opt_ptr, ptr, tiles};
use crate::OpError;

use super::tensor_core;

/// `kernels/gla.cu`: every mode (the only source for fp32 inputs). Entry points in the order of
/// their `KERNEL_INDEX`.
pub static GLA: KernelSource = KernelSource {
    file: "gla.cu",
    embedded: include_str!("../../../../kernels/gla.cu"),
    kernels: &[
        "gla_recurrent_fwd",
        "gla_recurrent_bwd",
        "gla_chunk_fwd",
        "gla_chunk_bwd",
        "gla_chunk_states",
        "gla_dg",
    ],
    dtypes: &KernelDtype::ALL,
};

/// `kernels/gla_tc.cu`: the `chunk` mode on bf16/fp16 tensor cores.
pub static GLA_TC: KernelSource = KernelSource {
    file: "gla_tc.cu",
    embedded: include_str!("../../../../kernels/gla_tc.cu"),
    kernels: &[
        "gla_tc_states",
        "gla_tc_attn",
        "gla_tc_fwd_o",
        "gla_tc_bwd_dv",
        "gla_tc_bwd_dqk",
        "gla_tc_carry",
        "gla_tc_fixup",
        "gla_tc_walk_o",
        "gla_tc_walk_dv",
        "gla_tc_walk_o_wide",
        "gla_tc_walk_dv_wide",
    ],
    dtypes: &[KernelDtype::Bf16, KernelDtype::F16],
};

/// Every GLA kernel source (for the compile-everything check).
pub static SOURCES: [&KernelSource; 2] = [&GLA, &GLA_TC];

/// The launch geometry the GLA kernels use, for whoever plans around them (the preflight's
/// padding, memory and launch counts) instead of restating it.
pub mod geometry {
    /// Tokens per chunk of the `chunk` mode: one `K x V` state is stored per chunk (`LC` in
    /// gla.cu, `TC_C` in gla_tc.cu).
    pub const CHUNK_LEN: i64 = 64;
    /// State tile of one `chunk` / `fused_chunk` block (`BK x BV` in gla.cu, `TC_T` in
    /// gla_tc.cu): grids are `ceil(K / 64) * ceil(V / 64) * B * H` blocks (times chunks for the
    /// parallel passes).
    pub const CHUNK_TILE: i64 = 64;
    /// State tile of one `fused_recurrent` block (`R_ROWS x R_COLS` in gla.cu).
    pub const RECURRENT_TILE: i64 = 32;
    /// Head dims are padded to a multiple of this: the k-side of a bf16 tensor-core
    /// `mma.m16n8k16` (Triton's `tl.dot` asserts on smaller tiles; the kernels pad).
    pub const PAD_MULTIPLE: i64 = 16;
    /// Kernel launches per forward+backward of fp32 `chunk` (gla.cu): state pass + outputs;
    /// state adjoint pass + gradients; gate gradient; the launcher's reductions of tile partials.
    pub const CHUNK_LAUNCHES: u32 = 7;
    /// bf16/fp16 `chunk` (gla_tc.cu): forward state walk, A, outputs; backward adjoint walk, dv,
    /// dq/dk/dg. Every kernel writes whole results: no reductions of tile partials.
    pub const TENSOR_CORE_CHUNK_LAUNCHES: u32 = 6;
    /// `fused_chunk`: one forward walk, one backward walk, gate gradient, reductions.
    pub const FUSED_CHUNK_LAUNCHES: u32 = 5;
    /// `fused_recurrent`: as `fused_chunk`.
    pub const FUSED_RECURRENT_LAUNCHES: u32 = 5;
}

use geometry::{CHUNK_LEN, CHUNK_TILE, RECURRENT_TILE};

/// Threads per block of the gla.cu kernels.
const THREADS: u32 = 256;
/// Dynamic shared memory of `gla_chunk_fwd` / `gla_chunk_bwd` (sizeof(Tiles) / sizeof(TilesBwd);
/// the kernel source static_asserts these values and traps if given less).
const CHUNK_FWD_SMEM: u32 = 45_824;
const CHUNK_BWD_SMEM: u32 = 51_200;
/// Channels per block of the gate-gradient kernel.
const DG_CHANNELS: i64 = 32;

/// Flag bits of `gla_chunk_fwd` / `gla_chunk_bwd`: the values `kernels/common.cuh` defines under
/// the same names (a test reads them from there).
mod flags {
    pub const FWD_OUTPUTS: i32 = 1;
    pub const FWD_PARALLEL: i32 = 4;
    pub const BWD_DQ: i32 = 1;
    pub const BWD_DKDV: i32 = 2;
    pub const BWD_PARALLEL: i32 = 4;
}

/// `reverse` argument of `gla_chunk_states`.
const STATES_FORWARD: i32 = 0;
const STATES_REVERSE: i32 = 1;

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub b: i64,
    pub t: i64,
    pub h: i64,
    pub k: i64,
    pub v: i64,
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

    pub fn chunks(&self) -> i64 {
        tiles(self.t, CHUNK_LEN)
    }

    /// The sizes as the kernels' 32-bit `int` arguments (B, T, H, K, V), or an error naming the
    /// size past that range.
    pub fn as_i32(&self) -> Result<(i32, i32, i32, i32, i32), OpError> {
        let int = |name: &str, n: i64| {
            i32::try_from(n).map_err(|_| {
                OpError::Cuda(glatrain_cuda::CudaError::Limit {
                    kernel: "gla".to_string(),
                    what: format!("{name} = {n} is past the kernels' 32-bit sizes (2^31 - 1)"),
                })
            })
        };
        Ok((
            int("B", self.b)?,
            int("T", self.t)?,
            int("H", self.h)?,
            int("K", self.k)?,
            int("V", self.v)?,
        ))
    }
}

/// Sums partial results over their leading tile axis (fp32) and casts to `kind`.
fn reduce_parts(parts: Tensor, kind: Kind) -> Result<Tensor, OpError> {
    let full = if parts.size()[0] == 1 {
        parts.f_squeeze_dim(0)?
    } else {
        parts.f_sum_dim_intlist(0, false, Kind::Float)?
    };
    Ok(full.f_to_kind(kind)?)
}

fn reference_has_no_kernels() -> OpError {
    OpError::Autograd("gla: the reference mode has no CUDA kernels".into())
}

/// The kernel source `mode` runs from for inputs of `dt`: the bf16/fp16 `chunk` mode on tensor
/// cores (`gla_tc.cu`), everything else in `gla.cu`.
pub fn source_of(mode: GlaMode, dt: KernelDtype) -> &'static KernelSource {
    if mode == GlaMode::Chunk && dt != KernelDtype::F32 {
        &GLA_TC
    } else {
        &GLA
    }
}

/// Compiles (or reads from the disk cache) and loads the kernels `mode` runs for inputs of `dt`
/// on CUDA device `ordinal`, so that their first call does not wait for NVRTC; with
/// `optimised`, also waits for the Full tier.
pub fn prepare(
    ordinal: usize,
    dt: KernelDtype,
    mode: GlaMode,
    optimised: bool,
) -> Result<(), glatrain_cuda::CudaError> {
    let (dev, source) = (Gpu::get(ordinal)?, source_of(mode, dt));
    if optimised {
        dev.prepare_final(source, dt)
    } else {
        dev.prepare(source, dt)
    }
}

/// Outputs of [`forward`].
#[derive(Debug)]
pub struct Forward {
    /// `[B, T, H, V]` in the input dtype.
    pub o: Tensor,
    /// `[B, H, K, V]` f32.
    pub final_state: Tensor,
    /// What the mode keeps for [`backward`] (the bf16/fp16 `chunk` mode: its chunk states, A,
    /// gate-scaled q and k and chunk decays, so the backward need not compute them again).
    pub saved: Option<Tensor>,
}

/// The inputs of one GLA call.
///
/// # Shapes
/// q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g: `[B, T, H, K]` f32; h0: `[B, H, K, V]` f32.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub h0: Option<&'a Tensor>,
}

/// GLA forward.
pub fn forward(x: &Inputs, scale: f64, mode: GlaMode) -> Result<Forward, OpError> {
    let Inputs { q, k, v, g, h0 } = *x;
    let d = Dims::of(q, v);
    if d.is_empty() {
        let final_state = match h0 {
            Some(h) => h.f_detach_copy()?,
            None => Tensor::f_zeros([d.b, d.h, d.k, d.v], (Kind::Float, q.device()))?,
        };
        return Ok(Forward {
            o: Tensor::f_zeros([d.b, d.t, d.h, d.v], (v.kind(), v.device()))?,
            final_state,
            saved: None,
        });
    }
    let dev = device_of(q)?;
    let dt = kernel_dtype_of("gla", "q", q)?;
    if source_of(mode, dt) == &GLA_TC {
        return tensor_core::forward(&dev, dt, d, x, scale);
    }
    let (bb, tt, hh, kk, vv) = d.as_i32()?;
    let sc = scale as f32;
    let (qp, kp, vp, gp, h0p) = (ptr(q), ptr(k), ptr(v), ptr(g), opt_ptr(h0));
    let bh = d.b * d.h;
    let ht = buffer(&[d.b, d.h, d.k, d.v], Kind::Float, q)?;
    let htp = ptr(&ht);
    let o_part = match mode {
        GlaMode::FusedRecurrent => {
            let (nv, nk) = (tiles(d.v, RECURRENT_TILE), tiles(d.k, RECURRENT_TILE));
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], Kind::Float, q)?;
            let op = ptr(&o_part);
            let f = dev.kernel(&GLA, dt, "gla_recurrent_fwd")?;
            launch!(f, (bh, nv, nk), THREADS, 0;
                qp, kp, vp, gp, h0p, op, htp, bb, tt, hh, kk, vv, sc)?;
            o_part
        }
        GlaMode::FusedChunk => {
            let (nv, nk) = (tiles(d.v, CHUNK_TILE), tiles(d.k, CHUNK_TILE));
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], Kind::Float, q)?;
            let (op, hsp, fl) = (ptr(&o_part), 0u64, flags::FWD_OUTPUTS);
            let f = dev.kernel(&GLA, dt, "gla_chunk_fwd")?;
            launch!(f, (bh, nv, nk), THREADS, CHUNK_FWD_SMEM;
                qp, kp, vp, gp, h0p, hsp, op, htp, bb, tt, hh, kk, vv, sc, fl)?;
            o_part
        }
        GlaMode::Chunk => {
            let (nv, nk, nc) = (tiles(d.v, CHUNK_TILE), tiles(d.k, CHUNK_TILE), d.chunks());
            let hs = buffer(&[d.b, d.h, nc, d.k, d.v], Kind::Float, q)?;
            let o_part = buffer(&[nk, d.b, d.t, d.h, d.v], Kind::Float, q)?;
            let (hsp, op, nullp) = (ptr(&hs), ptr(&o_part), 0u64);
            let states = dev.kernel(&GLA, dt, "gla_chunk_states")?;
            let (one, dir) = (1f32, STATES_FORWARD);
            launch!(states, (bh, nv, nk), THREADS, 0;
                kp, vp, gp, h0p, hsp, htp, bb, tt, hh, kk, vv, one, dir)?;
            let f = dev.kernel(&GLA, dt, "gla_chunk_fwd")?;
            let fl = flags::FWD_OUTPUTS | flags::FWD_PARALLEL;
            launch!(f, (bh * nc, nv, nk), THREADS, CHUNK_FWD_SMEM;
                qp, kp, vp, gp, h0p, hsp, op, nullp, bb, tt, hh, kk, vv, sc, fl)?;
            o_part
        }
        GlaMode::Reference => return Err(reference_has_no_kernels()),
    };
    Ok(Forward {
        o: reduce_parts(o_part, v.kind())?,
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

/// The inputs of [`backward`].
#[derive(Debug)]
pub struct BackwardInputs<'a> {
    /// The forward's inputs.
    pub x: Inputs<'a>,
    /// The forward's final state.
    pub final_state: &'a Tensor,
    /// [`Forward::saved`] of the same inputs.
    pub saved: Option<&'a Tensor>,
    pub d_o: &'a Tensor,
    /// The gradient of the final state, when the final state was used.
    pub dht: Option<&'a Tensor>,
}

/// GLA backward: gradients of every input from `d_o` (and `dht`).
///
/// # Shapes
/// As [`forward`]; `final_state`, `dht`: `[B, H, K, V]` f32; `d_o`: `[B, T, H, V]` in v's dtype.
pub fn backward(inputs: &BackwardInputs, scale: f64, mode: GlaMode) -> Result<Backward, OpError> {
    let BackwardInputs {
        x: Inputs { q, k, v, g, h0 },
        final_state,
        saved: _,
        d_o,
        dht,
    } = *inputs;
    let d = Dims::of(q, v);
    if d.is_empty() {
        let dh0 = match (h0, dht) {
            (None, _) => None,
            (Some(_), Some(x)) => Some(x.f_detach_copy()?),
            (Some(_), None) => Some(Tensor::f_zeros(
                [d.b, d.h, d.k, d.v],
                (Kind::Float, q.device()),
            )?),
        };
        return Ok(Backward {
            dq: q.f_zeros_like()?,
            dk: k.f_zeros_like()?,
            dv: v.f_zeros_like()?,
            dg: g.f_zeros_like()?,
            dh0,
        });
    }
    let dev = device_of(q)?;
    let dt = kernel_dtype_of("gla", "q", q)?;
    if source_of(mode, dt) == &GLA_TC {
        return tensor_core::backward(&dev, dt, d, inputs, scale);
    }
    // The final-state term of the gate gradient: sum over V of S_T * dS_T, on every token.
    let fterm = dht
        .map(|x| {
            final_state
                .f_mul(x)?
                .f_sum_dim_intlist(-1, false, Kind::Float)
        })
        .transpose()?;
    let (bb, tt, hh, kk, vv) = d.as_i32()?;
    let sc = scale as f32;
    let (qp, kp, vp, gp, h0p) = (ptr(q), ptr(k), ptr(v), ptr(g), opt_ptr(h0));
    let (dop, dhtp) = (ptr(d_o), opt_ptr(dht));
    let bh = d.b * d.h;
    let dh0 = h0.map(|h| buffer(&h.size(), Kind::Float, q)).transpose()?;
    let dh0p = opt_ptr(dh0.as_ref());
    let nullp = 0u64;
    let tile = match mode {
        GlaMode::FusedRecurrent => RECURRENT_TILE,
        GlaMode::FusedChunk | GlaMode::Chunk => CHUNK_TILE,
        GlaMode::Reference => return Err(reference_has_no_kernels()),
    };
    let (nv, nk) = (tiles(d.v, tile), tiles(d.k, tile));
    let dq_part = buffer(&[nv, d.b, d.t, d.h, d.k], Kind::Float, q)?;
    let dk_part = buffer(&[nv, d.b, d.t, d.h, d.k], Kind::Float, q)?;
    let dv_part = buffer(&[nk, d.b, d.t, d.h, d.v], Kind::Float, q)?;
    let (dqp, dkp, dvp) = (ptr(&dq_part), ptr(&dk_part), ptr(&dv_part));
    match mode {
        GlaMode::FusedRecurrent => {
            let f = dev.kernel(&GLA, dt, "gla_recurrent_bwd")?;
            launch!(f, (bh, nv, nk), THREADS, 0;
                qp, kp, vp, gp, h0p, dop, dhtp, dqp, dkp, dvp, dh0p, bb, tt, hh, kk, vv, sc)?;
        }
        GlaMode::FusedChunk => {
            let f = dev.kernel(&GLA, dt, "gla_chunk_bwd")?;
            let fl = flags::BWD_DQ | flags::BWD_DKDV;
            launch!(f, (bh, nv, nk), THREADS, CHUNK_BWD_SMEM;
                qp, kp, vp, gp, h0p, dop, dhtp, nullp, nullp, dqp, dkp, dvp, dh0p,
                bb, tt, hh, kk, vv, sc, fl)?;
        }
        GlaMode::Chunk => {
            let nc = d.chunks();
            let hs = buffer(&[d.b, d.h, nc, d.k, d.v], Kind::Float, q)?;
            let dhs = buffer(&[d.b, d.h, nc, d.k, d.v], Kind::Float, q)?;
            let (hsp, dhsp) = (ptr(&hs), ptr(&dhs));
            let states = dev.kernel(&GLA, dt, "gla_chunk_states")?;
            let (one, dir) = (1f32, STATES_FORWARD);
            launch!(states, (bh, nv, nk), THREADS, 0;
                kp, vp, gp, h0p, hsp, nullp, bb, tt, hh, kk, vv, one, dir)?;
            let dir = STATES_REVERSE;
            launch!(states, (bh, nv, nk), THREADS, 0;
                qp, dop, gp, dhtp, dhsp, dh0p, bb, tt, hh, kk, vv, sc, dir)?;
            let f = dev.kernel(&GLA, dt, "gla_chunk_bwd")?;
            let fl = flags::BWD_DQ | flags::BWD_DKDV | flags::BWD_PARALLEL;
            launch!(f, (bh * nc, nv, nk), THREADS, CHUNK_BWD_SMEM;
                qp, kp, vp, gp, h0p, dop, dhtp, hsp, dhsp, dqp, dkp, dvp, nullp,
                bb, tt, hh, kk, vv, sc, fl)?;
        }
        GlaMode::Reference => return Err(reference_has_no_kernels()),
    }
    let dq = reduce_parts(dq_part, Kind::Float)?;
    let dk = reduce_parts(dk_part, Kind::Float)?;
    let dv = reduce_parts(dv_part, v.kind())?;
    let dg = buffer(&[d.b, d.t, d.h, d.k], Kind::Float, q)?;
    let (dqf, dkf, fp, dgp) = (ptr(&dq), ptr(&dk), opt_ptr(fterm.as_ref()), ptr(&dg));
    let f = dev.kernel(&GLA, dt, "gla_dg")?;
    launch!(f, (bh, tiles(d.k, DG_CHANNELS), 1), THREADS, 0;
        qp, kp, dqf, dkf, fp, dgp, bb, tt, hh, kk)?;
    Ok(Backward {
        dq: dq.f_to_kind(q.kind())?,
        dk: dk.f_to_kind(k.kind())?,
        dv,
        dg,
        dh0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let full = reduce_parts(parts, Kind::Double).unwrap();
        assert_eq!(full.kind(), Kind::Double);
        assert_eq!(Vec::<f64>::try_from(&full).unwrap(), vec![11., 22., 33.]);
        let one = reduce_parts(
            Tensor::ones([1, 4], (Kind::Float, tch::Device::Cpu)),
            Kind::Float,
        )
        .unwrap();
        assert_eq!(one.size(), vec![4]);
    }

    #[test]
    fn flags_match_the_kernels_prelude() {
        let prelude = glatrain_cuda::PRELUDE.embedded;
        for (name, value) in [
            ("GLA_FWD_OUTPUTS", flags::FWD_OUTPUTS),
            ("GLA_FWD_PARALLEL", flags::FWD_PARALLEL),
            ("GLA_BWD_DQ", flags::BWD_DQ),
            ("GLA_BWD_DKDV", flags::BWD_DKDV),
            ("GLA_BWD_PARALLEL", flags::BWD_PARALLEL),
        ] {
            let line = prelude
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("common.cuh defines no {name}"));
            let defined: i32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
            assert_eq!(defined, value, "{name}");
        }
    }

    #[test]
    fn every_entry_point_is_its_own_program() {
        for source in SOURCES {
            for (i, name) in source.kernels.iter().enumerate() {
                // Its index selects the section that defines the entry point.
                let guard = format!("#if WANT_KERNEL({i})\n");
                let section = source.embedded.split_once(&guard).map(|(_, rest)| rest);
                let section = section.and_then(|rest| rest.split_once("#endif"));
                let (section, _) = section.unwrap_or_else(|| panic!("{name}: no {guard}"));
                assert!(
                    section.contains(&format!("ENTRY({name})("))
                        || section.contains(&format!("WALK_ENTRY({name},")),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn cpu_tensors_are_refused_by_the_launchers() {
        let t = Tensor::zeros([1, 2, 1, 4], (Kind::Float, tch::Device::Cpu));
        let x = Inputs {
            q: &t,
            k: &t,
            v: &t,
            g: &t,
            h0: None,
        };
        let err = forward(&x, 1.0, GlaMode::Chunk).unwrap_err();
        assert!(err.to_string().contains("Cpu"), "{err}");
    }
}
