//! What the CUDA kernel tests share.

use glatrain_ops::launch::set_poison_outputs;
use tch::Device;

/// The CUDA device with kernel output buffers poisoned with NaN (an unwritten element then fails
/// the comparison), or `None` after printing that the test is skipped.
pub fn cuda() -> Option<Device> {
    let dev = glatrain_testing::cuda_or_skip()?;
    set_poison_outputs(true);
    Some(dev)
}
