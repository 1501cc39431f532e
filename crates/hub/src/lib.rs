//! The Hugging Face model-directory format, in one place: the `transformers` class of each
//! glatrain model type (flash-linear-attention's `GLAForCausalLM`, `LlamaForCausalLM`,
//! `MambaForCausalLM`), the parameter-name mapping per type, `config.json` out of and into a
//! `[model]` table, and writing and reading whole model directories.
//!
//! ```text
//! export: weights (glatrain names) --names--> model.safetensors (fp32, bf16 or fp16)
//!         [model] --config_json::to_json--> config.json (+ generation_config.json, tokenizer)
//! import: config.json --config_json::from_json--> [model] --differences with the run's--> refused?
//!         model.safetensors --names--> matched by name and shape --> copied into the VarStore
//! ```

pub mod config_json;
pub mod dtype;
pub mod error;
pub mod export;
pub mod import;
pub mod names;

pub use config_json::{class_of, HfClass};
pub use dtype::Dtype;
pub use error::{HubError, Mismatch};
pub use export::{write_model_dir, Export};
pub use import::ModelDir;
pub use names::NameMap;
