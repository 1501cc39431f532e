//! Memory floors: the fewest bytes an op must move through device memory (each input read once,
//! each output written once), over the bandwidth a large device-to-device copy reaches.

use crate::op::Shape;

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

/// The floor in ms of `bytes` at `bytes_per_s`.
pub fn ms(bytes: f64, bytes_per_s: f64) -> f64 {
    bytes / bytes_per_s * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_square_bf16_floor_is_34_bytes_per_element() {
        // 8 x 2048 x 16 x 128 in bf16: 12 B per element forward, 34 forward + backward; at
        // 3.0 TB/s that is the 0.38 ms floor flash-linear-attention's comparison uses.
        let s = Shape::parse("8x2048x16x128").unwrap();
        let n = s.qk_elements() as f64;
        let (fwd, all) = attention_bytes(&s, 2.0);
        assert_eq!((fwd / n, all / n), (12.0, 34.0));
        assert!((ms(all, 3.0e12) - 0.38).abs() < 0.005);
        // K != V: v, o, dv and do scale with V, the rest with K.
        let s = Shape::parse("1x1x1x1x2").unwrap();
        // Forward: q, k (2 B each), v, o (4 B each at V = 2), g (4 B); the backward reads as
        // much again and writes dq, dk (2 B each), dv (4 B), dg (4 B).
        assert_eq!(attention_bytes(&s, 2.0), (16.0, 44.0));
    }
}
