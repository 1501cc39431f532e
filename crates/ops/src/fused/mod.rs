//! Fused training ops on activations, each one CUDA kernel per direction (`kernels/fused.cu`)
//! with a tensor-op reference that the CPU runs and the tests compare against:
//!
//! - [`rms_norm`]: RMSNorm with an optional swish gate, `x * rstd * w [* silu(g)]`
//!   (flash-linear-attention's `RMSNorm` and `FusedRMSNormGated`);
//! - [`swiglu`]: `silu(a) * b`, the SwiGLU feed-forward block's activation;
//! - [`causal_conv`]: the causal depthwise convolution with silu (Mamba's `conv1d`, GLA's short
//!   convolutions), over whole rows or packed documents;
//! - [`swiglu_linear`] and [`rms_norm_linear`]: SwiGLU or RMSNorm and the matrix products after
//!   it, whose backward computes the activation again instead of keeping the products' input;
//! - [`rotary`]: the rotary position embedding of queries and keys, on their `[B, T, H, D]`
//!   layout.
//!
//! On CUDA each runs as one autograd op whose backward keeps only its inputs (and RMSNorm's fp32
//! statistic per row), in their own dtypes, where the unfused tensor ops kept fp32 copies and
//! intermediates. The math is fp32 and the outputs are rounded once, to the activation dtype.

pub mod conv;
pub mod norm;
pub mod projected;
pub mod rotary;
pub mod swiglu;

pub use conv::causal_conv;
pub use norm::rms_norm;
pub use projected::{rms_norm_linear, swiglu_linear};
pub use rotary::rotary;
pub use swiglu::swiglu;

use glatrain_cuda::{CudaError, Gpu, KernelDtype, KernelSource};
use tch::{Kind, Tensor};

use crate::launch::kernel_dtype;
use crate::OpError;

/// `kernels/fused.cu`. Entry points in the order of their `KERNEL_INDEX`.
pub static FUSED: KernelSource = KernelSource {
    file: "fused.cu",
    embedded: include_str!("../../../../kernels/fused.cu"),
    kernels: &[
        "rms_norm_fwd",
        "rms_norm_bwd",
        "column_sums",
        "swiglu_fwd",
        "swiglu_bwd",
        "causal_conv_fwd",
        "causal_conv_bwd",
        "rotary",
    ],
    dtypes: &KernelDtype::ALL,
};

/// Compiles (or reads from the disk cache) and loads the fused kernels for activations of `kind`
/// on CUDA device `ordinal`, so that the first call does not wait for NVRTC; with `optimised`,
/// also waits for the Full tier. Nothing to do for dtypes without kernels.
pub fn prepare(ordinal: usize, kind: Kind, optimised: bool) -> Result<(), CudaError> {
    let Some(dtype) = kernel_dtype(kind) else {
        return Ok(());
    };
    let dev = Gpu::get(ordinal)?;
    if optimised {
        dev.prepare_final(&FUSED, dtype)
    } else {
        dev.prepare(&FUSED, dtype)
    }
}

/// Elements of `dtype` in one 16-byte access (`VEC` in fused.cu).
fn vec_width(dtype: KernelDtype) -> i64 {
    match dtype {
        KernelDtype::F32 => 4,
        KernelDtype::Bf16 | KernelDtype::F16 => 8,
    }
}

/// Whether every tensor's data starts on a 16-byte boundary (the kernels' vector accesses).
fn aligned(tensors: &[Option<&Tensor>]) -> bool {
    tensors
        .iter()
        .flatten()
        .all(|t| t.data_ptr() as usize % 16 == 0)
}

/// `t` as a contiguous tensor of `kind`: `t` itself where it is one, else a converted copy.
fn contiguous(t: &Tensor, kind: Kind) -> Result<Tensor, OpError> {
    Ok(if t.kind() == kind && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.f_to_kind(kind)?.f_contiguous()?
    })
}

/// `n` as a kernel's 32-bit `int` argument, or an error naming `what` and the limit.
fn int32(kernel: &str, what: &str, n: i64) -> Result<i32, OpError> {
    i32::try_from(n).map_err(|_| {
        OpError::Cuda(CudaError::Limit {
            kernel: kernel.to_string(),
            what: format!("{what} = {n} is past the kernels' 32-bit sizes (2^31 - 1)"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_its_own_program() {
        for (i, name) in FUSED.kernels.iter().enumerate() {
            let guard = format!("#if WANT_KERNEL({i})\n");
            let section = FUSED.embedded.split_once(&guard).map(|(_, rest)| rest);
            let section = section.and_then(|rest| rest.split_once("#endif"));
            let (section, _) = section.unwrap_or_else(|| panic!("{name}: no {guard}"));
            assert!(section.contains(&format!("ENTRY({name})(")), "{name}");
        }
    }

    #[test]
    fn preparing_a_dtype_without_kernels_touches_no_gpu() {
        prepare(0, Kind::Double, true).unwrap();
    }

    #[test]
    fn sizes_past_32_bits_name_the_limit() {
        assert_eq!(int32("k", "n", 7).unwrap(), 7);
        let err = int32("rms_norm_fwd", "rows", 1 << 31).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rms_norm_fwd") && msg.contains("rows = 2147483648"),
            "{msg}"
        );
    }
}
