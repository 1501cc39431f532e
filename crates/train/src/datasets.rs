//! Opening the token sources a run reads: `data.train` / `data.valid` ("embedded" or a path to a
//! prepared directory or shard), tokenized with `data.tokenizer` where text is involved.

use std::path::Path;
use std::sync::Arc;

use glatrain_config::ResolvedConfig;
use glatrain_data::{Dataset, OpenOptions, TokenSource, Tokenizer, TokenizerSpec};

use crate::error::TrainError;

/// The configured tokenizer (`byte` or a tokenizer.json path).
pub fn open_tokenizer(cfg: &ResolvedConfig) -> Result<Tokenizer, TrainError> {
    let spec: TokenizerSpec = cfg.config.data.tokenizer.parse()?;
    Ok(Tokenizer::from_spec(&spec)?)
}

/// Token sources opened lazily: the embedded corpus is tokenized at most once.
#[derive(Debug)]
pub struct SourceOpener<'a> {
    cfg: &'a ResolvedConfig,
    embedded: Option<Dataset>,
}

impl<'a> SourceOpener<'a> {
    pub fn new(cfg: &'a ResolvedConfig) -> Self {
        Self {
            cfg,
            embedded: None,
        }
    }

    fn embedded(&mut self) -> Result<&Dataset, TrainError> {
        if self.embedded.is_none() {
            let tokenizer = open_tokenizer(self.cfg)?;
            self.embedded = Some(Dataset::embedded(&tokenizer)?);
        }
        Ok(self.embedded.as_ref().expect("set above"))
    }

    /// The training source of `spec`.
    pub fn train(&mut self, spec: &str) -> Result<Arc<TokenSource>, TrainError> {
        let source = if spec == "embedded" {
            Arc::clone(&self.embedded()?.train)
        } else {
            Dataset::open(Path::new(spec), OpenOptions::default())?.train
        };
        self.check_vocab(&source)?;
        Ok(source)
    }

    /// The validation source of `spec`: the embedded validation split, a dataset directory's
    /// `valid` split, or (a directory without one, or a single file) all of its tokens.
    pub fn valid(&mut self, spec: &str) -> Result<Arc<TokenSource>, TrainError> {
        let source = if spec == "embedded" {
            Arc::clone(
                self.embedded()?
                    .valid
                    .as_ref()
                    .expect("the embedded corpus has a validation split"),
            )
        } else {
            let data = Dataset::open(Path::new(spec), OpenOptions::default())?;
            data.valid.unwrap_or_else(|| {
                eprintln!("note: {spec} has no validation split: evaluating on all of its tokens");
                data.train
            })
        };
        self.check_vocab(&source)?;
        Ok(source)
    }

    fn check_vocab(&self, source: &TokenSource) -> Result<(), TrainError> {
        source.check_vocab(self.cfg.config.model.vocab_size() as u32)?;
        Ok(())
    }
}
