//! The rules that pick a layer's op, all in [`choose_mode`], and the [`Decision`] they explain.

use glatrain_config::{GlaMode, ModeChoice};
use serde::{Deserialize, Serialize};

use crate::device::{DeviceKind, DeviceProfile};
use crate::estimate::{
    chunk_state_bytes, estimate, fused_chunk_blocks, sdpa_is_fused, tensor_core_chunk,
    FUSED_CHUNK_MIN_WAVES,
};
use crate::op::{LayerOp, Source};
use crate::report::{human_bytes, ms};
use crate::shape::{LayerShape, ModelType};
use crate::tiles::{Padding, CHUNK_SIZE};
use glatrain_ops::selective_scan::kernels::geometry::MAX_STATES as MAX_SCAN_STATES;

/// Longest sequence that runs token by token: up to one chunk, the chunked schedules have no
/// chunks to spread over and fused_recurrent needs no state pass.
pub const FUSED_RECURRENT_MAX_T: usize = 64;
/// Chunk states of all layers of a shape may take at most this share of the device memory
/// before fused_chunk (no stored states) is preferred.
pub const STATE_MEMORY_FRACTION: f64 = 0.25;
/// A forced mode estimated this many times slower than the automatic choice gets a warning.
pub const BAD_FIT_FACTOR: f64 = 2.0;
/// How far the advice looks for the sequence length from which GLA is estimated faster than
/// softmax attention.
const CROSSOVER_MAX_T: usize = 1 << 22;

/// The op chosen for one layer shape, with the why and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The op the layer runs.
    pub op: LayerOp,
    /// Rules, forced by the config, measured or cached.
    pub source: Source,
    /// One sentence: which rule (or measurement) decided, with the numbers it compared.
    pub reason: String,
    /// Forward + backward of one layer's op per micro-batch: a roofline estimate for rules and
    /// forced decisions, the measured time for measured and cached ones.
    pub est_time_ms: f64,
    /// Bytes one layer keeps for backward (the block's activations plus chunk states, ...).
    pub est_memory_bytes: u64,
    pub padding: Padding,
    /// Where softmax attention is estimated faster for the same shape: both numbers. The model
    /// is never switched.
    pub advice: Option<String>,
    /// Forced modes that fit badly, config keys that do not apply, measurement problems.
    pub warnings: Vec<String>,
}

/// Picks the op of one layer shape. The rules, in order (the first that applies decides):
///
/// 1. **Baselines.** Transformer layers run causal SDPA (a fused kernel on CUDA in bf16/fp16 with
///    head dim <= 256, FlashAttention or cuDNN as libtorch picks, else the unfused math); Mamba
///    layers run the selective scan's CUDA kernels (d_state up to 256), else (CPU, larger
///    d_state) the tensor-op reference. `kernels.mode` concerns GLA only; a forced mode here is
///    reported as not applying.
/// 2. **CPU -> reference.** The CUDA kernels need a GPU; the reference tensor ops run anywhere.
///    A forced CUDA mode on CPU is reported and replaced.
/// 3. **Forced -> respected.** `kernels.mode` other than `auto` is what the user asked for; it
///    is reported as forced, with a warning when the rules below would pick a mode estimated
///    [`BAD_FIT_FACTOR`] times faster, or when forced chunk mode's states exceed the memory
///    share of rule 6 (e.g. fused_recurrent at T = 8192 walks 8192 dependent steps).
/// 4. **Decoding -> fused_recurrent.** One token per call: the state stays in registers, there
///    is nothing to chunk.
/// 5. **T <= 64 -> fused_recurrent.** At most one chunk: no parallelism over chunks to gain,
///    and no state pass to pay for.
/// 6. **Chunk states too large -> fused_chunk.** Chunk mode materialises `B H ceil(T/64) K V`
///    states per layer ([`chunk_state_bytes`]): in bf16/fp16 in the input dtype, plus each
///    chunk's `64 x 64` A, both kept for backward; in fp32, fp32 states. When those of all
///    layers exceed [`STATE_MEMORY_FRACTION`] of the device memory, fused_chunk keeps the state
///    on chip.
/// 7. **bf16/fp16 -> chunk.** The tensor-core chunk schedule (kernels/gla_tc.cu) was measured
///    faster than fused_chunk at every benchmark shape, whatever the grid.
/// 8. **fp32: the grid fills the GPU -> fused_chunk.** fp32 runs kernels/gla.cu's 3xTF32
///    kernels; fused_chunk runs one block per (batch, head, state tile) walking the whole
///    sequence, and with at least [`FUSED_CHUNK_MIN_WAVES`] blocks per SM it streams at full
///    bandwidth and moves no states.
/// 9. **fp32 otherwise -> chunk.** Too few (batch, head) pairs to fill the SMs: chunk mode also
///    runs in parallel over the chunks, at the cost of storing the states.
pub fn choose_mode(shape: &LayerShape, device: &DeviceProfile, forced: ModeChoice) -> Decision {
    match shape.model_type {
        ModelType::Transformer | ModelType::Mamba => baseline(shape, device, forced),
        ModelType::Gla => gla(shape, device, forced),
    }
}

fn baseline(shape: &LayerShape, device: &DeviceProfile, forced: ModeChoice) -> Decision {
    let (mode, reason) = match shape.model_type {
        ModelType::Transformer if sdpa_is_fused(shape, device) => (
            LayerOp::SdpaFused,
            "softmax attention: causal SDPA on a fused kernel (FlashAttention or cuDNN, libtorch \
             picks; CUDA, bf16/fp16, head dim <= 256)"
                .to_owned(),
        ),
        ModelType::Transformer => (
            LayerOp::Sdpa,
            format!(
                "softmax attention: causal SDPA; no fused kernel for {} {} with head dim {}, \
                 libtorch runs another backend",
                device.kind.name(),
                shape.dtype_name(),
                shape.head_k_dim
            ),
        ),
        _ if device.kind == DeviceKind::Cpu => (
            LayerOp::SelectiveScanReference,
            "Mamba: the selective scan in tensor ops, token by token (the CUDA kernels need a GPU)"
                .to_owned(),
        ),
        _ if shape.head_k_dim as i64 > MAX_SCAN_STATES => (
            LayerOp::SelectiveScanReference,
            format!(
                "Mamba: d_state = {} is more than the {MAX_SCAN_STATES} states the CUDA scan \
                 kernels take: the selective scan in tensor ops, chunked",
                shape.head_k_dim
            ),
        ),
        _ => (
            LayerOp::SelectiveScan,
            "Mamba: the selective scan's CUDA kernels (the state stays on chip; the forward \
             keeps it in fp32 every 32 steps for the backward's recompute)"
                .to_owned(),
        ),
    };
    let mut d = decide(shape, device, mode, Source::Rules, reason);
    d.padding = Padding::none(shape.head_k_dim, shape.head_v_dim);
    if forced != ModeChoice::Auto {
        d.warnings.push(format!(
            "kernels.mode = \"{}\" applies to GLA layers only; {} layers run {}",
            forced.name(),
            shape.model_type.name(),
            mode.name()
        ));
    }
    d
}

fn gla(shape: &LayerShape, device: &DeviceProfile, forced: ModeChoice) -> Decision {
    if device.kind == DeviceKind::Cpu {
        let source = if forced == ModeChoice::Fixed(GlaMode::Reference) {
            Source::Forced
        } else {
            Source::Rules
        };
        let mut d = decide(
            shape,
            device,
            LayerOp::Gla(GlaMode::Reference),
            source,
            "CPU: the CUDA kernels need a GPU; the reference tensor ops run anywhere".into(),
        );
        if !matches!(
            forced,
            ModeChoice::Auto | ModeChoice::Fixed(GlaMode::Reference)
        ) {
            d.warnings.push(format!(
                "kernels.mode = \"{}\" needs CUDA; on CPU the reference op runs",
                forced.name()
            ));
        }
        return d;
    }
    if let ModeChoice::Fixed(mode) = forced {
        return forced_decision(shape, device, LayerOp::Gla(mode));
    }
    let (mode, reason) = gla_rule(shape, device);
    with_advice(
        decide(shape, device, mode, Source::Rules, reason),
        shape,
        device,
    )
}

/// Rules 4 to 9 for a GLA shape on CUDA: the mode and why.
fn gla_rule(shape: &LayerShape, device: &DeviceProfile) -> (LayerOp, String) {
    let t = shape.seq_len;
    if shape.decoding {
        return (
            LayerOp::Gla(GlaMode::FusedRecurrent),
            "decoding: one token per call, the state stays in registers".into(),
        );
    }
    if t <= FUSED_RECURRENT_MAX_T {
        return (
            LayerOp::Gla(GlaMode::FusedRecurrent),
            format!(
                "T = {t} <= {FUSED_RECURRENT_MAX_T}: one chunk at most, token by token with the \
                 state in registers needs no state pass"
            ),
        );
    }
    if let Some(reason) = states_too_large(shape, device) {
        return (
            LayerOp::Gla(GlaMode::FusedChunk),
            format!("{reason}; fused_chunk keeps the state on chip"),
        );
    }
    if tensor_core_chunk(shape) {
        // Forward+backward on an H100, bf16 (bench/results/gla-h100-2026-11-26.json):
        // 8x2048x16x128 chunk 1.06 vs fused_chunk 8.8 ms, 1x16384x16x128 1.2 vs 24 ms,
        // 8x2048x16x64 0.57 vs 3.2 ms.
        return (
            LayerOp::Gla(GlaMode::Chunk),
            format!(
                "{}: the tensor-core chunk schedule, measured faster than fused_chunk at every \
                 benchmark shape",
                shape.dtype_name()
            ),
        );
    }
    let blocks = fused_chunk_blocks(shape);
    let waves = blocks as f64 / device.sm_count.max(1) as f64;
    let grid = format!(
        "fp32: B*H*state tiles = {}*{}*{} = {blocks} blocks = {waves:.1} waves of {} SMs",
        shape.batch,
        shape.num_heads,
        blocks / shape.batch_heads().max(1),
        device.sm_count
    );
    if waves >= FUSED_CHUNK_MIN_WAVES {
        (
            LayerOp::Gla(GlaMode::FusedChunk),
            format!(
                "{grid} (>= {FUSED_CHUNK_MIN_WAVES}): fused_chunk fills the GPU without storing \
                 chunk states"
            ),
        )
    } else {
        (
            LayerOp::Gla(GlaMode::Chunk),
            format!(
                "{grid} (< {FUSED_CHUNK_MIN_WAVES}): chunk mode also runs the {} chunks of {CHUNK_SIZE} \
                 tokens in parallel",
                t.div_ceil(CHUNK_SIZE)
            ),
        )
    }
}

/// Rule 6's test: `Some(why)` when the chunk states of all layers of the shape take more than
/// [`STATE_MEMORY_FRACTION`] of the device memory (never when the memory is unknown).
fn states_too_large(shape: &LayerShape, device: &DeviceProfile) -> Option<String> {
    let all_layers = chunk_state_bytes(shape) * shape.num_layers as u64;
    let budget = STATE_MEMORY_FRACTION * device.memory_bytes as f64;
    (device.memory_bytes > 0 && all_layers as f64 > budget).then(|| {
        format!(
            "chunk mode would store {} of {} for {} layers ({} each), over {:.0}% of the {} of {}",
            human_bytes(all_layers),
            if tensor_core_chunk(shape) {
                format!(
                    "{} chunk states, A matrices and scaled q, k",
                    shape.dtype_name()
                )
            } else {
                "fp32 states".to_owned()
            },
            shape.num_layers,
            human_bytes(chunk_state_bytes(shape)),
            100.0 * STATE_MEMORY_FRACTION,
            human_bytes(device.memory_bytes),
            device.name
        )
    })
}

fn forced_decision(shape: &LayerShape, device: &DeviceProfile, mode: LayerOp) -> Decision {
    let reason = format!("kernels.mode = \"{}\" in the config", mode.name());
    let mut d = with_advice(
        decide(shape, device, mode, Source::Forced, reason),
        shape,
        device,
    );
    let (auto_mode, _) = gla_rule(shape, device);
    let auto = estimate(shape, device, auto_mode);
    if mode != auto_mode && d.est_time_ms >= BAD_FIT_FACTOR * auto.time_ms {
        d.warnings.push(format!(
            "kernels.mode = \"{}\" is a bad fit at B = {}, T = {}, H = {}: estimated {} vs {} for \
             {} (the automatic choice); set kernels.mode = \"auto\"",
            mode.name(),
            shape.batch,
            shape.seq_len,
            shape.num_heads,
            ms(d.est_time_ms),
            ms(auto.time_ms),
            auto_mode.name()
        ));
    }
    if mode == LayerOp::Gla(GlaMode::Chunk) {
        if let Some(why) = states_too_large(shape, device) {
            d.warnings.push(format!(
                "kernels.mode = \"chunk\": {why}; fused_chunk stores none"
            ));
        }
    }
    d
}

/// A decision for `mode` with the roofline estimate and the padding of the GLA tiles (none for
/// the reference op, which works on the real shapes).
fn decide(
    shape: &LayerShape,
    device: &DeviceProfile,
    mode: LayerOp,
    source: Source,
    reason: String,
) -> Decision {
    let e = estimate(shape, device, mode);
    let padding = match mode {
        LayerOp::Gla(GlaMode::Chunk | GlaMode::FusedChunk | GlaMode::FusedRecurrent) => {
            Padding::for_tiles(shape.head_k_dim, shape.head_v_dim)
        }
        _ => Padding::none(shape.head_k_dim, shape.head_v_dim),
    };
    Decision {
        op: mode,
        source,
        reason,
        est_time_ms: e.time_ms,
        est_memory_bytes: e.memory_bytes,
        padding,
        advice: None,
        warnings: Vec::new(),
    }
}

/// Adds the softmax-attention advice to a GLA decision on CUDA (see [`softmax_advice`]).
fn with_advice(mut d: Decision, shape: &LayerShape, device: &DeviceProfile) -> Decision {
    d.advice = softmax_advice(shape, device, d.op, d.est_time_ms);
    d
}

/// When causal softmax attention (SDPA) is estimated faster than `gla_ms` (GLA in `mode`) for
/// the same B, T, H, K, V on `device`: a sentence with both numbers and the sequence length
/// from which GLA is estimated faster. `None` on CPU and for decoding.
pub fn softmax_advice(
    shape: &LayerShape,
    device: &DeviceProfile,
    mode: LayerOp,
    gla_ms: f64,
) -> Option<String> {
    if device.kind != DeviceKind::Cuda || shape.decoding {
        return None;
    }
    let sdpa = sdpa_mode(shape, device);
    let sdpa_ms = estimate(shape, device, sdpa).time_ms;
    let label = format!("would be faster at this shape: {}", sdpa.name());
    faster_softmax(shape, device, mode, gla_ms, sdpa_ms, &label)
}

/// [`softmax_advice`] from a measured SDPA time (`sdpa_ms`, libtorch's own choice of backend,
/// `sdpa` names it) against a measured GLA time: the measured preflight compares like with like.
pub fn measured_softmax_advice(
    shape: &LayerShape,
    device: &DeviceProfile,
    mode: LayerOp,
    gla_ms: f64,
    sdpa_ms: f64,
    sdpa: &str,
) -> Option<String> {
    if device.kind != DeviceKind::Cuda || shape.decoding {
        return None;
    }
    faster_softmax(
        shape,
        device,
        mode,
        gla_ms,
        sdpa_ms,
        &format!("measured faster at this shape: {sdpa}"),
    )
}

/// The advice sentence when `sdpa_ms` < `gla_ms`, else `None`.
fn faster_softmax(
    shape: &LayerShape,
    device: &DeviceProfile,
    mode: LayerOp,
    gla_ms: f64,
    sdpa_ms: f64,
    label: &str,
) -> Option<String> {
    if sdpa_ms >= gla_ms {
        return None;
    }
    let crossover = crossover_seq_len(shape, device, mode);
    let from = match crossover {
        Some(t) => format!("GLA is estimated faster from T = {t} (its cost grows linearly in T, softmax's quadratically)"),
        None => format!("GLA is not estimated faster up to T = {CROSSOVER_MAX_T}"),
    };
    Some(format!(
        "softmax attention {label} {} vs GLA {} {} fwd+bwd per layer \
         (B = {}, T = {}, H = {}, K = {}, V = {}); {from}. glatrain trains the configured model; \
         this is advice only",
        ms(sdpa_ms),
        mode.name(),
        ms(gla_ms),
        shape.batch,
        shape.seq_len,
        shape.num_heads,
        shape.head_k_dim,
        shape.head_v_dim
    ))
}

fn sdpa_mode(shape: &LayerShape, device: &DeviceProfile) -> LayerOp {
    if sdpa_is_fused(shape, device) {
        LayerOp::SdpaFused
    } else {
        LayerOp::Sdpa
    }
}

/// The smallest power-of-two multiple of T at which GLA, in the mode the rules pick at that
/// length (the reference op stays the reference op), is estimated faster than SDPA.
fn crossover_seq_len(shape: &LayerShape, device: &DeviceProfile, mode: LayerOp) -> Option<usize> {
    let mut probe = shape.clone();
    while probe.seq_len < CROSSOVER_MAX_T {
        probe.seq_len *= 2;
        let gla_mode = if mode == LayerOp::Gla(GlaMode::Reference) {
            mode
        } else {
            gla_rule(&probe, device).0
        };
        if estimate(&probe, device, gla_mode).time_ms
            < estimate(&probe, device, sdpa_mode(&probe, device)).time_ms
        {
            return Some(probe.seq_len);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::tests::fp32;
    use crate::estimate::RECURRENT_STEP_S;
    use glatrain_config::Precision;

    const GIB: u64 = 1 << 30;

    fn gla_shape(b: usize, t: usize, h: usize, k: usize, v: usize) -> LayerShape {
        LayerShape {
            num_layers: 24,
            ..crate::estimate::tests::gla(b, t, h, k, v)
        }
    }

    /// A hidden-size config's GLA shape: expand_k 0.5, expand_v 1.
    fn from_hidden(hidden: usize, heads: usize, b: usize, t: usize) -> LayerShape {
        LayerShape {
            hidden_size: hidden,
            ..gla_shape(b, t, heads, hidden / 2 / heads, hidden / heads)
        }
    }

    fn small_gpu() -> DeviceProfile {
        DeviceProfile::generic_cuda("Small GPU", 20, 16 * GIB)
    }

    fn auto(shape: &LayerShape, device: &DeviceProfile) -> Decision {
        choose_mode(shape, device, ModeChoice::Auto)
    }

    #[test]
    fn cpu_runs_the_reference_op_for_every_gla_shape() {
        let cpu = DeviceProfile::cpu();
        for (hidden, heads, t) in [(32, 2, 64), (256, 4, 2048), (1024, 4, 16384)] {
            let d = auto(&from_hidden(hidden, heads, 2, t), &cpu);
            assert_eq!(
                (d.op, d.source),
                (LayerOp::Gla(GlaMode::Reference), Source::Rules)
            );
            assert!(d.reason.starts_with("CPU"), "{}", d.reason);
            assert_eq!(d.padding.wasted_fraction, 0.0);
            assert_eq!(d.advice, None);
            assert!(d.warnings.is_empty());
        }
        let d = choose_mode(
            &from_hidden(64, 2, 2, 128),
            &cpu,
            ModeChoice::Fixed(GlaMode::Chunk),
        );
        assert_eq!(d.op, LayerOp::Gla(GlaMode::Reference));
        assert_eq!(
            d.warnings,
            ["kernels.mode = \"chunk\" needs CUDA; on CPU the reference op runs"]
        );
        let d = choose_mode(
            &from_hidden(64, 2, 2, 128),
            &cpu,
            ModeChoice::Fixed(GlaMode::Reference),
        );
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::Reference), Source::Forced)
        );
    }

    #[test]
    fn short_sequences_and_decoding_run_token_by_token() {
        for device in [DeviceProfile::h100_sxm(), small_gpu()] {
            for (hidden, heads) in [(32, 2), (1024, 4), (2048, 16)] {
                let d = auto(&from_hidden(hidden, heads, 8, 64), &device);
                assert_eq!(
                    d.op,
                    LayerOp::Gla(GlaMode::FusedRecurrent),
                    "hidden {hidden}"
                );
                assert!(d.reason.contains("T = 64 <= 64"), "{}", d.reason);
            }
            let decode = LayerShape {
                decoding: true,
                seq_len: 1,
                ..from_hidden(1024, 4, 8, 2048)
            };
            let d = auto(&decode, &device);
            assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedRecurrent));
            assert!(d.reason.starts_with("decoding"), "{}", d.reason);
            assert_eq!(d.advice, None);
        }
        // One token more: two chunks, the chunked schedules.
        let two_chunks = from_hidden(1024, 4, 8, 65);
        let h100 = DeviceProfile::h100_sxm();
        assert_eq!(auto(&two_chunks, &h100).op, LayerOp::Gla(GlaMode::Chunk));
        assert_eq!(
            auto(&fp32(two_chunks), &h100).op,
            LayerOp::Gla(GlaMode::FusedChunk)
        );
    }

    /// Rule 7's reason.
    const TENSOR_CORE_CHUNK: &str =
        "the tensor-core chunk schedule, measured faster than fused_chunk at every benchmark shape";

    /// `d` runs bf16 GLA as `chunk`, for the tensor-core schedule's reason.
    #[track_caller]
    fn assert_tensor_core_chunk(d: &Decision) {
        assert_eq!(d.op, LayerOp::Gla(GlaMode::Chunk), "{}", d.reason);
        assert_eq!(d.reason, format!("bf16: {TENSOR_CORE_CHUNK}"));
    }

    #[test]
    fn half_precision_runs_the_tensor_core_chunk_schedule_whatever_the_grid() {
        let h100 = DeviceProfile::h100_sxm();
        // GLA-340M in bf16: 256 fused_chunk blocks fill the H100 1.9 times, but chunk is faster.
        let s = from_hidden(1024, 4, 8, 2048);
        let d = auto(&s, &h100);
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::Chunk), Source::Rules)
        );
        assert_eq!(d.reason, format!("bf16: {TENSOR_CORE_CHUNK}"));
        // Its states and A are kept for backward.
        assert_eq!(
            d.est_memory_bytes,
            crate::estimate::block_activation_bytes(&s) + chunk_state_bytes(&s)
        );
        let fp16 = LayerShape {
            dtype: Precision::Fp16,
            ..s.clone()
        };
        assert_eq!(
            auto(&fp16, &h100).reason,
            format!("fp16: {TENSOR_CORE_CHUNK}")
        );
        // The same shape in fp32 (kernels/gla.cu) still takes fused_chunk, by the waves rule
        // (its reason: the next test).
        assert_eq!(
            auto(&fp32(s.clone()), &h100).op,
            LayerOp::Gla(GlaMode::FusedChunk)
        );
        // Many blocks, a small GPU, one long sequence, tiny and huge head dims: chunk in bf16.
        for (s, device) in [
            (s, small_gpu()),
            (gla_shape(32, 2048, 16, 64, 64), h100.clone()),
            (gla_shape(1, 16384, 16, 128, 128), h100.clone()),
            (from_hidden(32, 16, 1, 4096), h100.clone()),
            (gla_shape(1, 4096, 2, 1024, 1024), h100.clone()),
        ] {
            assert_tensor_core_chunk(&auto(&s, &device));
        }
    }

    #[test]
    fn fp32_chunk_when_batch_times_heads_is_small_fused_chunk_when_it_fills_the_gpu() {
        let h100 = DeviceProfile::h100_sxm();
        let auto32 = |s: LayerShape, device: &DeviceProfile| auto(&fp32(s), device);
        // GLA-340M: 8 * 4 * (2 * 4 tiles) = 256 blocks >= 1 wave of 132 SMs.
        let d = auto32(from_hidden(1024, 4, 8, 2048), &h100);
        assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedChunk), "{}", d.reason);
        assert_eq!(
            d.reason,
            "fp32: B*H*state tiles = 8*4*8 = 256 blocks = 1.9 waves of 132 SMs (>= 1): \
             fused_chunk fills the GPU without storing chunk states"
        );
        // The same shape fills a 20-SM GPU 12.8 times.
        let d = auto32(from_hidden(1024, 4, 8, 2048), &small_gpu());
        assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedChunk), "{}", d.reason);
        assert!(
            d.reason.contains("256 blocks = 12.8 waves of 20 SMs"),
            "{}",
            d.reason
        );
        // Large B*H fills the H100 too.
        let d = auto32(gla_shape(32, 2048, 16, 64, 64), &h100);
        assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedChunk), "{}", d.reason);
        assert!(d.reason.contains("512 blocks = 3.9 waves"), "{}", d.reason);
        // One long sequence: B*H = 16.
        for t in [4096, 16384] {
            let d = auto32(gla_shape(1, t, 16, 128, 128), &h100);
            assert_eq!(d.op, LayerOp::Gla(GlaMode::Chunk));
            assert!(
                d.reason.contains(&format!(
                    "64 blocks = 0.5 waves of 132 SMs (< 1): chunk mode also runs the {} chunks",
                    t / 64
                )),
                "{}",
                d.reason
            );
        }
        // Tiny and huge head dims take the same rules, padded, never an error.
        for (hidden, heads, k) in [(32, 2, 8), (32, 4, 4), (32, 16, 1)] {
            let d = auto32(from_hidden(hidden, heads, 1, 4096), &h100);
            assert_eq!(
                d.op,
                LayerOp::Gla(GlaMode::Chunk),
                "hidden {hidden}: {}",
                d.reason
            );
            assert_eq!(d.padding.k_padded, 16, "K = {k}");
            assert!(d.est_time_ms.is_finite() && d.est_time_ms > 0.0);
        }
        // Head dims of 1024: 256 state tiles per head fill the GPU even at B*H = 2.
        let d = auto32(gla_shape(1, 4096, 2, 1024, 1024), &h100);
        assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedChunk), "{}", d.reason);
        assert!(d.reason.contains("1*2*256 = 512 blocks"), "{}", d.reason);
        assert_eq!(d.padding.wasted_fraction, 0.0);
    }

    #[test]
    fn seed_cases_sweep() {
        // Hidden 32..1024 (head dims 1..1024), T 64..16K, B*H from 1 to 1024, bf16 and fp32, on
        // the H100, a 20-SM GPU and the CPU: every shape gets a mode, a finite estimate and whole
        // tiles.
        let (h100, small, cpu) = (DeviceProfile::h100_sxm(), small_gpu(), DeviceProfile::cpu());
        let mut seen = std::collections::HashSet::new();
        for hidden in [32, 64, 128, 256, 512, 1024] {
            for heads in [1, 2, 4, 8, 16]
                .into_iter()
                .filter(|h| (hidden / 2) % h == 0)
            {
                for t in [64, 128, 2048, 16384] {
                    for b in [1, 8, 64] {
                        for dtype in [Precision::Bf16, Precision::Fp32] {
                            let s = LayerShape {
                                dtype,
                                ..from_hidden(hidden, heads, b, t)
                            };
                            let on = |device: &DeviceProfile| auto(&s, device);
                            let (big, little, host) = (on(&h100), on(&small), on(&cpu));
                            let case = format!("hidden {hidden} H {heads} T {t} B {b} {dtype:?}");
                            assert_eq!(host.op, LayerOp::Gla(GlaMode::Reference), "{case}");
                            for d in [&big, &little, &host] {
                                assert!(d.est_time_ms.is_finite() && d.est_time_ms > 0.0, "{case}");
                                assert!(
                                    d.est_memory_bytes
                                        >= crate::estimate::block_activation_bytes(&s),
                                    "{case}"
                                );
                                assert!(
                                    d.padding.k_padded >= s.head_k_dim
                                        && d.padding.v_padded >= s.head_v_dim,
                                    "{case}"
                                );
                                assert!(!d.reason.is_empty() && d.warnings.is_empty(), "{case}");
                            }
                            for d in [&big, &little] {
                                assert_eq!(d.padding.k_padded % 16, 0, "{case}");
                                assert!(d.padding.k_padded < s.head_k_dim + 16, "{case}");
                                if t <= 64 {
                                    assert_eq!(
                                        d.op,
                                        LayerOp::Gla(GlaMode::FusedRecurrent),
                                        "{case}"
                                    );
                                } else {
                                    assert!(
                                        matches!(
                                            d.op,
                                            LayerOp::Gla(GlaMode::Chunk)
                                                | LayerOp::Gla(GlaMode::FusedChunk)
                                        ),
                                        "{case}"
                                    );
                                }
                                // In bf16 only rule 6 (states too large) takes fused_chunk.
                                if dtype == Precision::Bf16
                                    && d.op == LayerOp::Gla(GlaMode::FusedChunk)
                                {
                                    assert!(
                                        d.reason.starts_with("chunk mode would store "),
                                        "{case}: {}",
                                        d.reason
                                    );
                                }
                            }
                            // Fewer SMs and less memory fill up sooner: whatever takes
                            // fused_chunk on the H100 takes it on the small GPU.
                            if big.op == LayerOp::Gla(GlaMode::FusedChunk) {
                                assert_eq!(
                                    little.op,
                                    LayerOp::Gla(GlaMode::FusedChunk),
                                    "{case}: {}",
                                    little.reason
                                );
                            }
                            seen.insert((s.dtype_name(), big.op, little.op));
                        }
                    }
                }
            }
        }
        // The sweep reaches every GPU outcome in both precisions, including the two GPUs
        // disagreeing (bf16: by the states' memory only; fp32: by the waves too).
        for dtype in ["bf16", "fp32"] {
            for (big, little) in [
                (
                    LayerOp::Gla(GlaMode::FusedRecurrent),
                    LayerOp::Gla(GlaMode::FusedRecurrent),
                ),
                (LayerOp::Gla(GlaMode::Chunk), LayerOp::Gla(GlaMode::Chunk)),
                (
                    LayerOp::Gla(GlaMode::Chunk),
                    LayerOp::Gla(GlaMode::FusedChunk),
                ),
                (
                    LayerOp::Gla(GlaMode::FusedChunk),
                    LayerOp::Gla(GlaMode::FusedChunk),
                ),
            ] {
                assert!(
                    seen.contains(&(dtype, big, little)),
                    "{dtype}: {big:?} on the H100, {little:?} on the small GPU never chosen"
                );
            }
        }
    }

    #[test]
    fn large_chunk_states_switch_to_fused_chunk() {
        let h100 = DeviceProfile::h100_sxm();
        // 24 layers of 1 * 2 * 1024 chunks of 512 x 512 states take more than a quarter of the
        // 80 GiB: in fp32 (4 bytes) 48 GiB, in bf16 (2 bytes, plus 2-byte 64 x 64 A per chunk,
        // the gate-scaled q and k and f32 chunk decays) 30.5 GiB. Otherwise fp32 would pick chunk (128 blocks < 1 wave), bf16 too (rule 7).
        let s = gla_shape(1, 65536, 2, 512, 512);
        for (s, states) in [
            (
                fp32(s.clone()),
                "48.0 GiB of fp32 states for 24 layers (2.0 GiB each)",
            ),
            (
                s,
                "30.5 GiB of bf16 chunk states, A matrices and scaled q, k for 24 layers (1.3 GiB each)",
            ),
        ] {
            let d = auto(&s, &h100);
            assert_eq!(d.op, LayerOp::Gla(GlaMode::FusedChunk), "{}", d.reason);
            assert_eq!(
                d.reason,
                format!(
                    "chunk mode would store {states}, over 25% of the 80.0 GiB of NVIDIA H100 \
                     80GB HBM3; fused_chunk keeps the state on chip"
                )
            );
            // The same shape on an unknown-memory device keeps the later rules.
            assert_eq!(
                auto(&s, &h100.clone().with_memory_bytes(0)).op,
                LayerOp::Gla(GlaMode::Chunk)
            );
            // Forcing chunk there is respected, with a warning.
            let d = choose_mode(&s, &h100, ModeChoice::Fixed(GlaMode::Chunk));
            assert_eq!((d.op, d.source), (LayerOp::Gla(GlaMode::Chunk), Source::Forced));
            assert!(
                d.warnings
                    .iter()
                    .any(|w| w.contains(states) && w.contains("fused_chunk stores none")),
                "{:?}",
                d.warnings
            );
        }
        // Half the sequence: 24 GiB of fp32 states are too many, 12.2 GiB of bf16 ones are not.
        let s = gla_shape(1, 32768, 2, 512, 512);
        assert_eq!(
            auto(&fp32(s.clone()), &h100).op,
            LayerOp::Gla(GlaMode::FusedChunk)
        );
        assert_tensor_core_chunk(&auto(&s, &h100));
    }

    #[test]
    fn forced_modes_are_respected_and_bad_fits_warned() {
        let h100 = DeviceProfile::h100_sxm();
        let long = gla_shape(2, 8192, 16, 128, 128);
        let d = choose_mode(&long, &h100, ModeChoice::Fixed(GlaMode::FusedRecurrent));
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::FusedRecurrent), Source::Forced)
        );
        assert_eq!(d.reason, "kernels.mode = \"fused_recurrent\" in the config");
        // 3 walks of 8192 dependent steps.
        assert!(d.est_time_ms >= 3.0 * 8192.0 * RECURRENT_STEP_S * 1e3);
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert!(
            d.warnings[0].contains("bad fit at B = 2, T = 8192"),
            "{}",
            d.warnings[0]
        );
        assert!(
            d.warnings[0].contains("for chunk (the automatic choice)"),
            "{}",
            d.warnings[0]
        );
        // Forcing what the rules pick anyway gives no warning.
        let d = choose_mode(&long, &h100, ModeChoice::Fixed(GlaMode::Chunk));
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::Chunk), Source::Forced)
        );
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        // Forced fused_chunk at small B*H: slower, but within the bad-fit factor.
        let d = choose_mode(&long, &h100, ModeChoice::Fixed(GlaMode::FusedChunk));
        assert_eq!(d.source, Source::Forced);
        // Forced reference on a GPU is respected.
        let d = choose_mode(&long, &h100, ModeChoice::Fixed(GlaMode::Reference));
        assert_eq!(
            (d.op, d.source),
            (LayerOp::Gla(GlaMode::Reference), Source::Forced)
        );
    }

    #[test]
    fn baselines_get_one_row_each() {
        let h100 = DeviceProfile::h100_sxm();
        let t = LayerShape {
            model_type: ModelType::Transformer,
            ..gla_shape(8, 2048, 16, 64, 64)
        };
        let d = auto(&t, &h100);
        assert_eq!((d.op, d.source), (LayerOp::SdpaFused, Source::Rules));
        let d = auto(&fp32(t.clone()), &h100);
        assert_eq!(d.op, LayerOp::Sdpa);
        assert!(
            d.reason.contains("no fused kernel for cuda fp32"),
            "{}",
            d.reason
        );
        let d = choose_mode(&t, &h100, ModeChoice::Fixed(GlaMode::Chunk));
        assert_eq!(d.op, LayerOp::SdpaFused);
        assert_eq!(d.warnings, ["kernels.mode = \"chunk\" applies to GLA layers only; transformer layers run sdpa_fused"]);

        let m = LayerShape {
            model_type: ModelType::Mamba,
            ..gla_shape(8, 2048, 2048, 16, 1)
        };
        let d = auto(&m, &DeviceProfile::cpu());
        assert_eq!(d.op, LayerOp::SelectiveScanReference);
        assert!(d.reason.contains("token by token"), "{}", d.reason);
        assert!(d.est_memory_bytes > 0 && d.est_time_ms > 0.0);
        let d = auto(&m, &h100);
        assert_eq!(d.op, LayerOp::SelectiveScan);
        assert!(d.reason.contains("CUDA kernels"), "{}", d.reason);
        let wide = LayerShape {
            head_k_dim: 512,
            ..m
        };
        let d = auto(&wide, &h100);
        assert_eq!(d.op, LayerOp::SelectiveScanReference);
        assert!(d.reason.contains("d_state = 512"), "{}", d.reason);
    }

    #[test]
    fn softmax_advice_for_small_head_dims_at_short_t_only() {
        let h100 = DeviceProfile::h100_sxm();
        // bench/anchors.json: 8 x 2048 x 16 x 32, SDPA flash 0.85 ms vs FLA chunk 2.41 ms.
        let d = auto(&gla_shape(8, 2048, 16, 32, 32), &h100);
        let advice = d.advice.expect("advice at head dim 32, T = 2048");
        assert!(
            advice.starts_with("softmax attention would be faster at this shape: sdpa_fused "),
            "{advice}"
        );
        assert!(
            advice.contains(&format!("vs GLA chunk {} fwd+bwd", ms(d.est_time_ms))),
            "{advice}"
        );
        assert!(
            advice.contains("GLA is estimated faster from T = "),
            "{advice}"
        );
        assert!(advice.contains("advice only"), "{advice}");
        // Long sequences at head dim 128: GLA wins by far.
        let d = auto(&gla_shape(1, 16384, 16, 128, 128), &h100);
        assert_eq!(d.advice, None);
        // Forced modes get the advice too.
        let d = choose_mode(
            &gla_shape(8, 2048, 16, 32, 32),
            &h100,
            ModeChoice::Fixed(GlaMode::Chunk),
        );
        assert!(d.advice.is_some());
    }
}
