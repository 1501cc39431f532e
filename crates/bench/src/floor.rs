//! Floors: the least time an op can take on the GPU. The memory floor is the bytes each input
//! and output must move once over the bandwidth a large device-to-device copy reaches; the
//! selective scan also has an exponential floor, its `exp`s at the GPU's `ex2` rate. A row's
//! floor is the larger, with its arithmetic written out for the report.

use glatrain_cuda::{GpuSpec, EX2_PER_SM_PER_CLOCK};

use crate::op::{ScanShape, Shape};

/// What the floors divide by on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Rates {
    /// Device-to-device copy bandwidth, bytes/s.
    pub copy_bytes_per_s: f64,
    /// `ex2` results per second.
    pub ex2_per_s: f64,
    /// How `ex2_per_s` comes about ("132 SMs x 16 ex2/clock x 1.98 GHz").
    pub ex2_source: String,
}

impl Rates {
    /// The rates of a GPU of the table with `sm_count` SMs: its copy bandwidth, and 16 `ex2` per
    /// SM per clock at its boost clock.
    pub fn of(spec: &GpuSpec, sm_count: usize) -> Rates {
        Rates {
            copy_bytes_per_s: spec.copy_bytes_per_s,
            ex2_per_s: spec.ex2_per_s(sm_count),
            ex2_source: format!(
                "{sm_count} SMs x {EX2_PER_SM_PER_CLOCK} ex2/clock x {:.3} GHz boost",
                spec.boost_clock_hz / 1e9
            ),
        }
    }
}

/// A row's floors, forward and forward + backward, in ms, and how they were computed.
#[derive(Debug, Clone, PartialEq)]
pub struct Floor {
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    /// The arithmetic, in words and numbers.
    pub arithmetic: String,
}

/// Bytes an attention-like op must move at `shape` with `elem` bytes per q/k/v/o element
/// (forward, forward + backward). The GLA op reads q, k (K), v (V) and its log gates g (K, fp32)
/// and writes o (V); its backward reads q, k, v, g and do again and writes dq, dk (K), dv (V) and
/// dg (K, fp32). SDPA rows use the same count (it moves no gates, so its own floor is lower).
pub fn attention_bytes(shape: &Shape, elem: f64) -> (f64, f64) {
    let (qk, v) = (shape.qk_elements() as f64, shape.v_elements() as f64);
    let forward = elem * (2.0 * qk + 2.0 * v) + 4.0 * qk;
    let backward_reads = elem * (2.0 * qk + 2.0 * v) + 4.0 * qk;
    let backward_writes = elem * (2.0 * qk + v) + 4.0 * qk;
    (forward, forward + backward_reads + backward_writes)
}

/// Bytes the selective scan must move at `shape` with `elem` bytes per element (forward,
/// forward + backward): the forward reads u, delta, z (D each per token) and B, C (N each) and
/// writes y (D); the backward reads the same inputs and dy and writes du, ddelta, dz, dB, dC. A,
/// D and delta_bias (D x N, D floats) are left out: they are read once, not per token.
pub fn scan_bytes(shape: &ScanShape, elem: f64) -> (f64, f64) {
    let tokens = shape.tokens() as f64;
    let (d, n) = (shape.d as f64, shape.n as f64);
    let forward = elem * tokens * (4.0 * d + 2.0 * n);
    let backward = elem * tokens * (4.0 * d + 2.0 * n) + elem * tokens * (3.0 * d + 2.0 * n);
    (forward, forward + backward)
}

/// The selective scan's exponentials (forward, forward + backward): one `exp(delta A)` per state
/// element (b, t, d, n) in the forward, and again in the backward, which recomputes the states
/// inside each chunk from the kept ones.
pub fn scan_exps(shape: &ScanShape) -> (f64, f64) {
    let n = shape.state_elements() as f64;
    (n, 2.0 * n)
}

/// The floor in ms of `amount` at `per_s`.
pub fn ms(amount: f64, per_s: f64) -> f64 {
    amount / per_s * 1e3
}

/// An attention-like row's floor: memory only.
pub fn attention_floor(shape: &Shape, elem: f64, rates: &Rates) -> Floor {
    let (fwd, all) = attention_bytes(shape, elem);
    let bw = rates.copy_bytes_per_s;
    Floor {
        fwd_ms: ms(fwd, bw),
        fwd_bwd_ms: ms(all, bw),
        arithmetic: format!(
            "memory: forward {:.1} MB, forward+backward {:.1} MB (q, k, v, g read, o written; \
             backward q, k, v, g, do read, dq, dk, dv, dg written; g, dg fp32) at {bw:.3e} B/s",
            fwd / 1e6,
            all / 1e6
        ),
    }
}

/// The scan's floor: the larger of its memory and exponential floors, each way.
pub fn scan_floor(shape: &ScanShape, elem: f64, rates: &Rates) -> Floor {
    let (fwd_bytes, all_bytes) = scan_bytes(shape, elem);
    let (fwd_exps, all_exps) = scan_exps(shape);
    let (bw, ex2) = (rates.copy_bytes_per_s, rates.ex2_per_s);
    let fwd = (ms(fwd_bytes, bw), ms(fwd_exps, ex2));
    let all = (ms(all_bytes, bw), ms(all_exps, ex2));
    Floor {
        fwd_ms: fwd.0.max(fwd.1),
        fwd_bwd_ms: all.0.max(all.1),
        arithmetic: format!(
            "max(memory, exp). memory: forward {:.1} MB (u, delta, z, B, C read, y written), \
             forward+backward {:.1} MB (+ u, delta, z, B, C, dy read, du, ddelta, dz, dB, dC \
             written) at {bw:.3e} B/s = {:.3} / {:.3} ms; exp: forward {:.3e} ex2 (one per \
             b, t, d, n), forward+backward {:.3e} (again in the backward's recompute) at \
             {ex2:.3e} ex2/s ({}) = {:.3} / {:.3} ms",
            fwd_bytes / 1e6,
            all_bytes / 1e6,
            fwd.0,
            all.0,
            fwd_exps,
            all_exps,
            rates.ex2_source,
            fwd.1,
            all.1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100() -> Rates {
        Rates::of(GpuSpec::lookup("NVIDIA H100 80GB HBM3").unwrap(), 132)
    }

    #[test]
    fn the_square_bf16_floor_is_34_bytes_per_element() {
        // 8 x 2048 x 16 x 128 in bf16: 12 B per element forward, 34 forward + backward; at
        // 3.0 TB/s that is the 0.38 ms floor flash-linear-attention's comparison uses.
        let s = Shape::parse("8x2048x16x128").unwrap();
        let n = s.qk_elements() as f64;
        let (fwd, all) = attention_bytes(&s, 2.0);
        assert_eq!((fwd / n, all / n), (12.0, 34.0));
        assert!((ms(all, 3.0e12) - 0.38).abs() < 0.005);
        assert!((attention_floor(&s, 2.0, &h100()).fwd_bwd_ms - 0.38).abs() < 0.005);
        // K != V: v, o, dv and do scale with V, the rest with K.
        let s = Shape::parse("1x1x1x1x2").unwrap();
        // Forward: q, k (2 B each), v, o (4 B each at V = 2), g (4 B); the backward reads as
        // much again and writes dq, dk (2 B each), dv (4 B), dg (4 B).
        assert_eq!(attention_bytes(&s, 2.0), (16.0, 44.0));
    }

    #[test]
    fn the_mamba_anchor_shape_is_bound_by_its_exponentials() {
        // 8 x 2048 x 2048 x 16, bf16: forward 2 B x 16384 tokens x (4 x 2048 + 2 x 16) = 269.5
        // MB (0.090 ms at 3.0 TB/s) against 5.37e8 ex2 at 132 x 16 x 1.98 GHz = 4.18e12/s
        // (0.128 ms); forward+backward 741 MB (0.247 ms) against 1.07e9 ex2 (0.257 ms).
        let s = ScanShape::parse("8x2048x2048x16").unwrap();
        let (fwd, all) = scan_bytes(&s, 2.0);
        assert_eq!(fwd, 2.0 * 16384.0 * (4.0 * 2048.0 + 32.0));
        assert_eq!(all, 2.0 * 16384.0 * (11.0 * 2048.0 + 96.0));
        assert_eq!(scan_exps(&s), (2f64.powi(29), 2f64.powi(30)));
        let rates = h100();
        assert_eq!(rates.ex2_per_s, 132.0 * 16.0 * 1.98e9);
        let f = scan_floor(&s, 2.0, &rates);
        assert!((f.fwd_ms - 0.1284).abs() < 0.001, "{}", f.fwd_ms);
        assert!((f.fwd_bwd_ms - 0.2568).abs() < 0.001, "{}", f.fwd_bwd_ms);
        assert!(
            f.arithmetic.contains("132 SMs x 16 ex2/clock x 1.980 GHz"),
            "{}",
            f.arithmetic
        );
        // fp32 moves twice the bytes: memory takes over.
        let f32 = scan_floor(&s, 4.0, &rates);
        assert!((f32.fwd_bwd_ms - ms(2.0 * all, 3.0e12)).abs() < 1e-9);
    }
}
