//! The schema's key tree: which keys each TOML table accepts and the type check of a single key.
//!
//! Field lists are read from the serde derives in `schema.rs` (a probe deserializer records the
//! `fields` that a derived `Deserialize` passes to `deserialize_struct`), so they cannot drift
//! from the structs. Checking keys here, rather than relying on serde's `deny_unknown_fields`
//! alone, gives every error its full key path: serde's internally tagged `[model]` enum buffers
//! its content and loses the path of whatever goes wrong inside it.

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use toml::{Table, Value};

use crate::error::{shorten, ConfigError, Origin};
use crate::schema::{
    Config, DataConfig, GlaConfig, KernelConfig, LoggingConfig, LossScaleConfig, MambaConfig,
    RunConfig, TrainConfig, TransformerConfig,
};

/// The variants of `[model]`, by their `type` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelType {
    Gla,
    Transformer,
    Mamba,
}

impl ModelType {
    pub(crate) const ALL: [ModelType; 3] =
        [ModelType::Gla, ModelType::Transformer, ModelType::Mamba];

    pub(crate) fn name(self) -> &'static str {
        match self {
            ModelType::Gla => "gla",
            ModelType::Transformer => "transformer",
            ModelType::Mamba => "mamba",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `"gla", "transformer" or "mamba"`, for messages.
    pub(crate) fn expected() -> String {
        let names: Vec<String> = Self::ALL
            .iter()
            .map(|t| format!("\"{}\"", t.name()))
            .collect();
        format!(
            "{} or {}",
            names[..names.len() - 1].join(", "),
            names[names.len() - 1]
        )
    }
}

/// One TOML table of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Root,
    Run,
    Model(ModelType),
    Data,
    Train,
    LossScale,
    Kernels,
    Logging,
}

impl Section {
    /// Every section, with one `[model]` per model type.
    #[cfg(test)]
    pub(crate) const ALL: [Section; 10] = [
        Section::Root,
        Section::Run,
        Section::Model(ModelType::Gla),
        Section::Model(ModelType::Transformer),
        Section::Model(ModelType::Mamba),
        Section::Data,
        Section::Train,
        Section::LossScale,
        Section::Kernels,
        Section::Logging,
    ];

    /// Dotted path of the table ("" for the top level).
    pub(crate) fn path(self) -> &'static str {
        match self {
            Section::Root => "",
            Section::Run => "run",
            Section::Model(_) => "model",
            Section::Data => "data",
            Section::Train => "train",
            Section::LossScale => "train.loss_scale",
            Section::Kernels => "kernels",
            Section::Logging => "logging",
        }
    }

    /// How messages name the table.
    pub(crate) fn describe(self) -> String {
        match self {
            Section::Root => "the top level".to_owned(),
            Section::Model(t) => format!("[model] with type = \"{}\"", t.name()),
            other => format!("[{}]", other.path()),
        }
    }

    /// The keys the table accepts, in declaration order (`[model]` adds its tag, `type`).
    pub(crate) fn keys(self) -> Vec<&'static str> {
        match self {
            Section::Root => struct_fields::<Config>().to_vec(),
            Section::Run => struct_fields::<RunConfig>().to_vec(),
            Section::Model(t) => {
                let fields = match t {
                    ModelType::Gla => struct_fields::<GlaConfig>(),
                    ModelType::Transformer => struct_fields::<TransformerConfig>(),
                    ModelType::Mamba => struct_fields::<MambaConfig>(),
                };
                std::iter::once("type")
                    .chain(fields.iter().copied())
                    .collect()
            }
            Section::Data => struct_fields::<DataConfig>().to_vec(),
            Section::Train => struct_fields::<TrainConfig>().to_vec(),
            Section::LossScale => struct_fields::<LossScaleConfig>().to_vec(),
            Section::Kernels => struct_fields::<KernelConfig>().to_vec(),
            Section::Logging => struct_fields::<LoggingConfig>().to_vec(),
        }
    }

    /// The sub-table behind `key`, except `model` (whose section depends on `model.type`).
    pub(crate) fn subsection(self, key: &str) -> Option<Section> {
        match (self, key) {
            (Section::Root, "run") => Some(Section::Run),
            (Section::Root, "data") => Some(Section::Data),
            (Section::Root, "train") => Some(Section::Train),
            (Section::Root, "kernels") => Some(Section::Kernels),
            (Section::Root, "logging") => Some(Section::Logging),
            (Section::Train, "loss_scale") => Some(Section::LossScale),
            _ => None,
        }
    }

    /// Type-checks one value key of this table by deserializing a table holding only that key
    /// (every field else takes its default). Returns serde's description of the problem.
    pub(crate) fn check_value(self, key: &str, value: &Value) -> Result<(), String> {
        let mut table = Table::new();
        table.insert(key.to_owned(), value.clone());
        match self {
            // Every top-level key is a table, checked through its own section.
            Section::Root => Ok(()),
            Section::Run => try_deserialize::<RunConfig>(table),
            Section::Model(ModelType::Gla) => try_deserialize::<GlaConfig>(table),
            Section::Model(ModelType::Transformer) => try_deserialize::<TransformerConfig>(table),
            Section::Model(ModelType::Mamba) => try_deserialize::<MambaConfig>(table),
            Section::Data => try_deserialize::<DataConfig>(table),
            Section::Train => try_deserialize::<TrainConfig>(table),
            Section::LossScale => try_deserialize::<LossScaleConfig>(table),
            Section::Kernels => try_deserialize::<KernelConfig>(table),
            Section::Logging => try_deserialize::<LoggingConfig>(table),
        }
    }

    /// Full dotted path of `key` in this table.
    pub(crate) fn key_path(self, key: &str) -> String {
        match self.path() {
            "" => key.to_owned(),
            table => format!("{table}.{key}"),
        }
    }
}

fn try_deserialize<T: DeserializeOwned>(table: Table) -> Result<(), String> {
    Value::Table(table)
        .try_into::<T>()
        .map(drop)
        .map_err(|e| e.message().to_owned())
}

/// The model type named by `table["model"]["type"]`, if it is a known one.
pub(crate) fn model_type_of(table: &Table) -> Option<ModelType> {
    match table.get("model")?.get("type")? {
        Value::String(name) => ModelType::from_name(name),
        _ => None,
    }
}

/// Checks the whole document against the key tree: every key known, every table a table, every
/// value of the right type, `[model]` and `model.type` present and known. After this passes,
/// deserializing into [`Config`] cannot fail.
pub(crate) fn check_document(table: &Table, origin: &Origin) -> Result<ModelType, ConfigError> {
    // Unknown top-level keys and non-table sections first: they say more than a missing model.
    for (key, value) in table {
        if !Section::Root.keys().contains(&key.as_str()) {
            return Err(unknown_key(origin, Section::Root, key));
        }
        if !value.is_table() {
            return Err(ConfigError::WrongType {
                origin: origin.of(key),
                key: key.clone(),
                value: shorten(&value.to_string()),
                expected: format!("expected a table [{key}]"),
            });
        }
    }
    let model_type = check_model_type(table, origin)?;
    for (key, value) in table {
        let section = match Section::Root.subsection(key) {
            Some(section) => section,
            None => Section::Model(model_type),
        };
        if let Value::Table(sub) = value {
            check_table(section, sub, origin)?;
        }
    }
    Ok(model_type)
}

fn check_model_type(table: &Table, origin: &Origin) -> Result<ModelType, ConfigError> {
    let Some(model) = table.get("model") else {
        return Err(ConfigError::MissingKey {
            origin: origin.name().to_owned(),
            key: "[model]".to_owned(),
            expected: format!(
                "every config needs a [model] table with type = {}",
                ModelType::expected()
            ),
        });
    };
    match model.get("type") {
        None => Err(ConfigError::MissingKey {
            origin: origin.of("model.type"),
            key: "model.type".to_owned(),
            expected: format!("expected type = {} in [model]", ModelType::expected()),
        }),
        Some(Value::String(name)) => ModelType::from_name(name).ok_or_else(|| {
            origin.invalid(
                "model.type",
                format!("{name:?}"),
                format!("unknown model type; expected {}", ModelType::expected()),
            )
        }),
        Some(other) => Err(ConfigError::WrongType {
            origin: origin.of("model.type"),
            key: "model.type".to_owned(),
            value: shorten(&other.to_string()),
            expected: format!("expected a string, one of {}", ModelType::expected()),
        }),
    }
}

fn check_table(section: Section, table: &Table, origin: &Origin) -> Result<(), ConfigError> {
    let keys = section.keys();
    for (key, value) in table {
        let path = section.key_path(key);
        if !keys.contains(&key.as_str()) {
            return Err(unknown_key(origin, section, key));
        }
        if let Some(sub) = section.subsection(key) {
            match value {
                Value::Table(sub_table) => check_table(sub, sub_table, origin)?,
                other => {
                    return Err(ConfigError::WrongType {
                        origin: origin.of(&path),
                        value: shorten(&other.to_string()),
                        expected: format!("expected a table [{path}]"),
                        key: path,
                    })
                }
            }
        } else if !(matches!(section, Section::Model(_)) && key == "type") {
            section
                .check_value(key, value)
                .map_err(|expected| ConfigError::WrongType {
                    origin: origin.of(&path),
                    key: path.clone(),
                    value: shorten(&value.to_string()),
                    expected,
                })?;
        }
    }
    Ok(())
}

fn unknown_key(origin: &Origin, section: Section, key: &str) -> ConfigError {
    let path = section.key_path(key);
    ConfigError::UnknownKey {
        origin: origin.of(&path),
        key: path,
        table: section.describe(),
        valid: section.keys().join(", "),
    }
}

/// The field names of a serde-derived struct.
///
/// # Panics
/// If `T` does not deserialize from a struct; every caller passes a struct of `schema.rs`, and
/// the tests below cover each one.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields = None;
    // The probe always ends in an error once it has seen (or failed to see) the field list.
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields.expect("struct_fields is only called on serde-derived structs")
}

/// A deserializer that answers nothing; it only records the field list of a struct.
struct FieldProbe<'a>(&'a mut Option<&'static [&'static str]>);

#[derive(Debug)]
struct ProbeDone;

impl fmt::Display for ProbeDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field probe done")
    }
}

impl std::error::Error for ProbeDone {}

impl de::Error for ProbeDone {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        ProbeDone
    }
}

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = ProbeDone;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeDone> {
        Err(ProbeDone)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeDone> {
        *self.0 = Some(fields);
        Err(ProbeDone)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Table {
        text.parse().expect("test TOML parses")
    }

    /// The message `check_document` rejects `text` with.
    fn rejection(text: &str) -> String {
        check_document(&parse(text), &Origin::new("x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn field_lists_come_from_the_structs() {
        assert_eq!(
            Section::Root.keys(),
            ["run", "model", "data", "train", "kernels", "logging"]
        );
        let gla = Section::Model(ModelType::Gla).keys();
        assert_eq!(gla[0], "type");
        assert!(gla.contains(&"hidden_size") && gla.contains(&"expand_k"));
        assert!(Section::Model(ModelType::Mamba).keys().contains(&"dt_rank"));
        assert!(Section::Train.keys().contains(&"loss_scale"));
        for section in Section::ALL {
            assert!(!section.keys().is_empty(), "{section:?}");
        }
    }

    #[test]
    fn every_model_type_name_deserializes_to_its_variant() {
        for t in ModelType::ALL {
            let config: Config = toml::from_str(&format!("[model]\ntype = \"{}\"", t.name()))
                .expect("minimal model table deserializes");
            assert_eq!(config.model.type_name(), t.name());
        }
        assert_eq!(
            ModelType::expected(),
            "\"gla\", \"transformer\" or \"mamba\""
        );
    }

    #[test]
    fn unknown_key_names_path_and_lists_valid_keys() {
        let doc = parse("[model]\ntype = \"gla\"\nhiden_size = 64\n");
        let err = check_document(&doc, &Origin::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { .. }));
        assert!(
            msg.starts_with("x.toml: model.hiden_size: unknown key"),
            "{msg}"
        );
        assert!(msg.contains("[model] with type = \"gla\""), "{msg}");
        assert!(msg.contains("hidden_size, num_layers"), "{msg}");
    }

    #[test]
    fn unknown_nested_and_top_level_keys() {
        let msg = rejection("[model]\ntype = \"gla\"\n[train.loss_scale]\ninitial = 1.0\n");
        assert!(
            msg.contains("train.loss_scale.initial: unknown key"),
            "{msg}"
        );
        assert!(
            msg.contains("[train.loss_scale] are: init, growth_interval"),
            "{msg}"
        );

        let msg = rejection("[model]\ntype = \"gla\"\n[optim]\nlr = 1.0\n");
        assert!(
            msg.contains("x.toml: optim: unknown key; valid keys of the top level are: run, model"),
            "{msg}"
        );
    }

    #[test]
    fn keys_of_another_model_type_are_unknown() {
        let msg = rejection("[model]\ntype = \"mamba\"\nnum_heads = 4\n");
        assert!(msg.contains("model.num_heads: unknown key"), "{msg}");
        assert!(msg.contains("type = \"mamba\""), "{msg}");
        assert!(msg.contains("d_state"), "{msg}");
    }

    #[test]
    fn wrong_types_name_key_value_and_expectation() {
        let msg = rejection("[model]\ntype = \"gla\"\n[train]\nlr = \"fast\"\n");
        assert!(
            msg.starts_with("x.toml: train.lr = \"fast\": invalid type: string"),
            "{msg}"
        );
        assert!(msg.contains("expected f64"), "{msg}");

        let msg = rejection("[model]\ntype = \"gla\"\nnum_layers = -2\n");
        assert!(
            msg.contains("model.num_layers = -2: invalid value"),
            "{msg}"
        );

        let msg = rejection("[model]\ntype = \"gla\"\n[train]\nschedule = \"linear\"\n");
        assert!(
            msg.contains("train.schedule = \"linear\": unknown variant `linear`"),
            "{msg}"
        );
        assert!(msg.contains("`cosine`"), "{msg}");

        let msg = rejection("train = 3\n[model]\ntype = \"gla\"\n");
        assert_eq!(msg, "x.toml: train = 3: expected a table [train]");

        let msg = rejection("[model]\ntype = \"gla\"\n[train]\nloss_scale = 2.0\n");
        assert_eq!(
            msg,
            "x.toml: train.loss_scale = 2.0: expected a table [train.loss_scale]"
        );
    }

    #[test]
    fn model_table_and_type_are_required_and_checked() {
        let msg = rejection("[train]\nlr = 1.0\n");
        assert!(msg.starts_with("x.toml: missing [model]"), "{msg}");

        let msg = rejection("[model]\nhidden_size = 8\n");
        assert!(msg.starts_with("x.toml: missing model.type"), "{msg}");

        let msg = rejection("[model]\ntype = \"rwkv\"\n");
        assert_eq!(
            msg,
            "x.toml: model.type = \"rwkv\": unknown model type; \
             expected \"gla\", \"transformer\" or \"mamba\""
        );

        let msg = rejection("[model]\ntype = 1\n");
        assert!(
            msg.starts_with("x.toml: model.type = 1: expected a string"),
            "{msg}"
        );
    }

    #[test]
    fn a_checked_document_deserializes() {
        let doc = parse(
            "[model]\ntype = \"transformer\"\nnum_kv_heads = 4\n[train]\nlr = 1\n\
             [train.loss_scale]\ninit = 1024.0\n[kernels]\nmode = \"fused_chunk\"\n",
        );
        assert_eq!(
            check_document(&doc, &Origin::new("x.toml")).unwrap(),
            ModelType::Transformer
        );
        let config: Config = Value::Table(doc).try_into().unwrap();
        assert_eq!(config.train.lr, 1.0);
        assert_eq!(config.train.loss_scale.init, 1024.0);
    }
}
