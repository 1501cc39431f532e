//! Run configuration: the TOML schema, `--set` overrides, validation with precise errors, and
//! the resolved config written into each run directory.
//!
//! ```text
//! text --parse--> toml::Table --overrides--> key/type check --deserialize--> Config
//!      --validate--> ResolvedConfig (derived values filled in) --write_resolved--> run/config.toml
//! ```
//!
//! Every key, its meaning and its default are listed in the README's config reference.

mod error;
mod keys;
mod overrides;
mod params;
mod resolved;
pub mod schema;
pub mod shipped;
mod sizes;
mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use resolved::ResolvedConfig;
pub use schema::*;

use error::Origin;

/// Reads the config file at `path`, applies `--set KEY.PATH=VALUE` overrides, checks and
/// resolves it. Errors name the file, the key path, the value and what was expected.
///
/// When no file of that path exists and the path is a bare name of a shipped config
/// (`gla-340m` or `gla-340m.toml`), that config is loaded from the copy compiled into the
/// binary (see [`shipped`]): a file always wins.
pub fn load(path: impl AsRef<Path>, overrides: &[String]) -> Result<ResolvedConfig, ConfigError> {
    let path = path.as_ref();
    match std::fs::read_to_string(path) {
        Ok(text) => from_str(&text, &path.display().to_string(), overrides),
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            if let Some(config) = shipped::find(path) {
                return from_str(config.text, &config.origin(), overrides);
            }
            let hint = match path.file_stem().and_then(|n| shipped::find(Path::new(n))) {
                Some(config) => format!(
                    "`--config {}` runs the shipped config of that name",
                    config.name
                ),
                None => format!(
                    "the shipped configs, which any directory can name, are {} \
                     (`glatrain configs` describes them)",
                    shipped::names()
                ),
            };
            Err(ConfigError::NotFound {
                path: path.to_path_buf(),
                hint,
            })
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Like [`load`] for config text already in memory; `origin` names it in errors and becomes
/// [`ResolvedConfig::source`].
pub fn from_str(
    text: &str,
    origin: &str,
    overrides: &[String],
) -> Result<ResolvedConfig, ConfigError> {
    let mut table: toml::Table = text.parse().map_err(|e| syntax_error(origin, text, &e))?;
    let mut origin = Origin::new(origin);
    overrides::apply(&mut table, overrides, &mut origin)?;
    keys::check_document(&table, &origin)?;
    // The key check above covers every way deserializing can fail; this catches anything it
    // missed with serde's own message rather than a panic.
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Deserialize {
            origin: origin.name().to_owned(),
            message: e.message().to_owned(),
        })?;
    validate::validate(&config, &origin)?;
    Ok(ResolvedConfig::new(config, origin.name().to_owned()))
}

fn syntax_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e
        .span()
        .map(|span| line_column(text, span.start))
        .unwrap_or((1, 1));
    ConfigError::Syntax {
        origin: origin.to_owned(),
        line,
        column,
        message: e.message().trim().to_owned(),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn configs_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
    }

    fn shipped(name: &str) -> ResolvedConfig {
        load(configs_dir().join(name), &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn s(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// The message `text` (from `origin`, with `overrides`) is rejected with.
    fn rejection(text: &str, origin: &str, overrides: &[&str]) -> String {
        from_str(text, origin, &s(overrides))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_shipped_config_loads_validates_and_round_trips() {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.starts_with('#'),
                    "{}: needs a comment header",
                    path.display()
                );
                let config = load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert_eq!(
                    config.config.run.name, name,
                    "run.name should match the file name"
                );
                let reloaded =
                    from_str(&config.to_toml_string().unwrap(), "resolved", &[]).unwrap();
                assert_eq!(reloaded.config, config.config, "{}", path.display());
                names.push(name);
            }
        }
        names.sort();
        let shipped: Vec<&str> = shipped::SHIPPED.iter().map(|c| c.name).collect();
        assert_eq!(names, shipped);
    }

    #[test]
    fn gla_340m_has_the_published_shape() {
        let r = shipped("gla-340m.toml");
        let ModelConfig::Gla(m) = &r.config.model else {
            panic!("gla-340m is a GLA config")
        };
        assert_eq!(
            (m.hidden_size, m.num_layers, m.num_heads, m.vocab_size),
            (1024, 24, 4, 32000)
        );
        assert_eq!(
            (m.head_k_dim(), m.head_v_dim(), m.mlp_size()),
            (128, 256, 2816)
        );
        assert!(m.tie_embeddings);
        let t = &r.config.train;
        assert_eq!(
            (t.lr, t.min_lr, t.weight_decay, t.grad_clip),
            (3e-4, 3e-5, 0.01, 1.0)
        );
        assert_eq!(t.precision, Precision::Bf16);
        assert_eq!(r.config.data.seq_len, 2048);
        assert_eq!(
            (r.tokens_per_step, r.batch_size, r.grad_accum_steps),
            (524_288, 256, 32)
        );
        assert_eq!((t.warmup_steps, t.max_steps), (1000, 28_610));
        // 15B tokens.
        assert!((t.max_steps as f64 * r.tokens_per_step as f64 - 15e9).abs() < 1e6);
    }

    #[test]
    fn baseline_configs_have_the_published_shapes() {
        let r = shipped("gla-1.3b.toml");
        let ModelConfig::Gla(m) = &r.config.model else {
            panic!("GLA")
        };
        assert_eq!((m.hidden_size, m.num_layers, m.num_heads), (2048, 24, 4));
        let r = shipped("transformer-340m.toml");
        let ModelConfig::Transformer(m) = &r.config.model else {
            panic!("Transformer")
        };
        assert_eq!(
            (m.hidden_size, m.num_layers, m.num_heads, m.mlp_size()),
            (1024, 24, 16, 2816)
        );
        let r = shipped("mamba-370m.toml");
        let ModelConfig::Mamba(m) = &r.config.model else {
            panic!("Mamba")
        };
        assert_eq!(
            (m.hidden_size, m.num_layers, m.d_state, m.expand),
            (1024, 48, 16, 2)
        );
    }

    #[test]
    fn tiny_configs_train_on_the_cpu_from_the_embedded_corpus() {
        for name in ["gla-tiny.toml", "transformer-tiny.toml", "mamba-tiny.toml"] {
            let r = shipped(name);
            let c = &r.config;
            assert_eq!(c.model.vocab_size(), 256, "{name}");
            assert_eq!(
                (c.data.tokenizer.as_str(), c.data.train.as_str()),
                ("byte", "embedded")
            );
            assert_eq!(
                (c.run.device.as_str(), c.train.precision),
                ("cpu", Precision::Fp32)
            );
            assert_eq!(
                (c.data.seq_len, c.train.micro_batch_size),
                (128, 16),
                "{name}"
            );
            assert_eq!(c.train.eval_every, 0, "{name}: evaluates at the end only");
        }
    }

    #[test]
    fn init_from_is_read_and_written_back() {
        for model in ["gla", "transformer", "mamba"] {
            let text = format!("[model]\ntype = \"{model}\"\ninit_from = \"hf/model\"\n");
            let r = from_str(&text, "x.toml", &[]).unwrap();
            assert_eq!(r.config.model.init_from(), Some("hf/model"), "{model}");
            let reloaded = from_str(&r.to_toml_string().unwrap(), "resolved", &[]).unwrap();
            assert_eq!(reloaded.config, r.config, "{model}");
        }
        let r = from_str("[model]\ntype = \"gla\"\n", "x.toml", &[]).unwrap();
        assert_eq!(r.config.model.init_from(), None);
        assert!(!r.to_toml_string().unwrap().contains("init_from"));
    }

    #[test]
    fn document_boundaries_is_off_unless_set_and_must_be_a_bool() {
        let text = "[model]\ntype = \"gla\"\n";
        assert!(
            !from_str(text, "x.toml", &[])
                .unwrap()
                .config
                .data
                .document_boundaries
        );
        let on = from_str(text, "x.toml", &s(&["data.document_boundaries=true"])).unwrap();
        assert!(on.config.data.document_boundaries);
        let resolved = on.to_toml_string().unwrap();
        assert!(
            resolved.contains("document_boundaries = true"),
            "{resolved}"
        );
        let reloaded = from_str(&resolved, "resolved", &[]).unwrap();
        assert_eq!(reloaded.config, on.config);

        let msg = rejection(
            &format!("{text}[data]\ndocument_boundaries = \"yes\"\n"),
            "x.toml",
            &[],
        );
        assert!(
            msg.starts_with("x.toml: data.document_boundaries = \"yes\": invalid type: string"),
            "{msg}"
        );
        assert!(msg.contains("expected a boolean"), "{msg}");
        let msg = rejection(text, "x.toml", &["data.document_boundaries=1"]);
        assert!(
            msg.starts_with(
                "x.toml (--set data.document_boundaries=1): data.document_boundaries = 1: \
                 invalid type: integer"
            ),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_names_the_path_and_the_shipped_configs() {
        let err = load("configs/does-not-exist.toml", &[]).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            "configs/does-not-exist.toml: no such config file; the shipped configs, which any \
             directory can name, are gla-1.3b, gla-340m, gla-340m-128k, gla-340m-64k, gla-tiny, \
             mamba-370m, mamba-tiny, transformer-340m, transformer-tiny (`glatrain configs` \
             describes them)"
        );
        let err = load("elsewhere/gla-340m.toml", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "elsewhere/gla-340m.toml: no such config file; `--config gla-340m` runs the \
             shipped config of that name"
        );
    }

    #[test]
    fn shipped_configs_load_by_name_unless_a_file_is_there() {
        for name in ["gla-340m", "gla-340m.toml"] {
            let r = load(name, &s(&["train.lr=1e-3"])).unwrap();
            assert_eq!(r.source, "gla-340m.toml (built in)");
            assert_eq!(r.config.run.name, "gla-340m");
            assert_eq!(r.config.train.lr, 1e-3);
        }
        // Errors name the shipped config.
        let err = load("gla-tiny", &s(&["train.lr=-1"])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gla-tiny.toml (built in) (--set train.lr=-1): train.lr = -1"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err = from_str(
            "[model]\ntype = \"gla\"\nhidden_size = = 3\n",
            "bad.toml",
            &[],
        )
        .unwrap_err();
        assert!(err.is_bad_input());
        let ConfigError::Syntax { line, column, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!((*line, *column), (3, 15));
        assert!(
            err.to_string()
                .starts_with("bad.toml:3:15: TOML syntax error: "),
            "{err}"
        );

        let err = from_str("[model]\n[model]\n", "dup.toml", &[]).unwrap_err();
        assert!(err.to_string().starts_with("dup.toml:2:"), "{err}");
    }

    #[test]
    fn line_column_counts_characters() {
        // 'd' is the 6th byte but the 2nd character of its line.
        assert_eq!(line_column("ab\nçd = x", 5), (2, 2));
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(line_column("a\n", 99), (2, 1));
    }

    #[test]
    fn overrides_go_through_the_same_checks() {
        let text = "[model]\ntype = \"gla\"\nvocab_size = 256\n";
        let r = from_str(
            text,
            "x.toml",
            &s(&["train.lr=1e-3", "model.use_short_conv=true", "run.name=foo"]),
        )
        .unwrap();
        assert_eq!(r.config.train.lr, 1e-3);
        assert_eq!(r.config.run.name, "foo");
        let ModelConfig::Gla(m) = &r.config.model else {
            panic!("GLA")
        };
        assert!(m.use_short_conv);

        let msg = rejection(text, "x.toml", &["train.lr=-1"]);
        assert_eq!(
            msg,
            "x.toml (--set train.lr=-1): train.lr = -1: must be a finite number >= 0"
        );
        let msg = rejection(text, "x.toml", &["train.lr=fast"]);
        assert!(
            msg.starts_with("x.toml (--set train.lr=fast): train.lr = \"fast\": invalid type"),
            "{msg}"
        );
        let msg = rejection(text, "x.toml", &["model.hiden_size=3"]);
        assert!(
            msg.starts_with("override `--set model.hiden_size=3`: model.hiden_size: unknown key"),
            "{msg}"
        );
        let msg = rejection(text, "x.toml", &["model.type=rnn"]);
        assert!(
            msg.contains("(--set model.type=rnn): model.type = \"rnn\": unknown model type"),
            "{msg}"
        );
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let msg = rejection(
            "[model]\ntype = \"gla\"\nnum_heads = 3\n",
            "configs/x.toml",
            &[],
        );
        assert_eq!(
            msg,
            "configs/x.toml: model.num_heads = 3: key_dim 512 (hidden_size 1024 * expand_k 0.5) \
             is not divisible by it"
        );
        let msg = rejection(
            "[model]\ntype = \"transformer\"\nnum_heads = 3\n",
            "configs/x.toml",
            &[],
        );
        assert_eq!(
            msg,
            "configs/x.toml: model.num_heads = 3: hidden_size 1024 is not divisible by it"
        );
        let msg = rejection(
            "[model]\ntype = \"gla\"\nhiden_size = 3\n",
            "configs/x.toml",
            &[],
        );
        assert!(
            msg.starts_with("configs/x.toml: model.hiden_size: unknown key; valid keys of"),
            "{msg}"
        );
    }

    #[test]
    fn readme_documents_every_key_of_every_table() {
        let doc = include_str!("../../../README.md");
        let mut documented: Vec<(String, Vec<String>)> = Vec::new();
        for line in doc.lines() {
            if let Some(heading) = line.strip_prefix("### ") {
                documented.push((heading.trim().to_owned(), Vec::new()));
            } else if let (Some(row), Some((_, keys))) =
                (line.strip_prefix("| `"), documented.last_mut())
            {
                keys.push(row.split('`').next().unwrap().to_owned());
            }
        }
        for section in keys::Section::ALL {
            let heading = match section {
                keys::Section::Root => continue,
                keys::Section::Model(t) => format!("`[model]`, type = \"{}\"", t.name()),
                other => format!("`[{}]`", other.path()),
            };
            let (_, keys) = documented
                .iter()
                .find(|(h, _)| *h == heading)
                .unwrap_or_else(|| panic!("README.md has no section \"### {heading}\""));
            let expected: Vec<String> = section.keys().iter().map(|k| k.to_string()).collect();
            assert_eq!(keys, &expected, "README.md section {heading}");
        }
    }
}
