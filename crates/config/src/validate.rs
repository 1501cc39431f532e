//! Semantic checks of a deserialized [`Config`]: every rule that serde's types cannot express
//! (divisibility of dimensions, ranges, consistency between keys). The first broken rule is
//! returned, naming the key, its value and the rule.

use std::fmt::Display;

use crate::error::{ConfigError, Origin};
use crate::schema::{
    Config, DataConfig, GlaConfig, GlaMode, LoggingConfig, LossScaleConfig, MambaConfig,
    ModeChoice, ModelConfig, RunConfig, TrainConfig, TransformerConfig,
};
use crate::sizes;

type Check = Result<(), ConfigError>;

/// Checks `config`; `origin` names the file (and the overrides) in errors.
pub(crate) fn validate(config: &Config, origin: &Origin) -> Check {
    let v = Validator { origin };
    v.run(&config.run)?;
    match &config.model {
        ModelConfig::Gla(m) => v.gla(m)?,
        ModelConfig::Transformer(m) => v.transformer(m)?,
        ModelConfig::Mamba(m) => v.mamba(m)?,
    }
    v.data(&config.data, &config.model)?;
    v.train(&config.train, config.data.seq_len)?;
    v.kernels(config)?;
    v.logging(&config.logging, config.train.max_steps)?;
    sizes::check(config, origin)
}

/// Longest `run.name`, in characters: it names the run directory, part of every path of the run.
const MAX_RUN_NAME_CHARS: usize = 100;
/// Longest file name most Linux file systems take, in bytes (`NAME_MAX`).
const MAX_FILE_NAME_BYTES: usize = 255;

struct Validator<'a> {
    origin: &'a Origin,
}

impl Validator<'_> {
    fn fail(&self, key: &str, value: impl Display, reason: impl Into<String>) -> ConfigError {
        self.origin.invalid(key, value, reason)
    }

    fn at_least_1(&self, key: &str, value: usize) -> Check {
        if value == 0 {
            return Err(self.fail(key, value, "must be at least 1"));
        }
        Ok(())
    }

    fn at_least_1_u64(&self, key: &str, value: u64) -> Check {
        if value == 0 {
            return Err(self.fail(key, value, "must be at least 1"));
        }
        Ok(())
    }

    fn positive(&self, key: &str, value: f64) -> Check {
        if !(value.is_finite() && value > 0.0) {
            return Err(self.fail(key, value, "must be a finite number > 0"));
        }
        Ok(())
    }

    fn non_negative(&self, key: &str, value: f64) -> Check {
        if !(value.is_finite() && value >= 0.0) {
            return Err(self.fail(key, value, "must be a finite number >= 0"));
        }
        Ok(())
    }

    /// `value` in [0, 1): Adam's betas.
    fn unit_interval_open_above(&self, key: &str, value: f64) -> Check {
        if !(0.0..1.0).contains(&value) {
            return Err(self.fail(key, value, "must be in [0, 1)"));
        }
        Ok(())
    }

    fn non_empty(&self, key: &str, value: &str) -> Check {
        if value.trim().is_empty() {
            return Err(self.fail(key, format!("{value:?}"), "must not be empty"));
        }
        Ok(())
    }

    fn optional_size(&self, key: &str, value: Option<usize>, default: &str) -> Check {
        if value == Some(0) {
            return Err(self.fail(
                key,
                0,
                format!("must be at least 1 (leave it out for {default})"),
            ));
        }
        Ok(())
    }

    /// `model.init_from`, when given, names a directory: not empty. Whether it holds a model that
    /// fits is checked when a fresh run starts (a resumed run, `eval` and `sample` never read it).
    fn init_from(&self, dir: Option<&str>) -> Check {
        match dir {
            Some(dir) if dir.trim().is_empty() => Err(self.fail(
                "model.init_from",
                format!("{dir:?}"),
                "must name a Hugging Face model directory (leave the key out to start from a \
                 fresh initialisation)",
            )),
            _ => Ok(()),
        }
    }

    fn run(&self, run: &RunConfig) -> Check {
        let name = &run.name;
        if name.is_empty() {
            return Err(self.fail(
                "run.name",
                "\"\"",
                "must not be empty (it names the run directory)",
            ));
        }
        let chars = name.chars().count();
        if chars > MAX_RUN_NAME_CHARS || name.len() > MAX_FILE_NAME_BYTES {
            return Err(self.fail(
                "run.name",
                format!("{name:?}"),
                format!(
                    "is {chars} characters ({} bytes) long; at most {MAX_RUN_NAME_CHARS} \
                     characters and {MAX_FILE_NAME_BYTES} bytes (it names the run directory)",
                    name.len()
                ),
            ));
        }
        if name.contains('/') || name.contains('\\') || name == "." || name == ".." {
            return Err(self.fail(
                "run.name",
                format!("{name:?}"),
                "must be a plain directory name (no '/', '\\', \".\" or \"..\"); the run \
                 directory is run.out_dir/run.name",
            ));
        }
        self.non_empty("run.out_dir", &run.out_dir)?;
        if !device_is_valid(&run.device) {
            return Err(self.fail(
                "run.device",
                format!("{:?}", run.device),
                "expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\" (N a device index)",
            ));
        }
        Ok(())
    }

    fn gla(&self, m: &GlaConfig) -> Check {
        self.at_least_1("model.vocab_size", m.vocab_size)?;
        self.at_least_1("model.hidden_size", m.hidden_size)?;
        self.at_least_1("model.num_layers", m.num_layers)?;
        self.at_least_1("model.num_heads", m.num_heads)?;
        let key_dim = self.expanded_dim("model.expand_k", "key_dim", m.hidden_size, m.expand_k)?;
        let value_dim =
            self.expanded_dim("model.expand_v", "value_dim", m.hidden_size, m.expand_v)?;
        for (dim_name, dim, expand_key, expand) in [
            ("key_dim", key_dim, "expand_k", m.expand_k),
            ("value_dim", value_dim, "expand_v", m.expand_v),
        ] {
            if dim % m.num_heads != 0 {
                return Err(self.fail(
                    "model.num_heads",
                    m.num_heads,
                    format!(
                        "{dim_name} {dim} (hidden_size {} * {expand_key} {expand}) is not \
                         divisible by it",
                        m.hidden_size
                    ),
                ));
            }
        }
        self.optional_size(
            "model.intermediate_size",
            m.intermediate_size,
            "the default width",
        )?;
        self.at_least_1("model.gate_low_rank_dim", m.gate_low_rank_dim)?;
        self.positive("model.gate_logit_normalizer", m.gate_logit_normalizer)?;
        self.at_least_1("model.conv_size", m.conv_size)?;
        self.positive("model.norm_eps", m.norm_eps)?;
        self.positive("model.initializer_range", m.initializer_range)?;
        self.init_from(m.init_from.as_deref())
    }

    /// hidden_size * expand as an integer width >= 1 (key_dim, value_dim).
    fn expanded_dim(
        &self,
        key: &str,
        dim_name: &str,
        hidden: usize,
        expand: f64,
    ) -> Result<usize, ConfigError> {
        self.positive(key, expand)?;
        let exact = hidden as f64 * expand;
        if exact.round() < 1.0 {
            return Err(self.fail(
                key,
                expand,
                format!("{dim_name} = hidden_size {hidden} * {expand} = {exact} rounds to 0"),
            ));
        }
        // libtorch's dimensions are i64.
        if exact > i64::MAX as f64 {
            return Err(self.fail(
                key,
                expand,
                format!(
                    "{dim_name} = hidden_size {hidden} * {expand} = {exact} does not fit 64 bits"
                ),
            ));
        }
        // Relative tolerance: 1024 * 0.3 is 307.2 (rejected), 96 * (1/3 as typed) is 32 within
        // float error (accepted as 32, which key_dim()'s rounding gives).
        if (exact - exact.round()).abs() > 1e-9 * exact.max(1.0) {
            return Err(self.fail(
                key,
                expand,
                format!("{dim_name} = hidden_size {hidden} * {expand} = {exact} is not an integer"),
            ));
        }
        Ok(exact.round() as usize)
    }

    fn transformer(&self, m: &TransformerConfig) -> Check {
        self.at_least_1("model.vocab_size", m.vocab_size)?;
        self.at_least_1("model.hidden_size", m.hidden_size)?;
        self.at_least_1("model.num_layers", m.num_layers)?;
        self.at_least_1("model.num_heads", m.num_heads)?;
        if m.hidden_size % m.num_heads != 0 {
            return Err(self.fail(
                "model.num_heads",
                m.num_heads,
                format!("hidden_size {} is not divisible by it", m.hidden_size),
            ));
        }
        if m.head_dim() % 2 != 0 {
            return Err(self.fail(
                "model.num_heads",
                m.num_heads,
                format!(
                    "head_dim = hidden_size {} / num_heads = {} is odd; RoPE rotates pairs of \
                     channels and needs an even head_dim",
                    m.hidden_size,
                    m.head_dim()
                ),
            ));
        }
        self.optional_size("model.num_kv_heads", m.num_kv_heads, "num_heads")?;
        if m.num_heads % m.kv_heads() != 0 {
            return Err(self.fail(
                "model.num_kv_heads",
                m.kv_heads(),
                format!("num_heads {} is not divisible by it", m.num_heads),
            ));
        }
        self.optional_size(
            "model.intermediate_size",
            m.intermediate_size,
            "the default width",
        )?;
        self.positive("model.rope_theta", m.rope_theta)?;
        self.positive("model.norm_eps", m.norm_eps)?;
        self.positive("model.initializer_range", m.initializer_range)?;
        self.init_from(m.init_from.as_deref())
    }

    fn mamba(&self, m: &MambaConfig) -> Check {
        self.at_least_1("model.vocab_size", m.vocab_size)?;
        self.at_least_1("model.hidden_size", m.hidden_size)?;
        self.at_least_1("model.num_layers", m.num_layers)?;
        self.at_least_1("model.d_state", m.d_state)?;
        self.at_least_1("model.expand", m.expand)?;
        self.at_least_1("model.conv_size", m.conv_size)?;
        self.optional_size("model.dt_rank", m.dt_rank, "ceil(hidden_size / 16)")?;
        self.positive("model.dt_min", m.dt_min)?;
        self.positive("model.dt_max", m.dt_max)?;
        if m.dt_min >= m.dt_max {
            return Err(self.fail(
                "model.dt_min",
                m.dt_min,
                format!("must be below model.dt_max = {}", m.dt_max),
            ));
        }
        self.non_negative("model.dt_init_floor", m.dt_init_floor)?;
        self.positive("model.norm_eps", m.norm_eps)?;
        self.positive("model.initializer_range", m.initializer_range)?;
        self.init_from(m.init_from.as_deref())
    }

    fn data(&self, d: &DataConfig, model: &ModelConfig) -> Check {
        self.non_empty("data.train", &d.train)?;
        self.non_empty("data.valid", &d.valid)?;
        self.non_empty("data.tokenizer", &d.tokenizer)?;
        self.at_least_1("data.seq_len", d.seq_len)?;
        if d.tokenizer == "byte" && model.vocab_size() < 256 {
            return Err(self.fail(
                "model.vocab_size",
                model.vocab_size(),
                "the byte tokenizer (data.tokenizer = \"byte\") produces 256 token ids; \
                 vocab_size must be at least 256",
            ));
        }
        Ok(())
    }

    fn train(&self, t: &TrainConfig, seq_len: usize) -> Check {
        self.at_least_1("train.micro_batch_size", t.micro_batch_size)?;
        let micro = t.micro_batch_size;
        if let Some(batch) = t.batch_size {
            self.at_least_1("train.batch_size", batch)?;
            if batch.checked_mul(seq_len).is_none() {
                return Err(self.fail(
                    "train.batch_size",
                    batch,
                    format!("times data.seq_len {seq_len} does not fit in 64 bits"),
                ));
            }
            if batch % micro != 0 {
                return Err(self.fail(
                    "train.batch_size",
                    batch,
                    format!("is not a multiple of train.micro_batch_size = {micro}"),
                ));
            }
        }
        if let Some(tokens) = t.batch_tokens {
            self.at_least_1("train.batch_tokens", tokens)?;
            let per_micro = seq_len.checked_mul(micro).filter(|&p| tokens % p == 0);
            if per_micro.is_none() {
                return Err(self.fail(
                    "train.batch_tokens",
                    tokens,
                    format!(
                        "is not a multiple of data.seq_len {seq_len} * train.micro_batch_size \
                         {micro} = {}",
                        seq_len as u128 * micro as u128
                    ),
                ));
            }
            if let Some(batch) = t.batch_size {
                if batch.checked_mul(seq_len) != Some(tokens) {
                    return Err(self.fail(
                        "train.batch_tokens",
                        tokens,
                        format!(
                            "disagrees with train.batch_size {batch} * data.seq_len {seq_len} = \
                             {}; set only one of them",
                            batch as u128 * seq_len as u128
                        ),
                    ));
                }
            }
        }
        self.at_least_1_u64("train.max_steps", t.max_steps)?;
        self.non_negative("train.lr", t.lr)?;
        self.non_negative("train.min_lr", t.min_lr)?;
        if t.min_lr > t.lr {
            return Err(self.fail(
                "train.min_lr",
                t.min_lr,
                format!("must not exceed train.lr = {}", t.lr),
            ));
        }
        if t.warmup_steps > t.max_steps {
            return Err(self.fail(
                "train.warmup_steps",
                t.warmup_steps,
                format!("exceeds train.max_steps = {}", t.max_steps),
            ));
        }
        if !(t.decay_fraction > 0.0 && t.decay_fraction <= 1.0) {
            return Err(self.fail(
                "train.decay_fraction",
                t.decay_fraction,
                "must be in (0, 1]",
            ));
        }
        self.non_negative("train.weight_decay", t.weight_decay)?;
        self.unit_interval_open_above("train.beta1", t.beta1)?;
        self.unit_interval_open_above("train.beta2", t.beta2)?;
        self.positive("train.eps", t.eps)?;
        self.non_negative("train.grad_clip", t.grad_clip)?;
        self.loss_scale(&t.loss_scale)?;
        self.at_least_1_u64("train.max_consecutive_skips", t.max_consecutive_skips)?;
        self.at_least_1("train.keep_checkpoints", t.keep_checkpoints)
    }

    fn loss_scale(&self, s: &LossScaleConfig) -> Check {
        self.positive("train.loss_scale.init", s.init)?;
        self.at_least_1_u64("train.loss_scale.growth_interval", s.growth_interval)?;
        if !(s.growth_factor.is_finite() && s.growth_factor >= 1.0) {
            return Err(self.fail(
                "train.loss_scale.growth_factor",
                s.growth_factor,
                "must be a finite number >= 1",
            ));
        }
        if !(s.backoff_factor > 0.0 && s.backoff_factor < 1.0) {
            return Err(self.fail(
                "train.loss_scale.backoff_factor",
                s.backoff_factor,
                "must be in (0, 1)",
            ));
        }
        self.positive("train.loss_scale.min_scale", s.min_scale)?;
        if s.min_scale > s.init {
            return Err(self.fail(
                "train.loss_scale.min_scale",
                s.min_scale,
                format!("must not exceed train.loss_scale.init = {}", s.init),
            ));
        }
        Ok(())
    }

    fn kernels(&self, config: &Config) -> Check {
        let mode = config.kernels.mode;
        let needs_cuda = !matches!(
            mode,
            ModeChoice::Auto | ModeChoice::Fixed(GlaMode::Reference)
        );
        if needs_cuda && config.run.device == "cpu" && matches!(config.model, ModelConfig::Gla(_)) {
            return Err(self.fail(
                "kernels.mode",
                format!("{:?}", mode.name()),
                "needs CUDA, but run.device = \"cpu\"; use \"auto\" or \"reference\" on CPU",
            ));
        }
        Ok(())
    }

    fn logging(&self, l: &LoggingConfig, max_steps: u64) -> Check {
        self.at_least_1_u64("logging.log_every", l.log_every)?;
        match l.profile_steps[..] {
            [] => Ok(()),
            [first, last] if 1 <= first && first <= last && last <= max_steps => Ok(()),
            _ => Err(self.fail(
                "logging.profile_steps",
                format!("{:?}", l.profile_steps),
                format!(
                    "must be [first, last] with 1 <= first <= last <= train.max_steps = \
                     {max_steps} (or [] for no profile)"
                ),
            )),
        }
    }
}

/// "auto", "cpu", "cuda" or "cuda:N".
fn device_is_valid(device: &str) -> bool {
    match device {
        "auto" | "cpu" | "cuda" => true,
        other => other
            .strip_prefix("cuda:")
            // Digits only: u32's parser would also take "+1".
            .is_some_and(|index| {
                index.bytes().all(|b| b.is_ascii_digit()) && index.parse::<u32>().is_ok()
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error message of `config` with `edit` applied, or None when it validates.
    fn check(mut config: Config, edit: impl FnOnce(&mut Config)) -> Option<String> {
        edit(&mut config);
        validate(&config, &Origin::new("x.toml")).err().map(|e| {
            assert!(e.is_bad_input());
            e.to_string()
        })
    }

    fn gla() -> Config {
        toml::from_str("[model]\ntype = \"gla\"").unwrap()
    }

    fn transformer() -> Config {
        toml::from_str("[model]\ntype = \"transformer\"").unwrap()
    }

    fn mamba() -> Config {
        toml::from_str("[model]\ntype = \"mamba\"").unwrap()
    }

    fn gla_mut(c: &mut Config) -> &mut GlaConfig {
        match &mut c.model {
            ModelConfig::Gla(m) => m,
            _ => unreachable!("gla() builds a GLA config"),
        }
    }

    fn transformer_mut(c: &mut Config) -> &mut TransformerConfig {
        match &mut c.model {
            ModelConfig::Transformer(m) => m,
            _ => unreachable!("transformer() builds a Transformer config"),
        }
    }

    fn mamba_mut(c: &mut Config) -> &mut MambaConfig {
        match &mut c.model {
            ModelConfig::Mamba(m) => m,
            _ => unreachable!("mamba() builds a Mamba config"),
        }
    }

    /// A change to a config, for tables of cases.
    type Edit = fn(&mut Config);

    /// Each edit of a `base()` config is rejected with a message containing its text.
    #[track_caller]
    fn rejected(base: fn() -> Config, cases: &[(Edit, &str)]) {
        for (edit, expected) in cases {
            assert_err(check(base(), edit), expected);
        }
    }

    #[track_caller]
    fn assert_err(msg: Option<String>, expected: &str) {
        let msg = msg.expect("config should be rejected");
        assert!(
            msg.contains(expected),
            "{msg:?} does not contain {expected:?}"
        );
        assert!(msg.starts_with("x.toml: "), "{msg}");
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(check(gla(), |_| ()), None);
        assert_eq!(check(transformer(), |_| ()), None);
        assert_eq!(check(mamba(), |_| ()), None);
    }

    #[test]
    fn init_from_must_name_a_directory() {
        assert_eq!(
            check(gla(), |c| gla_mut(c).init_from = Some("hf/gla".into())),
            None
        );
        assert_err(
            check(mamba(), |c| mamba_mut(c).init_from = Some(" ".into())),
            "model.init_from = \" \": must name a Hugging Face model directory",
        );
        assert_err(
            check(transformer(), |c| {
                transformer_mut(c).init_from = Some(String::new())
            }),
            "model.init_from = \"\": must name",
        );
    }

    #[test]
    fn tiny_head_dims_are_valid() {
        let msg = check(gla(), |c| {
            let m = gla_mut(c);
            m.hidden_size = 32;
            m.num_heads = 4;
            m.vocab_size = 256;
        });
        assert_eq!(msg, None);
        let mut c = gla();
        gla_mut(&mut c).hidden_size = 32;
        assert_eq!(gla_mut(&mut c).head_k_dim(), 4);
        // head_k_dim 1 too.
        assert_eq!(
            check(gla(), |c| {
                let m = gla_mut(c);
                m.hidden_size = 8;
                m.num_heads = 4;
            }),
            None
        );
    }

    #[test]
    fn gla_dimension_rules() {
        rejected(
            gla,
            &[
                (
                    |c| gla_mut(c).num_heads = 3,
                    "model.num_heads = 3: key_dim 512 (hidden_size 1024 * expand_k 0.5) is not divisible by it",
                ),
                (
                    |c| {
                        let m = gla_mut(c);
                        m.num_heads = 8;
                        // 96 * (1/3) is 32 up to float error: accepted as 32.
                        m.expand_k = 1.0 / 3.0;
                        m.expand_v = 0.625;
                        m.hidden_size = 96;
                    },
                    "model.num_heads = 8: value_dim 60 (hidden_size 96 * expand_v 0.625) is not divisible by it",
                ),
                (
                    |c| gla_mut(c).expand_k = 0.3,
                    "model.expand_k = 0.3: key_dim = hidden_size 1024 * 0.3 = 307.2 is not an integer",
                ),
                (
                    |c| {
                        gla_mut(c).hidden_size = 2;
                        gla_mut(c).expand_k = 0.2;
                    },
                    "model.expand_k = 0.2: key_dim = hidden_size 2 * 0.2 = 0.4 rounds to 0",
                ),
                (|c| gla_mut(c).expand_k = 0.0, "model.expand_k = 0: must be a finite number > 0"),
                (
                    |c| gla_mut(c).expand_v = -1.0,
                    "model.expand_v = -1: must be a finite number > 0",
                ),
                (|c| gla_mut(c).hidden_size = 0, "model.hidden_size = 0: must be at least 1"),
                (|c| gla_mut(c).num_heads = 0, "model.num_heads = 0: must be at least 1"),
                (|c| gla_mut(c).num_layers = 0, "model.num_layers = 0: must be at least 1"),
                (|c| gla_mut(c).conv_size = 0, "model.conv_size = 0: must be at least 1"),
                (
                    |c| gla_mut(c).intermediate_size = Some(0),
                    "model.intermediate_size = 0: must be at least 1",
                ),
                (|c| gla_mut(c).gate_low_rank_dim = 0, "model.gate_low_rank_dim = 0"),
                (|c| gla_mut(c).norm_eps = 0.0, "model.norm_eps = 0"),
                (|c| gla_mut(c).expand_k = f64::NAN, "model.expand_k = NaN"),
            ],
        );
    }

    #[test]
    fn transformer_head_rules() {
        rejected(
            transformer,
            &[
                (
                    |c| transformer_mut(c).num_heads = 3,
                    "model.num_heads = 3: hidden_size 1024 is not divisible by it",
                ),
                (
                    |c| {
                        let m = transformer_mut(c);
                        m.hidden_size = 96;
                        m.num_heads = 32;
                    },
                    "model.num_heads = 32: head_dim = hidden_size 96 / num_heads = 3 is odd",
                ),
                (
                    |c| transformer_mut(c).num_kv_heads = Some(3),
                    "model.num_kv_heads = 3: num_heads 16 is not divisible by it",
                ),
                (
                    |c| transformer_mut(c).num_kv_heads = Some(0),
                    "model.num_kv_heads = 0: must be at least 1",
                ),
            ],
        );
        assert_eq!(
            check(transformer(), |c| transformer_mut(c).num_kv_heads = Some(4)),
            None
        );
        assert_err(
            check(transformer(), |c| transformer_mut(c).rope_theta = 0.0),
            "model.rope_theta = 0",
        );
    }

    #[test]
    fn mamba_rules() {
        rejected(
            mamba,
            &[
                (
                    |c| mamba_mut(c).dt_min = 0.1,
                    "model.dt_min = 0.1: must be below model.dt_max = 0.1",
                ),
                (
                    |c| mamba_mut(c).conv_size = 0,
                    "model.conv_size = 0: must be at least 1",
                ),
                (|c| mamba_mut(c).d_state = 0, "model.d_state = 0"),
                (|c| mamba_mut(c).expand = 0, "model.expand = 0"),
                (
                    |c| mamba_mut(c).dt_rank = Some(0),
                    "model.dt_rank = 0: must be at least 1",
                ),
                (|c| mamba_mut(c).dt_min = -1.0, "model.dt_min = -1"),
            ],
        );
    }

    #[test]
    fn data_rules() {
        rejected(
            gla,
            &[
                (
                    |c| c.data.seq_len = 0,
                    "data.seq_len = 0: must be at least 1",
                ),
                (
                    |c| c.data.train = String::new(),
                    "data.train = \"\": must not be empty",
                ),
                (
                    |c| gla_mut(c).vocab_size = 100,
                    "model.vocab_size = 100: the byte tokenizer",
                ),
            ],
        );
        assert_eq!(
            check(gla(), |c| {
                gla_mut(c).vocab_size = 100;
                c.data.tokenizer = "tok.json".into();
            }),
            None
        );
    }

    #[test]
    fn batch_rules() {
        rejected(
            gla,
            &[
                (
                    |c| c.train.micro_batch_size = 0,
                    "train.micro_batch_size = 0: must be at least 1",
                ),
                (
                    |c| c.train.batch_size = Some(12),
                    "train.batch_size = 12: is not a multiple of train.micro_batch_size = 8",
                ),
                (|c| c.train.batch_size = Some(0), "train.batch_size = 0: must be at least 1"),
                (
                    |c| c.train.batch_size = Some(1 << 60),
                    "times data.seq_len 2048 does not fit in 64 bits",
                ),
                (
                    |c| c.train.batch_tokens = Some(100_000),
                    "train.batch_tokens = 100000: is not a multiple of data.seq_len 2048 * \
             train.micro_batch_size 8 = 16384",
                ),
                (
                    |c| {
                        c.train.batch_tokens = Some(32768);
                        c.train.batch_size = Some(8);
                    },
                    "train.batch_tokens = 32768: disagrees with train.batch_size 8 * data.seq_len 2048 = 16384",
                ),
            ],
        );
        assert_eq!(
            check(gla(), |c| {
                c.train.batch_tokens = Some(32768);
                c.train.batch_size = Some(16);
            }),
            None
        );
    }

    #[test]
    fn optimizer_and_schedule_rules() {
        rejected(
            gla,
            &[
                (
                    |c| c.train.lr = -1e-3,
                    "train.lr = -0.001: must be a finite number >= 0",
                ),
                (
                    |c| c.train.min_lr = 1e-3,
                    "train.min_lr = 0.001: must not exceed train.lr = 0.0003",
                ),
                (
                    |c| c.train.warmup_steps = 2000,
                    "train.warmup_steps = 2000: exceeds train.max_steps = 1000",
                ),
                (|c| c.train.max_steps = 0, "train.max_steps = 0"),
            ],
        );
        for bad in [0.0, 1.5, -0.1] {
            assert_err(
                check(gla(), |c| c.train.decay_fraction = bad),
                &format!("train.decay_fraction = {bad}: must be in (0, 1]"),
            );
        }
        assert_eq!(check(gla(), |c| c.train.decay_fraction = 1.0), None);
        rejected(
            gla,
            &[
                (
                    |c| c.train.beta1 = 1.0,
                    "train.beta1 = 1: must be in [0, 1)",
                ),
                (
                    |c| c.train.beta2 = -0.5,
                    "train.beta2 = -0.5: must be in [0, 1)",
                ),
            ],
        );
        assert_eq!(check(gla(), |c| c.train.beta1 = 0.0), None);
        assert_err(
            check(gla(), |c| c.train.grad_clip = -1.0),
            "train.grad_clip = -1: must be a finite number >= 0",
        );
        assert_eq!(check(gla(), |c| c.train.grad_clip = 0.0), None);
        rejected(
            gla,
            &[
                (|c| c.train.eps = 0.0, "train.eps = 0"),
                (|c| c.train.weight_decay = -0.1, "train.weight_decay = -0.1"),
                (
                    |c| c.train.keep_checkpoints = 0,
                    "train.keep_checkpoints = 0: must be at least 1",
                ),
                (
                    |c| c.train.max_consecutive_skips = 0,
                    "train.max_consecutive_skips = 0",
                ),
            ],
        );
    }

    #[test]
    fn loss_scale_rules() {
        rejected(
            gla,
            &[
                (
                    |c| c.train.loss_scale.backoff_factor = 1.0,
                    "train.loss_scale.backoff_factor = 1: must be in (0, 1)",
                ),
                (
                    |c| c.train.loss_scale.growth_factor = 0.5,
                    "train.loss_scale.growth_factor = 0.5: must be a finite number >= 1",
                ),
                (|c| c.train.loss_scale.init = 0.0, "train.loss_scale.init = 0"),
                (
                    |c| c.train.loss_scale.growth_interval = 0,
                    "train.loss_scale.growth_interval = 0",
                ),
                (
                    |c| c.train.loss_scale.min_scale = 1e6,
                    "train.loss_scale.min_scale = 1000000: must not exceed train.loss_scale.init = 65536",
                ),
            ],
        );
    }

    #[test]
    fn run_rules() {
        for bad in [
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "CUDA",
            "cuda:99999999999",
        ] {
            assert_err(
                check(gla(), |c| c.run.device = bad.into()),
                &format!(
                    "run.device = {bad:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""
                ),
            );
        }
        for good in ["auto", "cpu", "cuda", "cuda:0", "cuda:7"] {
            assert_eq!(check(gla(), |c| c.run.device = good.into()), None, "{good}");
        }
        rejected(
            gla,
            &[
                (
                    |c| c.run.name = String::new(),
                    "run.name = \"\": must not be empty",
                ),
                (
                    |c| c.run.name = "a/b".into(),
                    "run.name = \"a/b\": must be a plain directory name",
                ),
                (|c| c.run.name = "..".into(), "run.name = \"..\""),
                (
                    |c| c.run.out_dir = " ".into(),
                    "run.out_dir = \" \": must not be empty",
                ),
            ],
        );
    }

    #[test]
    fn run_names_are_at_most_100_characters() {
        assert_eq!(check(gla(), |c| c.run.name = "n".repeat(100)), None);
        assert_err(
            check(gla(), |c| c.run.name = "n".repeat(300)),
            "is 300 characters (300 bytes) long; at most 100 characters",
        );
        // 90 four-byte characters are 360 bytes: more than a file name can hold.
        assert_err(
            check(gla(), |c| c.run.name = "\u{1F600}".repeat(90)),
            "is 90 characters (360 bytes) long",
        );
    }

    /// Sizes whose element or parameter counts do not fit 64 bits name the key that makes them
    /// so large, derived widths (the default intermediate_size) included.
    #[test]
    fn sizes_that_overflow_name_their_key() {
        let huge = 1usize << 62;
        let embedding = format!("model.vocab_size = {huge}: the embedding");
        assert_err(check(gla(), |c| gla_mut(c).vocab_size = huge), &embedding);
        assert_err(
            check(mamba(), |c| mamba_mut(c).vocab_size = huge),
            &embedding,
        );
        let hidden = format!("model.hidden_size = {huge}: ");
        assert_err(check(gla(), |c| gla_mut(c).hidden_size = huge), &hidden);
        assert_err(
            check(transformer(), |c| transformer_mut(c).hidden_size = huge),
            &hidden,
        );
        assert_err(check(mamba(), |c| mamba_mut(c).hidden_size = huge), &hidden);
        // Too large for the MLP only, through the default intermediate_size: hidden_size.
        assert_err(
            check(gla(), |c| gla_mut(c).hidden_size = 1_500_000_000),
            "model.hidden_size = 1500000000: the MLP projection (hidden_size 1500000000 x \
             intermediate_size 4000000000)",
        );
        assert_err(
            check(gla(), |c| gla_mut(c).intermediate_size = Some(huge)),
            &format!("model.intermediate_size = {huge}: the MLP projection"),
        );
        rejected(
            gla,
            &[
                (
                    |c| gla_mut(c).expand_k = 1e15,
                    "model.expand_k = 1000000000000000: the query/key projection",
                ),
                (
                    |c| gla_mut(c).expand_v = 1e18,
                    "model.expand_v = 1000000000000000000: value_dim = hidden_size 1024 * \
             1000000000000000000 = 1024000000000000000000 does not fit 64 bits",
                ),
            ],
        );
        assert_err(
            check(mamba(), |c| mamba_mut(c).expand = 1 << 60),
            "model.expand = 1152921504606846976: the input/output projection",
        );
        rejected(
            gla,
            &[
                (
                    |c| c.train.micro_batch_size = 1 << 50,
                    "train.micro_batch_size = 1125899906842624: one micro-batch's logits",
                ),
                (
                    |c| gla_mut(c).num_layers = 1 << 40,
                    "model.num_layers = 1099511627776: the model would have",
                ),
            ],
        );
        // Large but countable: the preflight's business, not validation's.
        assert_eq!(
            check(gla(), |c| gla_mut(c).vocab_size = 1_000_000_000),
            None
        );
    }

    #[test]
    fn kernel_mode_needs_cuda_for_gla_only() {
        assert_err(
            check(gla(), |c| {
                c.run.device = "cpu".into();
                c.kernels.mode = ModeChoice::Fixed(GlaMode::FusedChunk);
            }),
            "kernels.mode = \"fused_chunk\": needs CUDA, but run.device = \"cpu\"",
        );
        assert_eq!(
            check(mamba(), |c| {
                c.run.device = "cpu".into();
                c.kernels.mode = ModeChoice::Fixed(GlaMode::Chunk);
            }),
            None
        );
        assert_eq!(
            check(gla(), |c| {
                c.run.device = "cpu".into();
                c.kernels.mode = ModeChoice::Fixed(GlaMode::Reference);
            }),
            None
        );
    }

    #[test]
    fn logging_rules() {
        assert_err(
            check(gla(), |c| c.logging.log_every = 0),
            "logging.log_every = 0: must be at least 1",
        );
        for steps in [
            vec![3],
            vec![0, 2],
            vec![5, 4],
            vec![1, 1_000_000],
            vec![1, 2, 3],
        ] {
            let shown = format!("{steps:?}");
            assert_err(
                check(gla(), |c| c.logging.profile_steps = steps),
                &format!("logging.profile_steps = {shown}: must be [first, last]"),
            );
        }
        assert!(check(gla(), |c| c.logging.profile_steps = vec![2, 4]).is_none());
    }

    #[test]
    fn errors_name_the_override_that_set_the_key() {
        let mut origin = Origin::new("x.toml");
        origin.add_override("train.lr".into(), "train.lr=-1");
        let mut config = gla();
        config.train.lr = -1.0;
        let msg = validate(&config, &origin).unwrap_err().to_string();
        assert!(
            msg.starts_with("x.toml (--set train.lr=-1): train.lr = -1: "),
            "{msg}"
        );
    }
}
