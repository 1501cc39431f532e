//! Calls into the C++ shim (`csrc/shim.cpp`) that report failure through a message buffer.

use std::ffi::{c_char, c_int, CStr};

/// Room for a message from the shim (a longer one is cut short).
const MESSAGE_LEN: usize = 8192;

/// Runs `call` with a message buffer and its length; a non-zero status becomes the message the
/// shim wrote there (NUL-terminated, or nothing).
pub(crate) fn checked(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    // On the stack: the GLA forward calls this on its way to the first kernel.
    let mut err = [0 as c_char; MESSAGE_LEN];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the buffer starts zeroed and the shim writes at most its length, NUL-terminated.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}
