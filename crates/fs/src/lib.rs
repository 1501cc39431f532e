//! Files the way every glatrain crate writes them.
//!
//! - [`write_atomic`]: a file that readers see whole or not at all (configs, reports, metrics,
//!   compiled kernels, checkpoint parts);
//! - [`publish_dir`]: a directory built under a temporary name, then moved into place in one
//!   rename (checkpoints, prepared token shards);
//! - [`temporary_name`]: the temporaries of both, named by process so that writers never touch
//!   each other's, and [`remove_temporaries`] for the leftovers of writers that died;
//! - [`DirLock`]: one writer per directory (a run directory);
//! - [`cache_dir`]: where per-user caches live (compiled kernels, measured preflight decisions);
//! - [`sorted_names`]: a directory's entries in a fixed order.

mod atomic;
mod cache;
mod listing;
mod lock;

pub use atomic::{
    fsync_dir, is_temporary_name, publish_dir, remove_temporaries, temporary_name, write_atomic,
};
pub use cache::{cache_dir, cache_root};
pub use listing::sorted_names;
pub use lock::{DirLock, Holder, LockError, LOCK_FILE};
