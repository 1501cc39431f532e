//! glatrain's data layer: the embedded Brown corpus, corpus readers (text, JSON Lines, parquet;
//! gzip or zstd), tokenizers (bytes, Hugging Face tokenizer.json, BPE training), `prepare`
//! (streaming corpus -> token shards with a manifest), and deterministic, resumable batch
//! loading. Pure Rust: no libtorch here; batches are plain `i64` vectors.
//!
//! Typical use:
//!
//! ```no_run
//! use std::sync::Arc;
//! use glatrain_data::{BatchLoader, Dataset, EvalBatches, OpenOptions};
//!
//! # fn main() -> Result<(), glatrain_data::DataError> {
//! let data = Dataset::open("data/brown-bpe".as_ref(), OpenOptions::default())?;
//! data.train.check_vocab(32000)?;
//! let mut loader = BatchLoader::new(Arc::clone(&data.train), 8, 512, 1234)?;
//! let batch = loader.next_batch(); // inputs / targets: [8, 512] row-major
//! let state = loader.state(); // store in the checkpoint; BatchLoader::with_state resumes
//! if let Some(valid) = &data.valid {
//!     for batch in EvalBatches::new(valid, 8, 512, Some(20))? {
//!         let _ = batch.targets;
//!     }
//! }
//! # let _ = (batch, state);
//! # Ok(())
//! # }
//! ```

pub mod byte_level_bpe;
pub mod document_starts;
pub mod documents;
pub mod embedded;
pub mod error;
pub mod inputs;
pub mod loader;
pub mod manifest;
pub mod prepare;
mod progress;
pub mod settings;
pub mod shard;
pub mod source;
pub mod tokenizer;

pub use document_starts::DocumentStarts;
pub use error::{DataError, Result};
pub use inputs::{BadRecord, Location, Problem};
pub use loader::{Batch, BatchLoader, EvalBatches, LoaderState};
pub use manifest::Manifest;
pub use prepare::{
    prepare, prepare_embedded, OnBadRecord, PrepareOptions, PrepareReport, PrepareStats,
    DEFAULT_SHARD_TOKENS, DEFAULT_VALID_FRACTION,
};
pub use progress::ProgressDisplay;
pub use settings::DataSettings;
pub use source::{bits_per_byte, Dataset, OpenOptions, TokenSource};
pub use tokenizer::{train_bpe, Tokenizer, TokenizerSpec};
