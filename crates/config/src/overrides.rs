//! `--set key.path=value` overrides, applied to the parsed TOML table before it is deserialized,
//! so an overridden value goes through exactly the checks a value in the file goes through.
//!
//! The value is a TOML literal (`1e-3`, `true`, `"text"`, `[1, 2]`, `{ init = 1024.0 }`); text
//! that is not one (`foo`, `cuda:1`, `data/shards`) is taken as a string, and so is a literal of
//! another type where the key wants a string (`run.name=2024` names the run "2024").

use toml::{Table, Value};

use crate::error::{shorten, ConfigError, Origin};
use crate::keys::{self, ModelType, Section};

/// One parsed `KEY.PATH=VALUE` argument.
#[derive(Debug)]
struct Override {
    /// The argument as messages quote it (shortened when huge).
    raw: String,
    path: Vec<String>,
    text: String,
}

impl Override {
    fn parse(raw: &str) -> Result<Self, ConfigError> {
        let shown = shorten(raw);
        let bad = |reason: &str| ConfigError::BadOverride {
            raw: shown.clone(),
            reason: reason.to_owned(),
        };
        let (key, text) = raw
            .split_once('=')
            .ok_or_else(|| bad("expected KEY.PATH=VALUE, e.g. train.lr=1e-3"))?;
        let path: Vec<String> = key.trim().split('.').map(|s| s.trim().to_owned()).collect();
        if path.iter().any(String::is_empty) {
            return Err(bad(
                "the key path has an empty part; expected KEY.PATH=VALUE, e.g. train.lr=1e-3",
            ));
        }
        Ok(Self {
            raw: shown,
            path,
            text: text.trim().to_owned(),
        })
    }

    fn dotted(&self) -> String {
        self.path.join(".")
    }

    /// The value as a TOML literal, or the text as a string when it is not one.
    fn literal(&self) -> Value {
        self.text
            .parse::<Value>()
            .unwrap_or_else(|_| Value::String(self.text.clone()))
    }

    /// Checks the path against the key tree. Returns the table and key when the path ends at a
    /// value (not a table) whose table is known.
    fn check_path(&self, model: Option<ModelType>) -> Result<Option<(Section, &str)>, ConfigError> {
        let mut section = Section::Root;
        for (i, key) in self.path.iter().enumerate() {
            let is_last = i + 1 == self.path.len();
            let keys = section.keys();
            if !keys.contains(&key.as_str()) {
                return Err(ConfigError::BadOverride {
                    raw: self.raw.clone(),
                    reason: format!(
                        "{}: unknown key; valid keys of {} are: {}",
                        section.key_path(key),
                        section.describe(),
                        keys.join(", ")
                    ),
                });
            }
            let next = match (section, key.as_str()) {
                // Without a known model type the keys under [model] cannot be checked here;
                // the document check reports the missing or unknown type.
                (Section::Root, "model") => match model {
                    Some(t) => Some(Section::Model(t)),
                    None => return Ok(None),
                },
                _ => section.subsection(key),
            };
            match next {
                Some(sub) => section = sub,
                None if is_last => return Ok(Some((section, key))),
                None => {
                    return Err(ConfigError::BadOverride {
                        raw: self.raw.clone(),
                        reason: format!("{} is a value, not a table", section.key_path(key)),
                    })
                }
            }
        }
        Ok(None)
    }

    /// The value to store: the literal, or the raw text where the key wants a string and the
    /// literal has another type.
    fn value_for(&self, leaf: Option<(Section, &str)>) -> Value {
        let literal = self.literal();
        let Some((section, key)) = leaf else {
            return literal;
        };
        // `model.type` is serde's enum tag, not a field of the model structs.
        let is_tag = matches!(section, Section::Model(_)) && key == "type";
        if literal.is_str() || is_tag || section.check_value(key, &literal).is_ok() {
            return literal;
        }
        let text = Value::String(self.text.clone());
        if section.check_value(key, &text).is_ok() {
            text
        } else {
            literal
        }
    }

    /// Stores `value` at the path, creating missing tables on the way.
    fn set(&self, table: &mut Table, value: Value) -> Result<(), ConfigError> {
        let (last, parents) = self.path.split_last().expect("parse rejects empty paths");
        let mut current = table;
        for (i, key) in parents.iter().enumerate() {
            let entry = current
                .entry(key.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            current = match entry {
                Value::Table(t) => t,
                other => {
                    return Err(ConfigError::BadOverride {
                        raw: self.raw.clone(),
                        reason: format!(
                            "{} is {other} in the config, not a table",
                            self.path[..=i].join(".")
                        ),
                    })
                }
            };
        }
        current.insert(last.clone(), value);
        Ok(())
    }
}

/// Applies `--set` arguments in order (a later one wins) to the parsed config, and records in
/// `origin` which keys they set. An argument whose path is not a key of the schema is an error
/// naming the argument.
pub(crate) fn apply(
    table: &mut Table,
    raws: &[String],
    origin: &mut Origin,
) -> Result<(), ConfigError> {
    let overrides = raws
        .iter()
        .map(|raw| Override::parse(raw))
        .collect::<Result<Vec<_>, _>>()?;
    // The keys under [model] depend on model.type, which an override may change: find the final
    // type on a scratch copy first.
    let mut preview = table.clone();
    for o in &overrides {
        o.set(&mut preview, o.literal())?;
    }
    let model = keys::model_type_of(&preview);
    for o in &overrides {
        let leaf = o.check_path(model)?;
        o.set(table, o.value_for(leaf))?;
        origin.add_override(o.dotted(), &o.raw);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_to(text: &str, raws: &[&str]) -> Result<Table, ConfigError> {
        let mut table: Table = text.parse().unwrap();
        let raws: Vec<String> = raws.iter().map(|s| s.to_string()).collect();
        apply(&mut table, &raws, &mut Origin::new("x.toml"))?;
        Ok(table)
    }

    const GLA: &str = "[model]\ntype = \"gla\"\nhidden_size = 64\n";

    #[test]
    fn values_are_toml_literals_with_string_fallback() {
        let t = apply_to(
            GLA,
            &[
                "train.lr=1e-3",
                "model.use_short_conv=true",
                "run.name=foo",
                "run.device = cuda:1",
                "data.train=data/shards",
                "train.max_steps=20",
                "run.out_dir=\"quoted dir\"",
            ],
        )
        .unwrap();
        assert_eq!(t["train"]["lr"], Value::Float(1e-3));
        assert_eq!(t["model"]["use_short_conv"], Value::Boolean(true));
        assert_eq!(t["model"]["hidden_size"], Value::Integer(64));
        assert_eq!(t["run"]["name"], Value::String("foo".into()));
        assert_eq!(t["run"]["device"], Value::String("cuda:1".into()));
        assert_eq!(t["data"]["train"], Value::String("data/shards".into()));
        assert_eq!(t["train"]["max_steps"], Value::Integer(20));
        assert_eq!(t["run"]["out_dir"], Value::String("quoted dir".into()));
    }

    #[test]
    fn a_string_key_takes_the_text_of_a_non_string_literal() {
        let t = apply_to(GLA, &["run.name=2024", "data.tokenizer=1.5"]).unwrap();
        assert_eq!(t["run"]["name"], Value::String("2024".into()));
        assert_eq!(t["data"]["tokenizer"], Value::String("1.5".into()));
        // A numeric key keeps the literal (and a wrong one stays wrong for the type check).
        let t = apply_to(GLA, &["train.lr=abc"]).unwrap();
        assert_eq!(t["train"]["lr"], Value::String("abc".into()));
    }

    #[test]
    fn later_overrides_win_and_tables_can_be_set_whole() {
        let t = apply_to(
            GLA,
            &[
                "train.lr=1",
                "train.lr=2",
                "train.loss_scale={ init = 8.0 }",
            ],
        )
        .unwrap();
        assert_eq!(t["train"]["lr"], Value::Integer(2));
        assert_eq!(t["train"]["loss_scale"]["init"], Value::Float(8.0));
    }

    #[test]
    fn unknown_paths_name_the_override_and_the_valid_keys() {
        let msg = apply_to(GLA, &["train.lr=1", "train.lrr=1e-3"])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("override `--set train.lrr=1e-3`: train.lrr: unknown key"),
            "{msg}"
        );
        assert!(
            msg.contains("valid keys of [train] are: batch_size, batch_tokens"),
            "{msg}"
        );

        let msg = apply_to(GLA, &["model.hiden_size=3"])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`--set model.hiden_size=3`: model.hiden_size: unknown key"),
            "{msg}"
        );
        assert!(msg.contains("type = \"gla\""), "{msg}");

        let msg = apply_to(GLA, &["optim.lr=3"]).unwrap_err().to_string();
        assert!(
            msg.contains("optim: unknown key; valid keys of the top level"),
            "{msg}"
        );

        let msg = apply_to(GLA, &["train.lr.x=3"]).unwrap_err().to_string();
        assert!(msg.contains("train.lr is a value, not a table"), "{msg}");
    }

    #[test]
    fn the_model_type_of_an_override_decides_the_model_keys() {
        let t = apply_to(GLA, &["model.d_state=8", "model.type=mamba"]);
        // hidden_size from the file is a mamba key too, so the document stays consistent.
        let t = t.unwrap();
        assert_eq!(t["model"]["type"], Value::String("mamba".into()));
        assert_eq!(t["model"]["d_state"], Value::Integer(8));
        let msg = apply_to(GLA, &["model.d_state=8"]).unwrap_err().to_string();
        assert!(msg.contains("model.d_state: unknown key"), "{msg}");
    }

    #[test]
    fn malformed_overrides() {
        let msg = apply_to(GLA, &["train.lr"]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "override `--set train.lr`: expected KEY.PATH=VALUE, e.g. train.lr=1e-3"
        );
        let msg = apply_to(GLA, &["train..lr=1"]).unwrap_err().to_string();
        assert!(msg.contains("empty part"), "{msg}");
        let msg = apply_to(GLA, &["=1"]).unwrap_err().to_string();
        assert!(msg.contains("empty part"), "{msg}");
        let msg = apply_to("train = 1\n[model]\ntype = \"gla\"\n", &["train.lr=1"])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("train is 1 in the config, not a table"),
            "{msg}"
        );
    }
}
