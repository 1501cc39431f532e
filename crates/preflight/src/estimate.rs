//! Roofline estimates of one layer's sequence-mixing op (forward + backward, one micro-batch)
//! and of the activation memory a layer keeps for backward.
//!
//! Time = max(bytes moved / (bandwidth * [`BANDWIDTH_EFFICIENCY`]),
//!            FLOPs / (peak * [`COMPUTE_EFFICIENCY`]))
//!        + the sequential chain of a schedule (steps that wait on the previous state)
//!        + kernel launches.
//! These are estimates, stated as such in the report; the measured mode replaces the time by
//! measurements. Only the op differs between modes, so the projections and the MLP, the same for
//! every mode, are left out of the time.

use serde::{Deserialize, Serialize};

use crate::device::{DeviceKind, DeviceProfile};
use crate::op::LayerOp;
use crate::shape::{LayerShape, ModelType};
use crate::tiles::{
    gla_uses_tensor_cores, Padding, CHUNK_BLOCK_K, CHUNK_BLOCK_V, CHUNK_LAUNCHES, CHUNK_SIZE,
    FUSED_CHUNK_LAUNCHES, FUSED_RECURRENT_LAUNCHES, RECURRENT_BLOCK_K, RECURRENT_BLOCK_V,
    TENSOR_CORE_CHUNK_LAUNCHES,
};
use glatrain_config::{ActivationCheckpointing, GlaMode};
use glatrain_ops::selective_scan::kernels::geometry as scan;

/// Share of the measured copy bandwidth a streaming kernel reaches.
pub const BANDWIDTH_EFFICIENCY: f64 = 0.8;
/// Share of the peak FLOP/s a kernel's inner loops reach.
pub const COMPUTE_EFFICIENCY: f64 = 0.6;
/// Backward FLOPs per forward FLOP (FlashAttention's accounting: 2.5).
pub const BACKWARD_FLOP_FACTOR: f64 = 2.5;
/// Cost of one kernel launch on a busy stream.
pub const LAUNCH_S: f64 = 4e-6;
/// One dependent 64-token step of the chunk state pass (load, update, store the state).
pub const CHUNK_STEP_S: f64 = 1e-6;
/// One dependent token step of fused_recurrent (state update in registers, a cross-warp
/// reduction for q.S; the next token's loads are prefetched).
pub const RECURRENT_STEP_S: f64 = 0.3e-6;
/// Blocks of one latency-bound sequential walk that an SM keeps resident at once.
pub const RESIDENT_BLOCKS_PER_SM: f64 = 2.0;
/// fused_chunk reaches full bandwidth only with this many blocks per SM (each block walks its
/// sequence in order, so one block keeps too few loads in flight); fewer blocks scale it down.
/// The rules use the same number for fp32 inputs: fused_chunk when its grid fills the GPU this
/// many times. Measured on an H100 with kernels/gla.cu's chunk kernels, which fp32 inputs still
/// run (bench/results/gla-h100-2026-11-25.json, 2026-11-25, bf16 inputs then): fused_chunk beats
/// chunk from 256 blocks (1.9 waves; GLA-340M's layer 4.77 vs 7.30 ms fwd+bwd) up, chunk wins
/// at 64 blocks (0.5 waves; 1 x 16384 x 16 x 128: 19.5 vs 25.6 ms).
pub const FUSED_CHUNK_MIN_WAVES: f64 = 1.0;
/// The reference ops (tensor ops in fp32) write and read every intermediate: this many times
/// the chunk schedule's time.
pub const REFERENCE_OVERHEAD: f64 = 4.0;
/// Chunk length of the reference selective scan on a GPU: it materialises `[B, T/C, C, C, D, N]`
/// decays.
pub const SELECTIVE_SCAN_CHUNK: u64 = glatrain_ops::reference::selective_scan::DEFAULT_CHUNK as u64;
/// Passes over the chunk states (and, in bf16/fp16, the chunks' A) in forward+backward: written
/// and read in forward, the adjoint states written and read in backward.
const STATE_PASSES: u64 = 4;
/// Sub-chunk of the intra-chunk attention (`CS` in kernels/gla.cu): tokens attend within it
/// element-wise, across it through the state.
const SUB_CHUNK: f64 = 16.0;

/// One op's estimated cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Forward + backward of one layer's op on one micro-batch.
    pub time_ms: f64,
    /// Bytes one layer keeps for backward: the block's activations plus the op's own (chunk
    /// states, softmax statistics, scan decays).
    pub memory_bytes: u64,
}

/// The estimate of `mode` for `shape` on `device`. `mode` must be an op of the shape's model
/// type (GLA modes for GLA, SDPA for the Transformer, the scan for Mamba).
pub fn estimate(shape: &LayerShape, device: &DeviceProfile, mode: LayerOp) -> Estimate {
    let seconds = match mode {
        LayerOp::Gla(GlaMode::Chunk) => gla_chunk_s(shape, device, tensor_core_chunk(shape)),
        LayerOp::Gla(GlaMode::FusedChunk) => gla_fused_chunk_s(shape, device),
        LayerOp::Gla(GlaMode::FusedRecurrent) => gla_recurrent_s(shape, device),
        // The reference ops keep their states in fp32, as the fp32 kernels do.
        LayerOp::Gla(GlaMode::Reference) => REFERENCE_OVERHEAD * gla_chunk_s(shape, device, false),
        LayerOp::SdpaFused | LayerOp::Sdpa => sdpa_s(shape, device, mode == LayerOp::SdpaFused),
        LayerOp::SelectiveScan => selective_scan_kernels_s(shape, device),
        LayerOp::SelectiveScanReference => selective_scan_s(shape, device),
    };
    Estimate {
        time_ms: seconds * 1e3,
        memory_bytes: memory_parts(shape, mode).iter().map(|p| p.bytes).sum(),
    }
}

/// One item of what a layer keeps for its backward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPart {
    /// What the tensor is (and its dtype where that is not the activations').
    pub what: &'static str,
    /// Bytes per layer and micro-batch.
    pub bytes: u64,
}

/// What one layer keeps from its forward for its backward, item by item: the block's
/// activations ([`block_activation_bytes`]) and the op's own. Their sum is the layer's
/// [`Estimate::memory_bytes`].
pub fn memory_parts(shape: &LayerShape, mode: LayerOp) -> Vec<MemoryPart> {
    let mut parts = block_parts(shape);
    parts.extend(op_parts(shape, mode));
    parts
}

/// Bytes that chunk mode materialises for one layer, by input precision:
/// - bf16/fp16 (kernels/gla_tc.cu): the chunk states in the input dtype,
///   `B * H * ceil(T / 64) * K * V * 2`, each chunk's A, `B * H * ceil(T / 64) * 64 * 64 * 2`,
///   the gate-scaled q and k, `2 * B * T * H * K * 2`, and the f32 chunk decays,
///   `B * H * ceil(T / 64) * K * 4`, all kept from the forward to the backward;
/// - fp32 (kernels/gla.cu): fp32 chunk states, `B * H * ceil(T / 64) * K * V * 4`, allocated in
///   the forward and again in the backward (kept for neither; counted as if kept).
pub fn chunk_state_bytes(shape: &LayerShape) -> u64 {
    chunk_bytes(shape, tensor_core_chunk(shape))
}

/// Whether the shape's chunk mode runs the bf16/fp16 tensor-core schedule (kernels/gla_tc.cu)
/// rather than the fp32 kernels of kernels/gla.cu.
pub(crate) fn tensor_core_chunk(shape: &LayerShape) -> bool {
    gla_uses_tensor_cores(LayerOp::Gla(GlaMode::Chunk), shape.act_bytes())
}

/// [`chunk_state_bytes`] of the tensor-core schedule (`tensor_cores`) or of fp32 states.
fn chunk_bytes(shape: &LayerShape, tensor_cores: bool) -> u64 {
    let chunks = shape.batch_heads() * shape.seq_len.div_ceil(CHUNK_SIZE) as u64;
    let states = chunks * (shape.head_k_dim * shape.head_v_dim) as u64;
    if tensor_cores {
        let attn = chunks * (CHUNK_SIZE * CHUNK_SIZE) as u64;
        let scaled_qk = 2 * shape.batch_heads() * (shape.seq_len * shape.head_k_dim) as u64;
        let decays = 4 * chunks * shape.head_k_dim as u64;
        shape.act_bytes() * (states + attn + scaled_qk) + decays
    } else {
        4 * states
    }
}

/// Blocks of the fused_chunk grid (one per batch, head and state tile).
pub fn fused_chunk_blocks(shape: &LayerShape) -> u64 {
    shape.batch_heads()
        * shape.head_k_dim.div_ceil(CHUNK_BLOCK_K) as u64
        * shape.head_v_dim.div_ceil(CHUNK_BLOCK_V) as u64
}

/// Whether libtorch runs SDPA on a fused kernel for this shape (FlashAttention or cuDNN): CUDA,
/// bf16/fp16, head dim <= 256.
pub fn sdpa_is_fused(shape: &LayerShape, device: &DeviceProfile) -> bool {
    device.kind == DeviceKind::Cuda
        && shape.act_bytes() == 2
        && shape.head_k_dim.max(shape.head_v_dim) <= 256
}

/// Activation bytes one block (mixer + MLP + norms) keeps for backward, per layer: the sum of
/// [`block_parts`].
pub fn block_activation_bytes(shape: &LayerShape) -> u64 {
    block_parts(shape).iter().map(|p| p.bytes).sum()
}

/// The block's activations kept for backward, per layer. Counted per token, in activation
/// precision unless noted:
/// - GLA: the fp32 residual stream at both norms (2 * 4d bytes, kept by the norms; each norm runs
///   with the projections that read it as one op, which computes the normed values again in the
///   backward instead of keeping them) + q, k (2 dk) + v, g (2 dv) + the output and its gate (2 dv: the gated norm's inputs; the norm and o_proj run as
///   one op that computes the normalised values again in the backward) + MLP gate and up (2 m:
///   SwiGLU and down_proj likewise) + the gate logits (dk, kept by the log forget gate) and gk in
///   fp32 (4 bytes * dk, kept by the GLA op), and the conv inputs (2 dk + dv) with `short_conv`;
/// - Transformer: the residual stream as GLA's + q and o (2 H D) + k, v (2 H_kv D) + MLP gate and
///   up (2m);
/// - Mamba (d_inner = E; crates/models/src/mamba.rs): the fp32 residual stream (4d bytes, kept by
///   the norm, which runs with in_proj as one op); in_proj's output x | z (2E: x kept by
///   the fused convolution, which reads it in place and computes its silu again in the backward,
///   z by the scan's gate); u (E, the convolution's time-major output, kept by x_proj and the
///   scan); B and C (2N, x_proj's columns, read in place by the scan); delta (E, dt_proj's
///   output; its bias and softplus run inside the scan); the scan's output (E, kept by
///   out_proj).
///
/// Neglected: norm statistics, the rank-16 gate projection, Mamba's dt_rank columns of x_proj
/// and its convolution's K - 1 extra outputs per sequence (< 1%).
pub fn block_parts(shape: &LayerShape) -> Vec<MemoryPart> {
    let Widths {
        a,
        d,
        m,
        dk,
        dv,
        kv,
        e,
        n,
    } = Widths::of(shape);
    let per_token: Vec<(&'static str, u64)> = match shape.model_type {
        ModelType::Gla => {
            let mut parts = vec![
                ("residual stream at both norms (fp32)", 2 * 4 * d),
                ("q, k", a * 2 * dk),
                ("v, output gate g", a * 2 * dv),
                ("attention output and its gate", a * 2 * dv),
                ("MLP gate and up", a * 2 * m),
                ("forget-gate logits, log forget gates (fp32)", (a + 4) * dk),
            ];
            if shape.short_conv {
                parts.push(("short-convolution inputs", a * (2 * dk + dv)));
            }
            parts
        }
        ModelType::Transformer => vec![
            ("residual stream at both norms (fp32)", 2 * 4 * d),
            ("q, attention output", a * 2 * dk),
            ("k, v", a * 2 * kv),
            ("MLP gate and up", a * 2 * m),
        ],
        ModelType::Mamba => vec![
            ("residual stream (fp32)", 4 * d),
            ("in_proj output x | z", a * 2 * e),
            ("u (the convolution's output)", a * e),
            ("B, C (x_proj output)", a * 2 * n),
            ("delta (dt_proj output)", a * e),
            ("scan output (out_proj input)", a * e),
        ],
    };
    per_layer(per_token, shape)
}

/// What one layer keeps for its backward while it waits for it under activation checkpointing
/// (crates/models/src/checkpoint.rs), per layer and micro-batch; `None` keeps [`memory_parts`]
/// instead and gets nothing here. The layer whose backward runs holds its recomputed
/// activations ([`memory_parts`]) besides.
/// Counted per token:
/// - full: the block's input, the fp32 residual stream (4d bytes);
/// - selective: that and the outputs of the block's matrix products in activation precision:
///   GLA q, k and the forget-gate projections (2 dk + dk + 16), v and g (2 dv), o_proj (d), MLP
///   gate and up (2m), down (d); Transformer q and k, v (H D + 2 H_kv D), o_proj (d), gate, up,
///   down (2m + d); Mamba in_proj (2E), x_proj (dt_rank + 2N, dt_rank = hidden / 16), out_proj
///   (d).
pub fn checkpointed_parts(shape: &LayerShape, mode: ActivationCheckpointing) -> Vec<MemoryPart> {
    let Widths {
        a,
        d,
        m,
        dk,
        dv,
        kv,
        e,
        n,
    } = Widths::of(shape);
    if mode == ActivationCheckpointing::None {
        return Vec::new();
    }
    let mut per_token = vec![("block input (fp32 residual stream)", 4 * d)];
    if mode == ActivationCheckpointing::Selective {
        per_token.push(match shape.model_type {
            ModelType::Gla => (
                "matrix products: q, k, gates, v, g, o_proj, MLP",
                a * (3 * dk + 16 + 2 * dv + 2 * d + 2 * m),
            ),
            ModelType::Transformer => (
                "matrix products: q, k, v, o_proj, MLP",
                a * (dk + 2 * kv + 2 * d + 2 * m),
            ),
            ModelType::Mamba => (
                "matrix products: in_proj, x_proj, out_proj",
                a * (2 * e + d / 16 + 2 * n + d),
            ),
        });
    }
    per_layer(per_token, shape)
}

/// The widths [`block_parts`] and [`checkpointed_parts`] count per token, in elements.
struct Widths {
    /// Bytes of one activation element.
    a: u64,
    /// The model's width.
    d: u64,
    /// The MLP's.
    m: u64,
    /// Keys (and queries) over all heads.
    dk: u64,
    /// Values over all heads.
    dv: u64,
    /// The Transformer's keys (and values) over its KV heads.
    kv: u64,
    /// Mamba's d_inner (its `num_heads`).
    e: u64,
    /// Mamba's d_state (its `head_k_dim`).
    n: u64,
}

impl Widths {
    fn of(shape: &LayerShape) -> Self {
        let heads = shape.num_heads as u64;
        let head_k = shape.head_k_dim as u64;
        Self {
            a: shape.act_bytes(),
            d: shape.hidden_size as u64,
            m: shape.mlp_size as u64,
            dk: heads * head_k,
            dv: heads * shape.head_v_dim as u64,
            kv: shape.num_kv_heads as u64 * head_k,
            e: heads,
            n: head_k,
        }
    }
}

/// Parts given in bytes per token, as the bytes of one layer and micro-batch of `shape`.
fn per_layer(per_token: Vec<(&'static str, u64)>, shape: &LayerShape) -> Vec<MemoryPart> {
    per_token
        .into_iter()
        .map(|(what, bytes)| MemoryPart {
            what,
            bytes: bytes * shape.tokens(),
        })
        .collect()
}

/// Bytes of the selective-scan kernels' chunk-start states: fp32 `[B, ceil(T / 32), E, N]`.
pub fn scan_checkpoint_bytes(shape: &LayerShape) -> u64 {
    let chunks = shape.seq_len.div_ceil(scan::CHUNK_LEN as usize) as u64;
    4 * shape.batch as u64 * chunks * shape.num_heads as u64 * shape.head_k_dim as u64
}

/// What the op itself keeps on top of the block's activations.
fn op_parts(shape: &LayerShape, mode: LayerOp) -> Vec<MemoryPart> {
    let token_heads = shape.tokens() * shape.num_heads as u64;
    let k = shape.head_k_dim as u64;
    let part = |what, bytes| vec![MemoryPart { what, bytes }];
    match mode {
        LayerOp::Gla(GlaMode::Chunk) => part("chunk states", chunk_state_bytes(shape)),
        LayerOp::Gla(GlaMode::FusedChunk) | LayerOp::Gla(GlaMode::FusedRecurrent) => Vec::new(),
        // Chunk states, sub-chunk scores and the cumulative gates and gated q, k, all fp32.
        LayerOp::Gla(GlaMode::Reference) => part(
            "reference: chunk states, scores, cumulative gates, gated q, k (fp32)",
            chunk_bytes(shape, false) + token_heads * 4 * (SUB_CHUNK as u64 + 3 * k),
        ),
        LayerOp::SdpaFused | LayerOp::Sdpa => part("softmax log-sum-exp (fp32)", token_heads * 4),
        // The fp32 state every 32 steps, and the output before the gate (for dz).
        LayerOp::SelectiveScan => vec![
            MemoryPart {
                what: "scan checkpoints (fp32 state every 32 steps)",
                bytes: scan_checkpoint_bytes(shape),
            },
            MemoryPart {
                what: "scan output before the gate",
                bytes: shape.act_bytes() * token_heads,
            },
        ],
        // On the CPU, token by token: per token and channel N each of exp(delta A), delta B u,
        // the states and the previous state each step's product keeps, fp32.
        LayerOp::SelectiveScanReference if shape.device == DeviceKind::Cpu.name() => part(
            "reference scan, token by token: exp(delta A), delta B u, states (fp32, twice)",
            token_heads * k * 4 * 4,
        ),
        // Chunked: per token and channel the [C, C] decays' row of C * N, plus N each of the
        // states, exp(delta A) and delta B u, fp32.
        LayerOp::SelectiveScanReference => part(
            "reference scan, chunked: decays, states, exp(delta A), delta B u (fp32)",
            token_heads * k * (SELECTIVE_SCAN_CHUNK + 3) * 4,
        ),
    }
}

/// The device's FLOP/s for the GLA kernels' matmuls, derated: the tensor peak for kernels on
/// bf16/fp16 tensor cores (see [`gla_uses_tensor_cores`]), else the fp32 peak.
fn gla_flops_per_s(device: &DeviceProfile, tensor_cores: bool) -> f64 {
    let peak = if tensor_cores {
        device.peak_tensor_flops
    } else {
        device.peak_fp32_flops
    };
    peak * COMPUTE_EFFICIENCY
}

fn bandwidth(device: &DeviceProfile) -> f64 {
    device.mem_bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY
}

/// Launch overhead: only CUDA launches kernels.
fn launches_s(device: &DeviceProfile, launches: f64) -> f64 {
    match device.kind {
        DeviceKind::Cuda => launches * LAUNCH_S,
        DeviceKind::Cpu => 0.0,
    }
}

/// How many rounds a latency-bound sequential walk of `blocks` blocks takes.
fn rounds(blocks: u64, device: &DeviceProfile) -> f64 {
    (blocks as f64 / (device.sm_count.max(1) as f64 * RESIDENT_BLOCKS_PER_SM))
        .ceil()
        .max(1.0)
}

/// Bytes every GLA schedule moves per (token, head) in forward+backward: forward reads q, k, v
/// and the fp32 gate and writes o; backward reads q, k, v, g, do and writes dq, dk, dv and the
/// fp32 dg. At bf16, K = V = 128 this is 4352 bytes (~1.14 GB at 8 x 2048 x 16, the floor glatrain bench uses).
fn gla_io_per_token_head(shape: &LayerShape) -> f64 {
    let (a, k, v) = (
        shape.act_bytes() as f64,
        shape.head_k_dim as f64,
        shape.head_v_dim as f64,
    );
    a * (6.0 * k + 5.0 * v) + 12.0 * k
}

/// Forward FLOPs per (token, head) of the chunked schedules on padded tiles: attention inside
/// the sub-chunk (causal, half of it on average), q.S and the state update (2 K V each).
fn gla_chunked_fwd_flops(shape: &LayerShape) -> f64 {
    let p = Padding::for_tiles(shape.head_k_dim, shape.head_v_dim);
    let (kp, vp) = (p.k_padded as f64, p.v_padded as f64);
    SUB_CHUNK * (kp + vp) + 4.0 * kp * vp
}

/// The chunk schedule: the bf16/fp16 one on tensor cores (`tensor_cores`, kernels/gla_tc.cu) or
/// the fp32 one (kernels/gla.cu).
fn gla_chunk_s(shape: &LayerShape, device: &DeviceProfile, tensor_cores: bool) -> f64 {
    let n = (shape.tokens() * shape.num_heads as u64) as f64;
    let (a, k, v) = (
        shape.act_bytes() as f64,
        shape.head_k_dim as f64,
        shape.head_v_dim as f64,
    );
    // The sequential state passes re-read k, v, g (forward) and q, do, g (backward).
    let reread = 2.0 * (a * (k + v) + 4.0 * k);
    let bytes = n * (gla_io_per_token_head(shape) + reread)
        + (STATE_PASSES * chunk_bytes(shape, tensor_cores)) as f64;
    let p = Padding::for_tiles(shape.head_k_dim, shape.head_v_dim);
    // The state pass adds one more state update (2 K V) to the forward.
    let fwd = gla_chunked_fwd_flops(shape) + 2.0 * (p.k_padded * p.v_padded) as f64;
    let flops = n * fwd * (1.0 + BACKWARD_FLOP_FACTOR);
    let roofline = (bytes / bandwidth(device)).max(flops / gla_flops_per_s(device, tensor_cores));
    // The state pass (forward) and the adjoint pass (backward) walk the chunks in order.
    let chain = 2.0
        * shape.seq_len.div_ceil(CHUNK_SIZE) as f64
        * CHUNK_STEP_S
        * rounds(fused_chunk_blocks(shape), device);
    let launches = if tensor_cores {
        TENSOR_CORE_CHUNK_LAUNCHES
    } else {
        CHUNK_LAUNCHES
    };
    roofline + chain + launches_s(device, launches as f64)
}

fn gla_fused_chunk_s(shape: &LayerShape, device: &DeviceProfile) -> f64 {
    let n = (shape.tokens() * shape.num_heads as u64) as f64;
    let bytes = n * gla_io_per_token_head(shape);
    let flops = n * gla_chunked_fwd_flops(shape) * (1.0 + BACKWARD_FLOP_FACTOR);
    let fill = (fused_chunk_blocks(shape) as f64
        / (FUSED_CHUNK_MIN_WAVES * device.sm_count.max(1) as f64))
        .min(1.0);
    let tensor_cores = gla_uses_tensor_cores(LayerOp::Gla(GlaMode::FusedChunk), shape.act_bytes());
    let roofline = (bytes / bandwidth(device)).max(flops / gla_flops_per_s(device, tensor_cores));
    roofline / fill + launches_s(device, FUSED_CHUNK_LAUNCHES as f64)
}

fn gla_recurrent_s(shape: &LayerShape, device: &DeviceProfile) -> f64 {
    let n = (shape.tokens() * shape.num_heads as u64) as f64;
    let bytes = n * gla_io_per_token_head(shape);
    let kp = shape.head_k_dim.div_ceil(RECURRENT_BLOCK_K) * RECURRENT_BLOCK_K;
    let vp = shape.head_v_dim.div_ceil(RECURRENT_BLOCK_V) * RECURRENT_BLOCK_V;
    // Scalar fp32: decay and update (3 K V) and q.S (2 K V) per token.
    let flops = n * 5.0 * (kp * vp) as f64 * (1.0 + BACKWARD_FLOP_FACTOR);
    let blocks = shape.batch_heads()
        * shape.head_k_dim.div_ceil(RECURRENT_BLOCK_K) as u64
        * shape.head_v_dim.div_ceil(RECURRENT_BLOCK_V) as u64;
    // Forward walk, backward reverse walk (dk, dv), backward forward walk (dq).
    let chain = 3.0 * shape.seq_len as f64 * RECURRENT_STEP_S * rounds(blocks, device);
    let roofline =
        (bytes / bandwidth(device)).max(flops / (device.peak_fp32_flops * COMPUTE_EFFICIENCY));
    roofline.max(chain) + launches_s(device, FUSED_RECURRENT_LAUNCHES as f64)
}

/// Causal softmax attention: 4 B H T^2 D / 2 FLOPs forward (K for the scores, V for the
/// values: 2 B H T^2 (K + V) / 2), 2.5x that backward; q, k, v, o, do, dq, dk, dv moved once.
fn sdpa_s(shape: &LayerShape, device: &DeviceProfile, fused: bool) -> f64 {
    let (b, h, t) = (
        shape.batch as f64,
        shape.num_heads as f64,
        shape.seq_len as f64,
    );
    let (k, v) = (shape.head_k_dim as f64, shape.head_v_dim as f64);
    let fwd = 2.0 * b * h * t * t * (k + v) / 2.0;
    let flops = fwd * (1.0 + BACKWARD_FLOP_FACTOR);
    let peak = if fused {
        device.peak_tensor_flops
    } else {
        device.peak_fp32_flops
    };
    let bytes = b * t * h * shape.act_bytes() as f64 * 4.0 * (k + v);
    let roofline = (bytes / bandwidth(device)).max(flops / (peak * COMPUTE_EFFICIENCY));
    // Forward, backward preprocessing, backward.
    roofline + launches_s(device, 3.0)
}

/// The selective scan's CUDA kernels (kernels/selective_scan.cu), bound by the exponentials
/// (one `ex2` per element (b, t, d, n) in the forward, two in the backward: its recompute of each
/// chunk's states and of each 4-step sub-chunk) or by memory: the forward reads u, delta, z and
/// B, C and writes the output and the pre-gate output; the backward reads those inputs, the
/// pre-gate output and the output gradient and writes du, ddelta, dz, dB, dC; the chunk-start
/// states and the dB / dC partials per 64-channel tile are written and read once each.
fn selective_scan_kernels_s(shape: &LayerShape, device: &DeviceProfile) -> f64 {
    let tokens = shape.tokens() as f64;
    let (a, e, n) = (
        shape.act_bytes() as f64,
        shape.num_heads as f64,
        shape.head_k_dim as f64,
    );
    let exps = 3.0 * tokens * e * n;
    let tiles = (e / scan::BWD_TILE as f64).ceil();
    let per_token = a * (13.0 * e + 6.0 * n) + 2.0 * 4.0 * tiles * 2.0 * n;
    let bytes = tokens * per_token + 2.0 * scan_checkpoint_bytes(shape) as f64;
    let roofline = (bytes / bandwidth(device)).max(exps / (device.ex2_per_s * COMPUTE_EFFICIENCY));
    roofline + launches_s(device, scan::LAUNCHES as f64)
}

/// The reference selective scan: per (token, channel) the decays and states of
/// [`op_parts`] are written in forward and read in backward, and the sequential walk
/// over chunks launches a few ops per chunk.
fn selective_scan_s(shape: &LayerShape, device: &DeviceProfile) -> f64 {
    let n = (shape.tokens() * shape.num_heads as u64) as f64;
    let states = shape.head_k_dim as f64;
    let c = SELECTIVE_SCAN_CHUNK as f64;
    let bytes = 2.0 * n * states * (c + 3.0) * 4.0;
    let flops = n * states * (2.0 * c + 4.0) * (1.0 + BACKWARD_FLOP_FACTOR);
    let roofline =
        (bytes / bandwidth(device)).max(flops / (device.peak_fp32_flops * COMPUTE_EFFICIENCY));
    let steps = shape.seq_len.div_ceil(SELECTIVE_SCAN_CHUNK as usize) as f64;
    roofline + launches_s(device, 2.0 * 4.0 * steps)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use glatrain_config::Precision;

    /// A one-layer bf16 GLA shape on CUDA with `hidden_size = h * v` and no MLP.
    pub(crate) fn gla(b: usize, t: usize, h: usize, k: usize, v: usize) -> LayerShape {
        LayerShape {
            model_type: ModelType::Gla,
            num_layers: 1,
            batch: b,
            seq_len: t,
            num_heads: h,
            num_kv_heads: h,
            head_k_dim: k,
            head_v_dim: v,
            hidden_size: h * v,
            mlp_size: 0,
            short_conv: false,
            dtype: Precision::Bf16,
            device: "cuda".into(),
            decoding: false,
        }
    }

    /// A one-layer bf16 Mamba shape on CUDA: d_inner `e`, d_state `n`.
    pub(crate) fn mamba(b: usize, t: usize, hidden: usize, e: usize, n: usize) -> LayerShape {
        LayerShape {
            model_type: ModelType::Mamba,
            num_kv_heads: e,
            hidden_size: hidden,
            ..gla(b, t, e, n, 1)
        }
    }

    #[test]
    fn mamba_370m_layer_memory_item_by_item() {
        // d 1024, E 2048, N 16, 8 x 2048 tokens in bf16. Per token: the fp32 residual (4d),
        // x | z (4E), u, delta, scan output (2E each), B and C (4N); the scan adds fp32 states
        // every 32 steps (N E / 8 bytes per token) and the pre-gate output (2E).
        let s = mamba(8, 2048, 1024, 2048, 16);
        let parts = memory_parts(&s, LayerOp::SelectiveScan);
        let bytes = |what: &str| parts.iter().find(|p| p.what == what).unwrap().bytes;
        let tokens = 16384;
        assert_eq!(bytes("residual stream (fp32)"), tokens * 4 * 1024);
        assert_eq!(bytes("in_proj output x | z"), tokens * 2 * 2 * 2048);
        assert_eq!(bytes("B, C (x_proj output)"), tokens * 2 * 32);
        assert_eq!(
            bytes("scan checkpoints (fp32 state every 32 steps)"),
            8 * 64 * 2048 * 16 * 4
        );
        assert_eq!(bytes("scan output before the gate"), tokens * 2 * 2048);
        let per_token = 4 * 1024 + 2 * (5 * 2048 + 2 * 16);
        let total = tokens * per_token + 2 * 8 * 64 * 2048 * 16 * 4;
        let h100 = DeviceProfile::h100_sxm();
        assert_eq!(
            estimate(&s, &h100, LayerOp::SelectiveScan).memory_bytes,
            total
        );
        assert_eq!(block_activation_bytes(&s), tokens * per_token);
        // 513 MiB per layer: 24.1 GiB for Mamba-370M's 48 layers.
        assert_eq!(total / (1 << 20), 513);
    }

    #[test]
    fn the_scan_kernels_are_bound_by_their_exponentials_at_mamba_shapes() {
        // 8 x 2048 x 2048 x 16: 3 ex2 per element (one forward, two backward) = 1.61e9 at
        // 132 x 16 x 1.98 GHz, derated by the compute efficiency: 0.64 ms, over the 0.48 ms
        // its bytes take; mamba_ssm's kernels take 3.25 ms (bench/anchors.json).
        let h100 = DeviceProfile::h100_sxm();
        let s = mamba(8, 2048, 1024, 2048, 16);
        let t = estimate(&s, &h100, LayerOp::SelectiveScan).time_ms;
        let exps = 3.0 * 16384.0 * 2048.0 * 16.0 / (h100.ex2_per_s * COMPUTE_EFFICIENCY) * 1e3;
        assert!((exps - 0.642).abs() < 0.001, "{exps}");
        assert!(
            (t - exps - 4.0 * LAUNCH_S * 1e3).abs() < 1e-9,
            "{t} vs {exps}"
        );
        // Linear in T and in d_state; far below the reference's tensor ops.
        let long = mamba(1, 16384, 1024, 2048, 16);
        let ratio = estimate(&long, &h100, LayerOp::SelectiveScan).time_ms / t;
        assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
        let reference = estimate(&s, &h100, LayerOp::SelectiveScanReference).time_ms;
        assert!(reference > 3.0 * t, "{reference} vs {t}");
    }

    /// `shape` in fp32 (the kernels of kernels/gla.cu for every mode).
    pub(crate) fn fp32(shape: LayerShape) -> LayerShape {
        LayerShape {
            dtype: Precision::Fp32,
            ..shape
        }
    }

    #[test]
    fn gla_traffic_matches_the_anchor_floor() {
        // The benchmark's floor: 8 x 2048 x 16 x 128 moves ~1.14 GB forward+backward.
        let s = gla(8, 2048, 16, 128, 128);
        let bytes = gla_io_per_token_head(&s) * (s.tokens() * 16) as f64;
        assert!((bytes - 1.14e9).abs() < 0.01e9, "{bytes}");
        assert_eq!(fused_chunk_blocks(&s), 8 * 16 * 2 * 2);
    }

    #[test]
    fn chunk_mode_keeps_states_a_and_scaled_q_k_in_half_precision() {
        // bf16 / fp16 (kernels/gla_tc.cu): 2-byte states, a 64 x 64 2-byte A per chunk, 2-byte
        // scaled q and k, a 4-byte decay per chunk and channel.
        let s = gla(8, 2048, 16, 128, 128);
        assert_eq!(
            chunk_state_bytes(&s),
            8 * 16 * 32 * (128 * 128 + 64 * 64) * 2
                + 2 * 8 * 16 * 2048 * 128 * 2
                + 8 * 16 * 32 * 128 * 4
        );
        let fp16 = LayerShape {
            dtype: Precision::Fp16,
            ..s.clone()
        };
        assert_eq!(chunk_state_bytes(&fp16), chunk_state_bytes(&s));
        // fp32 (kernels/gla.cu): 4-byte states, no A.
        assert_eq!(chunk_state_bytes(&fp32(s)), 8 * 16 * 32 * 128 * 128 * 4);
        // A partial last chunk counts whole; A dominates at tiny head dims.
        let tiny = gla(1, 65, 1, 8, 8);
        assert_eq!(
            chunk_state_bytes(&tiny),
            2 * (8 * 8 + 64 * 64) * 2 + 2 * 65 * 8 * 2 + 2 * 8 * 4
        );
        assert_eq!(chunk_state_bytes(&fp32(tiny)), 2 * 8 * 8 * 4);
    }

    #[test]
    fn sdpa_grows_quadratically_and_gla_linearly_in_t() {
        let h100 = DeviceProfile::h100_sxm();
        let t2k = gla(4, 2048, 16, 128, 128);
        let t8k = gla(4, 8192, 16, 128, 128);
        let ratio =
            |mode| estimate(&t8k, &h100, mode).time_ms / estimate(&t2k, &h100, mode).time_ms;
        let sdpa = ratio(LayerOp::SdpaFused);
        assert!((sdpa - 16.0).abs() < 0.5, "{sdpa}");
        let chunk = ratio(LayerOp::Gla(GlaMode::Chunk));
        assert!((3.5..=4.5).contains(&chunk), "{chunk}");
        // The SDPA FLOP count of the 1 x 16384 x 16 x 128 benchmark row: 4 B H T^2 D / 2 * 3.5.
        let s = gla(1, 16384, 16, 128, 128);
        let flops = 4.0 * 16.0 * 16384f64.powi(2) * 128.0 / 2.0 * 3.5;
        let expected_ms = flops / (h100.peak_tensor_flops * COMPUTE_EFFICIENCY) * 1e3;
        let got = estimate(&s, &h100, LayerOp::SdpaFused).time_ms;
        assert!((got - expected_ms).abs() < 0.02, "{got} vs {expected_ms}");
    }

    #[test]
    fn fp32_fused_chunk_slows_down_when_its_grid_does_not_fill_the_gpu() {
        let h100 = DeviceProfile::h100_sxm();
        // Few blocks: chunk mode's parallelism over chunks wins.
        let few = fp32(gla(1, 16384, 4, 64, 64));
        assert!(
            estimate(&few, &h100, LayerOp::Gla(GlaMode::FusedChunk)).time_ms
                > estimate(&few, &h100, LayerOp::Gla(GlaMode::Chunk)).time_ms
        );
        // Many blocks: fused_chunk moves no states and wins.
        let many = fp32(gla(64, 2048, 16, 128, 128));
        assert!(
            estimate(&many, &h100, LayerOp::Gla(GlaMode::FusedChunk)).time_ms
                < estimate(&many, &h100, LayerOp::Gla(GlaMode::Chunk)).time_ms
        );
        // Recurrent at long T is a long dependent chain.
        let long = gla(2, 8192, 16, 128, 128);
        assert!(
            estimate(&long, &h100, LayerOp::Gla(GlaMode::FusedRecurrent)).time_ms
                > 2.0 * estimate(&long, &h100, LayerOp::Gla(GlaMode::Chunk)).time_ms
        );
    }

    #[test]
    fn half_precision_chunk_is_estimated_faster_than_fused_chunk_at_the_benchmark_shapes() {
        // Measured on an H100 (fwd+bwd): chunk 2.2 / 4.7 ms vs fused_chunk 9.3 / 25.6 ms. The
        // estimate agrees on the order at head dim 128, many blocks included. (At 8 x 2048 x 16
        // x 64, measured 1.2 vs 3.5 ms, it does not: fused_chunk's roofline leaves out the
        // per-step latency that limits kernels/gla.cu.)
        let h100 = DeviceProfile::h100_sxm();
        for s in [
            gla(8, 2048, 16, 128, 128),
            gla(1, 16384, 16, 128, 128),
            gla(64, 2048, 16, 128, 128),
        ] {
            let chunk = estimate(&s, &h100, LayerOp::Gla(GlaMode::Chunk)).time_ms;
            let fused = estimate(&s, &h100, LayerOp::Gla(GlaMode::FusedChunk)).time_ms;
            assert!(
                chunk < fused,
                "B {} T {}: {chunk} vs {fused}",
                s.batch,
                s.seq_len
            );
        }
    }

    #[test]
    fn memory_counts_states_only_for_the_modes_that_keep_them() {
        let h100 = DeviceProfile::h100_sxm();
        let s = gla(8, 2048, 4, 128, 256);
        let block = block_activation_bytes(&s);
        assert_eq!(
            estimate(&s, &h100, LayerOp::Gla(GlaMode::FusedChunk)).memory_bytes,
            block
        );
        assert_eq!(
            estimate(&s, &h100, LayerOp::Gla(GlaMode::Chunk)).memory_bytes,
            block + chunk_state_bytes(&s)
        );
        assert!(
            estimate(&s, &h100, LayerOp::Gla(GlaMode::Reference)).memory_bytes
                > block + chunk_state_bytes(&s)
        );
        // The reference op's states are fp32 whatever the input dtype.
        let reference = |s: &LayerShape| {
            estimate(s, &h100, LayerOp::Gla(GlaMode::Reference)).memory_bytes
                - block_activation_bytes(s)
        };
        assert_eq!(reference(&s), reference(&fp32(s.clone())));
        // Per token: the fp32 residual stream at both norms (2 * 4d bytes), then 2dk + 4dv and
        // the gate logits (dk) at 2 bytes, plus gk in fp32 (d = 1024, no MLP here).
        let per_token = 2 * 4 * 1024 + 2 * (2 * 512 + 4 * 1024 + 512) + 4 * 512;
        assert_eq!(block, per_token * 8 * 2048);
    }

    #[test]
    fn fused_sdpa_needs_cuda_half_precision_and_head_dim_up_to_256() {
        let h100 = DeviceProfile::h100_sxm();
        assert!(sdpa_is_fused(&gla(1, 64, 1, 256, 256), &h100));
        assert!(!sdpa_is_fused(&gla(1, 64, 1, 512, 512), &h100));
        assert!(!sdpa_is_fused(&fp32(gla(1, 64, 1, 64, 64)), &h100));
        assert!(!sdpa_is_fused(
            &gla(1, 64, 1, 64, 64),
            &DeviceProfile::cpu()
        ));
    }
}
