//! Where libtorch failures become [`TrainError`]s. The trainer's own tensor code uses tch's
//! fallible `f_` calls and maps their errors with [`torch_error`]; the models' forward passes
//! (which call tch's panicking methods) run inside [`catch_torch`], the one place that catches a
//! panic: its message becomes the error, and the panic hook prints nothing for it. Either way a
//! user reads libtorch's message without its C++ stack trace, and an allocation failure says
//! that memory ran out.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use tch::TchError;

use crate::error::TrainError;

thread_local! {
    /// Whether this thread is inside [`catch_torch`] (its panics are errors, not reports).
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (model forward/backward calls, model building) and returns its result, with a
/// `TchError` or a panic turned into [`TrainError::Torch`] naming `what` was being done.
pub fn catch_torch<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, TchError>,
) -> Result<T, TrainError> {
    quiet_hook();
    let outer = CATCHING.with(|c| c.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    match outcome {
        Ok(result) => result.map_err(torch_error(what)),
        Err(payload) => Err(TrainError::Torch {
            what: what.to_string(),
            message: clean_message(payload_text(payload.as_ref())),
        }),
    }
}

/// Maps a tch error of a fallible call to [`TrainError::Torch`] naming `what` was being done.
pub fn torch_error(what: &str) -> impl FnOnce(TchError) -> TrainError + '_ {
    move |e| TrainError::Torch {
        what: what.to_string(),
        message: match e {
            TchError::Torch(message) => clean_message(&message),
            other => clean_message(&other.to_string()),
        },
    }
}

/// Whether libtorch's message reports a failed allocation (host or device memory).
pub fn is_out_of_memory(message: &str) -> bool {
    message.contains("can't allocate memory") || message.contains("out of memory")
}

/// Installs, once per process, a panic hook that stays silent for panics inside
/// [`catch_torch`] and hands every other panic to the hook it replaces.
fn quiet_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

fn payload_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("")
}

/// libtorch's message without tch's wrapping (`called \`Result::unwrap()\` on an \`Err\` value:
/// Torch("...")`, escaped) and without the C++ stack trace (from a line `Exception raised
/// from ...` or `frame #0: ...` on).
fn clean_message(raw: &str) -> String {
    const UNWRAP: &str = "called `Result::unwrap()` on an `Err` value: ";
    let text = raw.strip_prefix(UNWRAP).unwrap_or(raw);
    let text = match text
        .strip_prefix("Torch(\"")
        .and_then(|t| t.strip_suffix("\")"))
    {
        // Debug formatting escaped it.
        Some(inner) => inner
            .replace("\\n", "\n")
            .replace("\\\"", "\"")
            .replace("\\'", "'"),
        None => text.to_string(),
    };
    let text = text.strip_prefix("Internal torch error: ").unwrap_or(&text);
    let message: Vec<&str> = text
        .lines()
        .take_while(|line| {
            !line.starts_with("Exception raised from") && !line.starts_with("frame #")
        })
        .collect();
    let message = message.join("\n").trim().to_string();
    if message.is_empty() {
        "(libtorch gave no message)".into()
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// An allocation no machine can make (16 TiB), through a panicking tch call as the models
    /// make them: an error that says memory ran out, with libtorch's first line only.
    #[test]
    fn a_failed_allocation_inside_the_boundary_is_an_error() {
        let err = catch_torch("the forward pass", || {
            Ok(Tensor::zeros([1 << 42], (Kind::Float, Device::Cpu)))
        })
        .unwrap_err();
        let TrainError::Torch { what, message } = &err else {
            panic!("{err}")
        };
        assert_eq!(what, "the forward pass");
        assert!(is_out_of_memory(message), "{message}");
        assert!(
            !message.contains("frame #") && !message.contains("Exception raised"),
            "{message:?}"
        );
        assert!(!err.is_bad_input());
        let shown = err.to_string();
        assert!(
            shown.starts_with("the forward pass failed: ") && shown.contains("out of memory"),
            "{shown}"
        );
    }

    #[test]
    fn fallible_calls_and_other_panics_become_errors_too() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let err = catch_torch("a product", || a.f_matmul(&a)).unwrap_err();
        assert!(err.to_string().contains("a product failed"), "{err}");
        let err = catch_torch("a view", || Ok(a.view([7]))).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("shape '[7]' is invalid"), "{shown}");
        assert!(!shown.contains("Exception raised"), "{shown}");
        let err = catch_torch::<()>("an assertion", || panic!("plain")).unwrap_err();
        assert!(err.to_string().ends_with(": plain"), "{err}");
        assert_eq!(catch_torch("nothing", || Ok(3)).unwrap(), 3);
        // Outside the boundary panics still reach the previous hook (and the test harness).
        assert!(!CATCHING.with(Cell::get));
    }

    #[test]
    fn messages_lose_the_wrapping_and_the_stack_trace() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"DefaultCPUAllocator: \
                   can't allocate memory: you tried to allocate 8 bytes.\\nException raised \
                   from allocate at alloc.cpp:1 (most recent call first):\\nframe #0: x\")";
        assert_eq!(
            clean_message(raw),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."
        );
        let enforce = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't \
                       allocate memory: you tried to allocate 8 bytes.\nframe #0: c10::x() + 0x6a";
        assert_eq!(
            clean_message(enforce),
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate \
             memory: you tried to allocate 8 bytes."
        );
        assert_eq!(clean_message(""), "(libtorch gave no message)");
    }
}
