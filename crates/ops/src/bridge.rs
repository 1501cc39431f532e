//! What the ops share around the autograd bridge (`glatrain_shim::autograd`): running an op
//! through it, and the tensors it hands back, with messages naming the op.

use glatrain_shim::autograd::{self, CustomOp};
use tch::{Kind, TchError, Tensor};

use crate::OpError;

/// Runs `op` (named `name` in messages) through the autograd bridge on `inputs`: its `N`
/// outputs.
pub(crate) fn apply<const N: usize>(
    name: &str,
    op: impl CustomOp + 'static,
    inputs: &[Option<&Tensor>],
) -> Result<[Tensor; N], OpError> {
    let outs = autograd::apply(Box::new(op), inputs).map_err(OpError::Autograd)?;
    let got = outs.len();
    outs.try_into().map_err(|_| {
        OpError::Autograd(format!(
            "{name}: the autograd bridge returned {got} outputs, expected {N}"
        ))
    })
}

/// The gradient flowing into a state output, as the kernels take it (f32, contiguous); `None`
/// where the state was not used.
pub(crate) fn state_grad(grad: Option<&Tensor>) -> Result<Option<Tensor>, TchError> {
    grad.map(|g| g.f_to_kind(Kind::Float)?.f_contiguous())
        .transpose()
}

/// The tensor the autograd bridge hands `op` back as `what`, or a message naming it.
pub(crate) fn bridged<'a>(
    op: &str,
    t: Option<&'a Tensor>,
    what: &str,
) -> Result<&'a Tensor, String> {
    t.ok_or_else(|| format!("{op}: {what} missing in the autograd bridge"))
}

/// The `N` entries of a list the autograd bridge hands `op` (`what`: "inputs", "saved
/// tensors"), or a message with the count it got.
pub(crate) fn bridged_list<'l, 'a, const N: usize>(
    op: &str,
    what: &str,
    list: &'l [Option<&'a Tensor>],
) -> Result<&'l [Option<&'a Tensor>; N], String> {
    list.try_into()
        .map_err(|_| format!("{op}: {N} {what} expected, got {}", list.len()))
}
