//! Small helpers shared by the reference ops: compute dtype, chunk padding and causal masks.

use tch::{Device, Kind, Tensor};

/// The dtype the references compute and keep states in: f64 if any input is f64, else fp32.
pub(crate) fn compute_kind(inputs: &[&Tensor], initial_state: Option<&Tensor>) -> Kind {
    if inputs
        .iter()
        .copied()
        .chain(initial_state)
        .any(|x| x.kind() == Kind::Double)
    {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// `ceil(a / b)` for positive integers.
pub(crate) fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Pads dimension 1 (time) of a sequence-first tensor with zeros up to `len` and splits it into
/// chunks of `chunk` steps.
///
/// # Shapes
/// `[B, T, ...rest]` -> `[B, len / chunk, chunk, ...rest]`; `len` is a multiple of `chunk`, >= T.
pub(crate) fn pad_and_chunk(x: &Tensor, len: i64, chunk: i64) -> Tensor {
    let size = x.size();
    let pad = len - size[1];
    let x = if pad > 0 {
        // constant_pad_nd lists (before, after) pairs from the last dimension backwards.
        let mut pads = vec![0i64; 2 * (size.len() - 1)];
        pads[2 * (size.len() - 2) + 1] = pad;
        x.constant_pad_nd(pads)
    } else {
        x.shallow_clone()
    };
    let mut shape = vec![size[0], len / chunk, chunk];
    shape.extend_from_slice(&size[2..]);
    x.reshape(shape)
}

/// `true` strictly above the diagonal (`s > t` for row t, column s): the positions a causal
/// segment sum must drop, masked to -inf before `exp`.
///
/// # Shapes
/// `[n, n]`, Bool.
pub(crate) fn future_mask(n: i64, device: Device) -> Tensor {
    Tensor::ones([n, n], (Kind::Bool, device)).triu(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_chunk_appends_zeros_at_the_end() {
        let x = Tensor::arange(10, (Kind::Float, Device::Cpu)).reshape([1, 5, 2]) + 1.0;
        let chunks = pad_and_chunk(&x, 8, 4);
        assert_eq!(chunks.size(), [1, 2, 4, 2]);
        let flat = chunks.reshape([1, 8, 2]);
        assert_eq!(glatrain_testing::rel_rms(&flat.narrow(1, 0, 5), &x), 0.0);
        assert_eq!(
            flat.narrow(1, 5, 3)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }

    #[test]
    fn future_mask_is_strictly_upper() {
        let m = future_mask(3, Device::Cpu).to_kind(Kind::Int64);
        let expected = Tensor::from_slice(&[0i64, 1, 1, 0, 0, 1, 0, 0, 0]).reshape([3, 3]);
        assert!(m.equal(&expected));
    }

    #[test]
    fn compute_kind_promotes_only_to_f64() {
        let f = Tensor::zeros([1], (Kind::BFloat16, Device::Cpu));
        let d = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        assert_eq!(compute_kind(&[&f], None), Kind::Float);
        assert_eq!(compute_kind(&[&f], Some(&d)), Kind::Double);
    }
}
