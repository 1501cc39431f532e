//! `glatrain export`: a checkpoint written as a Hugging Face model directory (the format is
//! `glatrain_hub`'s; this reads the checkpoint and the run's tokenizer).

use std::path::{Path, PathBuf};

use glatrain_data::{Tokenizer, TokenizerSpec};
use glatrain_hub::{write_model_dir, Dtype, Export};

use crate::checkpoint;
use crate::error::TrainError;
use crate::eval::resolve_checkpoint;

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The checkpoint exported.
    pub checkpoint: PathBuf,
    /// The model directory written.
    pub out: PathBuf,
    /// The `transformers` class, e.g. `GLAForCausalLM`.
    pub architecture: &'static str,
    pub dtype: Dtype,
    /// The files written, by name.
    pub files: Vec<&'static str>,
}

/// Writes the checkpoint at `checkpoint` (a `step-N` directory, or a run directory: its newest
/// complete checkpoint) as a model directory at `out`, its weights in `dtype`. The run's
/// tokenizer goes along when it is a `tokenizer.json`. `out` must not exist unless `force`
/// (which replaces only a model directory).
pub fn export(
    checkpoint: &Path,
    out: &Path,
    dtype: Dtype,
    force: bool,
) -> Result<ExportSummary, TrainError> {
    let dir = resolve_checkpoint(checkpoint)?;
    checkpoint::verify(&dir)?;
    let cfg = glatrain_config::load(dir.join(checkpoint::CONFIG_FILE), &[])?;
    let tokenizer = match cfg.config.data.tokenizer.parse::<TokenizerSpec>()? {
        TokenizerSpec::File(path) => {
            // Loading it checks that it is a tokenizer before it is copied.
            Tokenizer::from_file(&path)?;
            Some(path)
        }
        TokenizerSpec::Byte | TokenizerSpec::Bpe { .. } => None,
    };
    let weights = checkpoint::read_tensors(&dir.join(checkpoint::WEIGHTS_FILE))?;
    let model = &cfg.config.model;
    let spec = Export {
        model,
        seq_len: cfg.config.data.seq_len,
        weights: &weights,
        dtype,
        tokenizer: tokenizer.as_deref(),
    };
    let files = write_model_dir(out, &spec, force)?;
    Ok(ExportSummary {
        checkpoint: dir,
        out: out.to_path_buf(),
        architecture: glatrain_hub::class_of(model).architecture,
        dtype,
        files,
    })
}
