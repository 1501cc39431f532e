//! Opening the token sources a run reads: `data.train` / `data.valid` ("embedded" or a path to a
//! prepared directory or shard), tokenized with `data.tokenizer` where text is involved. A
//! prepared directory must have been tokenized by `data.tokenizer` (its manifest says by which),
//! so that what `sample` and `eval` decode and encode means what the model learned. With
//! `data.document_boundaries`, the data must record where its documents begin.

use std::path::Path;
use std::sync::Arc;

use glatrain_config::ResolvedConfig;
use glatrain_data::manifest::{MANIFEST_FILE, MANIFEST_VERSION};
use glatrain_data::{Dataset, OpenOptions, TokenSource, Tokenizer, TokenizerSpec};

use crate::error::TrainError;

/// The configured tokenizer (`byte` or a tokenizer.json path).
pub fn open_tokenizer(cfg: &ResolvedConfig) -> Result<Tokenizer, TrainError> {
    let spec: TokenizerSpec = cfg.config.data.tokenizer.parse()?;
    Ok(Tokenizer::from_spec(&spec)?)
}

/// The configured tokenizer, checked against the model: every id it produces must have an
/// embedding.
pub fn open_tokenizer_for_model(cfg: &ResolvedConfig) -> Result<Tokenizer, TrainError> {
    let tokenizer = open_tokenizer(cfg)?;
    let vocab = cfg.config.model.vocab_size();
    if tokenizer.vocab_size() as usize > vocab {
        return Err(TrainError::BadValue {
            source_name: cfg.source.clone(),
            key: "model.vocab_size",
            value: vocab.to_string(),
            reason: format!(
                "data.tokenizer ({}) has {} token ids; the model needs an embedding for each",
                tokenizer.describe(),
                tokenizer.vocab_size()
            ),
        });
    }
    Ok(tokenizer)
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
        let dataset = match self.embedded.take() {
            Some(dataset) => dataset,
            None => Dataset::embedded(&open_tokenizer(self.cfg)?)?,
        };
        Ok(self.embedded.insert(dataset))
    }

    /// The prepared dataset at `spec` (the value of config key `key`), checked to have been
    /// tokenized by `data.tokenizer` and, with `data.document_boundaries`, to record where its
    /// documents begin.
    fn open(&self, key: &'static str, spec: &str) -> Result<Dataset, TrainError> {
        let data = Dataset::open(Path::new(spec), OpenOptions::default())?;
        self.check_tokenizer(key, spec, &data)?;
        self.check_document_starts(key, spec, &data)?;
        Ok(data)
    }

    /// With `data.document_boundaries`, refuses data that does not record where its documents
    /// begin (a dataset's splits record them alike: the train split answers for both).
    fn check_document_starts(
        &self,
        key: &str,
        spec: &str,
        data: &Dataset,
    ) -> Result<(), TrainError> {
        if !self.cfg.config.data.document_boundaries || data.train.has_document_starts() {
            return Ok(());
        }
        let (what, remedy) = match (&data.manifest, &data.root) {
            (Some(manifest), Some(root)) => (
                format!(
                    "{} is format version {}, from before `glatrain prepare` recorded where \
                     documents begin",
                    root.join(MANIFEST_FILE).display(),
                    manifest.format_version
                ),
                format!(
                    "re-run `glatrain prepare` on its corpus (source: {}) to write the dataset \
                     with them (format version {MANIFEST_VERSION})",
                    manifest.source
                ),
            ),
            _ => (
                "a single shard file does not record where documents begin".to_string(),
                "point it at a dataset directory that `glatrain prepare` writes".to_string(),
            ),
        };
        Err(TrainError::BadValue {
            source_name: self.cfg.source.clone(),
            key: "data.document_boundaries",
            value: "true".into(),
            reason: format!(
                "{key} = {spec:?} has no document boundaries: {what}; {remedy}, or set \
                 data.document_boundaries = false"
            ),
        })
    }

    /// The training source of `spec`.
    pub fn train(&mut self, spec: &str) -> Result<Arc<TokenSource>, TrainError> {
        let source = if spec == "embedded" {
            Arc::clone(&self.embedded()?.train)
        } else {
            self.open("data.train", spec)?.train
        };
        self.check_vocab(&source)?;
        Ok(source)
    }

    /// The validation source of `spec`: the embedded validation split, a dataset directory's
    /// `valid` split, or (a directory without one, or a single file) all of its tokens.
    pub fn valid(&mut self, spec: &str) -> Result<Arc<TokenSource>, TrainError> {
        let (valid, train) = if spec == "embedded" {
            let embedded = self.embedded()?;
            (embedded.valid.clone(), Arc::clone(&embedded.train))
        } else {
            let data = self.open("data.valid", spec)?;
            (data.valid, data.train)
        };
        let source = valid.unwrap_or_else(|| {
            eprintln!("note: {spec} has no validation split: evaluating on all of its tokens");
            train
        });
        self.check_vocab(&source)?;
        Ok(source)
    }

    /// A dataset directory records its tokenizer: `byte`, or a tokenizer.json copied into it.
    /// `data.tokenizer` must be that one (the same file contents); single shard files record
    /// none and are taken as they are.
    fn check_tokenizer(&self, key: &str, spec: &str, data: &Dataset) -> Result<(), TrainError> {
        let (Some(manifest), Some(root)) = (&data.manifest, &data.root) else {
            return Ok(());
        };
        let configured = &self.cfg.config.data.tokenizer;
        let theirs = manifest.tokenizer_path(root);
        let same = match (configured.parse::<TokenizerSpec>()?, &theirs) {
            (TokenizerSpec::Byte, None) => true,
            (TokenizerSpec::File(ours), Some(theirs)) => {
                matches!((std::fs::read(ours), std::fs::read(theirs)), (Ok(a), Ok(b)) if a == b)
            }
            _ => false,
        };
        if same {
            return Ok(());
        }
        let (made_with, instead) = match &theirs {
            Some(file) => (
                format!("{} (saved as {})", manifest.tokenizer.spec, file.display()),
                file.display().to_string(),
            ),
            None => ("byte".to_string(), "byte".to_string()),
        };
        Err(TrainError::BadValue {
            source_name: self.cfg.source.clone(),
            key: "data.tokenizer",
            value: format!("{configured:?}"),
            reason: format!(
                "{key} = {spec:?} was tokenized with {made_with}; set data.tokenizer = {instead:?}"
            ),
        })
    }

    fn check_vocab(&self, source: &TokenSource) -> Result<(), TrainError> {
        source.check_vocab(self.cfg.config.model.vocab_size() as u32)?;
        Ok(())
    }
}
