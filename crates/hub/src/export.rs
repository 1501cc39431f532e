//! Writing a Hugging Face model directory:
//!
//! | file | contents |
//! |---|---|
//! | `config.json` | the class's config ([`crate::config_json::to_json`]) |
//! | `generation_config.json` | token ids (none: glatrain trains on plain token streams) |
//! | `model.safetensors` | the weights under the class's names, in the chosen dtype; a tied head is left out |
//! | `tokenizer.json`, `tokenizer_config.json` | with a Hugging Face tokenizer only: a copy, and a minimal config naming `PreTrainedTokenizerFast` |
//!
//! The directory is built under a temporary name beside the target and published with one
//! rename, so a reader (or a crash) sees the whole directory or none.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use glatrain_config::ModelConfig;
use serde_json::{json, Value};
use tch::{Device, Tensor};

use crate::config_json::to_json;
use crate::dtype::Dtype;
use crate::error::HubError;
use crate::names::NameMap;

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of weights split over several files (`model-00001-of-00002.safetensors`, ...), as
/// larger published models come; read, never written.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// What to export.
#[derive(Debug)]
pub struct Export<'a> {
    /// The model's config.
    pub model: &'a ModelConfig,
    /// The training context length: `max_position_embeddings` and the tokenizer's
    /// `model_max_length`.
    pub seq_len: usize,
    /// The weights under glatrain's names (a checkpoint's `weights.safetensors`).
    pub weights: &'a BTreeMap<String, Tensor>,
    pub dtype: Dtype,
    /// The run's `tokenizer.json`; `None` for the byte tokenizer, which has no such file.
    pub tokenizer: Option<&'a Path>,
}

/// Writes `export` as a model directory at `out`. `out` must not exist, unless `force`, and
/// then only a model directory (one with a `config.json`) is replaced. Returns the files
/// written, by name.
pub fn write_model_dir(
    out: &Path,
    export: &Export<'_>,
    force: bool,
) -> Result<Vec<&'static str>, HubError> {
    if out.exists() {
        if !force {
            return Err(HubError::OutputExists {
                path: out.to_path_buf(),
            });
        }
        if !out.join(CONFIG_FILE).is_file() {
            return Err(HubError::NotAModelDir {
                path: out.to_path_buf(),
            });
        }
    }
    // Refusals (an unexportable model, a missing tokenizer) come before anything is written.
    let config = to_json(export.model, export.seq_len, export.dtype)?;
    let tokenizer = export
        .tokenizer
        .map(|path| fs::read(path).map_err(read_err(path)))
        .transpose()?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(write_err(parent))?;
    let tmp = glatrain_fs::temporary_name(out);
    fs::create_dir(&tmp).map_err(write_err(&tmp))?;
    let written = fill(&tmp, export, &config, tokenizer.as_deref()).and_then(|files| {
        glatrain_fs::publish_dir(&tmp, out).map_err(write_err(out))?;
        Ok(files)
    });
    if written.is_err() {
        // Best effort: the half-written directory is useless; the error is what matters.
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// Writes every file of the model directory into `dir`.
fn fill(
    dir: &Path,
    export: &Export<'_>,
    config: &Value,
    tokenizer: Option<&[u8]>,
) -> Result<Vec<&'static str>, HubError> {
    let mut files = vec![CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE];
    write_json(&dir.join(CONFIG_FILE), config)?;
    let generation = json!({
        "_from_model_config": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
    });
    write_json(&dir.join(GENERATION_CONFIG_FILE), &generation)?;
    write_weights(&dir.join(WEIGHTS_FILE), export)?;
    if let Some(bytes) = tokenizer {
        write_file(&dir.join(TOKENIZER_FILE), bytes)?;
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": export.seq_len,
            "clean_up_tokenization_spaces": false,
        });
        write_json(&dir.join(TOKENIZER_CONFIG_FILE), &tokenizer_config)?;
        files.extend([TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]);
    }
    Ok(files)
}

/// One tensor's bytes for the safetensors writer.
struct Bytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Bytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `model.safetensors`: every weight renamed, cast to the dtype, with the `format: pt` metadata
/// that `save_pretrained` writes.
fn write_weights(path: &Path, export: &Export<'_>) -> Result<(), HubError> {
    let names = NameMap::for_model(export.model);
    let (kind, dtype) = match export.dtype {
        Dtype::Fp32 => (tch::Kind::Float, safetensors::Dtype::F32),
        Dtype::Bf16 => (tch::Kind::BFloat16, safetensors::Dtype::BF16),
        Dtype::Fp16 => (tch::Kind::Half, safetensors::Dtype::F16),
    };
    let mut tensors = Vec::with_capacity(export.weights.len());
    for (name, tensor) in export.weights {
        let t = tensor
            .f_to_device(Device::Cpu)?
            .f_to_kind(kind)?
            .f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        tensors.push((names.to_hf(name), Bytes { dtype, shape, data }));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = tensors.iter().map(|(name, bytes)| (name.as_str(), bytes));
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| HubError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(write_err(path))
}

fn write_json(path: &Path, value: &Value) -> Result<(), HubError> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    write_file(path, text.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    let mut file = fs::File::create(path).map_err(write_err(path))?;
    file.write_all(bytes).map_err(write_err(path))?;
    file.sync_all().map_err(write_err(path))
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Write {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Read {
        path: path.to_path_buf(),
        source,
    }
}
