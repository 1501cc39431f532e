//! Files the way every glatrain crate writes them.
//!
//! - [`write_atomic`]: a file that readers see whole or not at all (configs, reports, metrics,
//!   compiled kernels, checkpoint parts);
//! - [`publish_dir`]: a directory built under a temporary name, then moved into place in one
//!   rename (checkpoints, prepared token shards);
//! - [`cache_dir`]: where per-user caches live (compiled kernels, measured preflight decisions).

mod atomic;
mod cache;

pub use atomic::{fsync_dir, publish_dir, temporary_name, write_atomic};
pub use cache::{cache_dir, cache_root};
