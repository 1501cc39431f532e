//! Reading a Hugging Face model directory into a built model: `config.json` checked against the
//! run's `[model]`, then every tensor of `model.safetensors` (or of the files that
//! `model.safetensors.index.json` lists) matched by name and shape against the model's
//! parameters and copied in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use glatrain_config::ModelConfig;
use serde::Deserialize;
use serde_json::Value;
use tch::nn::VarStore;
use tch::Tensor;

use crate::config_json::{class_of, differences, from_json, gla_norm_unfused, HfClass};
use crate::error::HubError;
use crate::export::{read_err, CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
use crate::names::{NameMap, GLA_UNFUSED_NORM_SEGMENTS};

/// A model directory opened for import: its `config.json` read as a glatrain `[model]` table.
#[derive(Debug)]
pub struct ModelDir {
    dir: PathBuf,
    config_path: PathBuf,
    model: ModelConfig,
    class: HfClass,
    names: NameMap,
}

/// A tensor of the directory's weights.
struct HfTensor {
    /// Its name in the file.
    hf_name: String,
    /// The file it is in.
    file: PathBuf,
    tensor: Tensor,
}

/// `model.safetensors.index.json`: which file holds each tensor.
#[derive(Deserialize)]
struct WeightIndex {
    weight_map: BTreeMap<String, String>,
}

impl ModelDir {
    /// Reads `dir/config.json`; errors name the file, the key and the value.
    pub fn open(dir: &Path) -> Result<Self, HubError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&config_path).map_err(read_err(&config_path))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| HubError::json(&config_path, e))?;
        let model = from_json(&json, &config_path)?;
        let names = match model {
            ModelConfig::Gla(_) if gla_norm_unfused(&json) => {
                NameMap::with_segments(GLA_UNFUSED_NORM_SEGMENTS)
            }
            _ => NameMap::for_model(&model),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            class: class_of(&model),
            config_path,
            model,
            names,
        })
    }

    /// The `[model]` table the directory's `config.json` describes.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    /// The directory's `transformers` class.
    pub fn class(&self) -> HfClass {
        self.class
    }

    /// Refuses a directory whose class or shape- and function-fixing keys differ from `ours`,
    /// naming each differing key with both values.
    pub fn check_config(&self, ours: &ModelConfig) -> Result<(), HubError> {
        let expected = class_of(ours);
        if expected != self.class {
            return Err(HubError::WrongClass {
                path: self.config_path.clone(),
                found: format!("{:?}", self.class.model_type),
                ours: ours.type_name(),
                expected: expected.model_type,
            });
        }
        let mismatches = differences(ours, &self.model);
        if !mismatches.is_empty() {
            return Err(HubError::ConfigMismatch {
                path: self.config_path.clone(),
                mismatches,
            });
        }
        Ok(())
    }

    /// Copies the directory's weights into `vs` (a model built from a config that passed
    /// [`ModelDir::check_config`]), converting them to the variables' dtype. Every parameter
    /// must be there with its shape, and nothing else; a tied output head stored anyway is
    /// accepted when it equals the embedding. Returns the number of tensors copied.
    pub fn load_into(&self, vs: &VarStore) -> Result<usize, HubError> {
        let (weights_path, files) = self.weight_files()?;
        let mut found: BTreeMap<String, HfTensor> = BTreeMap::new();
        for file in files {
            let tensors = Tensor::read_safetensors(&file).map_err(|e| HubError::Tensors {
                path: file.clone(),
                message: e.to_string(),
            })?;
            for (hf_name, tensor) in tensors {
                if NameMap::is_ignored_hf(&hf_name) {
                    continue;
                }
                let ours = self.names.from_hf(&hf_name);
                let file = file.clone();
                found.insert(
                    ours,
                    HfTensor {
                        hf_name,
                        file,
                        tensor,
                    },
                );
            }
        }
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        self.drop_tied_head(&mut found, &vars)?;
        for (name, var) in &vars {
            let Some(hf) = found.get(name) else {
                return Err(HubError::MissingTensor {
                    path: weights_path,
                    name: self.names.to_hf(name),
                    shape: var.size(),
                });
            };
            if hf.tensor.size() != var.size() {
                return Err(HubError::TensorShape {
                    path: hf.file.clone(),
                    name: hf.hf_name.clone(),
                    found: hf.tensor.size(),
                    expected: var.size(),
                });
            }
        }
        let params: BTreeSet<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
        if let Some(extra) = found
            .iter()
            .find(|(name, _)| !params.contains(name.as_str()))
        {
            let hf = extra.1;
            return Err(HubError::UnexpectedTensor {
                path: hf.file.clone(),
                name: hf.hf_name.clone(),
                shape: hf.tensor.size(),
            });
        }
        tch::no_grad(|| -> Result<(), HubError> {
            for (name, var) in &vars {
                let mut var = var.shallow_clone();
                var.f_copy_(&found[name].tensor)?;
            }
            Ok(())
        })?;
        Ok(vars.len())
    }

    /// The weights files, and the path that names them in messages (the single file, or the
    /// index of a split one).
    fn weight_files(&self) -> Result<(PathBuf, Vec<PathBuf>), HubError> {
        let single = self.dir.join(WEIGHTS_FILE);
        if single.is_file() {
            return Ok((single.clone(), vec![single]));
        }
        let index_path = self.dir.join(WEIGHTS_INDEX_FILE);
        if !index_path.is_file() {
            return Err(HubError::Tensors {
                path: self.dir.clone(),
                message: format!(
                    "no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (glatrain reads safetensors \
                     weights; convert a pytorch_model.bin with save_pretrained first)"
                ),
            });
        }
        let text = fs::read_to_string(&index_path).map_err(read_err(&index_path))?;
        let index: WeightIndex =
            serde_json::from_str(&text).map_err(|e| HubError::json(&index_path, e))?;
        let files: BTreeSet<&String> = index.weight_map.values().collect();
        let files = files.into_iter().map(|f| self.dir.join(f)).collect();
        Ok((index_path, files))
    }

    /// Removes `lm_head.weight` from `found` when the model ties it to the embedding (it has
    /// no such parameter) and the file's copy equals the embedding.
    fn drop_tied_head(
        &self,
        found: &mut BTreeMap<String, HfTensor>,
        vars: &[(String, Tensor)],
    ) -> Result<(), HubError> {
        const HEAD: &str = "lm_head.weight";
        if vars.iter().any(|(name, _)| name == HEAD) || !found.contains_key(HEAD) {
            return Ok(());
        }
        let embedding = found
            .iter()
            .find(|(name, _)| name.ends_with("embeddings.weight"))
            .map(|(_, hf)| &hf.tensor);
        let same = match embedding {
            Some(e) => e.size() == found[HEAD].tensor.size() && e.f_equal(&found[HEAD].tensor)?,
            None => false,
        };
        if same {
            found.remove(HEAD);
        }
        Ok(())
    }
}
