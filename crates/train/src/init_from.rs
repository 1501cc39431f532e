//! `model.init_from`: a fresh run starts from the weights of a Hugging Face model directory (a
//! `glatrain export`, or a published model of the matching class) instead of the
//! initialisation. The directory's `config.json` must agree with the run's `[model]` on every
//! key that fixes shapes and function, and its tensors with the model's parameters by name and
//! shape. A resumed run never reads it: the checkpoint's weights win.

use std::path::Path;

use glatrain_config::ResolvedConfig;
use glatrain_hub::ModelDir;
use tch::nn::VarStore;

use crate::error::TrainError;

/// Copies `model.init_from`'s weights into `vs` (the freshly built model) unless the run is
/// `resuming`; does nothing when the key is unset.
pub fn apply(cfg: &ResolvedConfig, vs: &VarStore, resuming: bool) -> Result<(), TrainError> {
    let Some(dir) = cfg.config.model.init_from() else {
        return Ok(());
    };
    if resuming {
        eprintln!(
            "note: model.init_from = {dir:?} is not read when resuming: the checkpoint's weights win"
        );
        return Ok(());
    }
    let wrap = |source| TrainError::InitFrom {
        source_name: cfg.source.clone(),
        dir: dir.to_string(),
        source: Box::new(source),
    };
    let hf = ModelDir::open(Path::new(dir)).map_err(wrap)?;
    hf.check_config(&cfg.config.model).map_err(wrap)?;
    let tensors = hf.load_into(vs).map_err(wrap)?;
    eprintln!(
        "initialised the model from {dir} ({}, {tensors} tensors)",
        hf.class().architecture
    );
    Ok(())
}
