//! The TOML schema: what a user writes. Every table denies unknown keys; every key has a
//! default unless noted (the full list, with defaults, is in the README's config reference). The crate's
//! `validate.rs` checks the values and [`crate::ResolvedConfig`] fills in derived values
//! (intermediate sizes, dt_rank, batch sizes); that resolved config is what the run directory
//! keeps.

use serde::{Deserialize, Serialize};

/// A whole run: `[run]`, `[model]`, `[data]`, `[train]`, `[kernels]`, `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[run]`.
    #[serde(default)]
    pub run: RunConfig,
    /// `[model]` (required).
    pub model: ModelConfig,
    /// `[data]`.
    #[serde(default)]
    pub data: DataConfig,
    /// `[train]`.
    #[serde(default)]
    pub train: TrainConfig,
    /// `[kernels]`.
    #[serde(default)]
    pub kernels: KernelConfig,
    /// `[logging]`.
    #[serde(default)]
    pub logging: LoggingConfig,
}

/// `[run]`: where the run lives and how it is seeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; the run directory is `out_dir/name`.
    pub name: String,
    /// Parent directory of run directories.
    pub out_dir: String,
    /// Seed for initialisation, data order and dropout-free sampling.
    pub seed: u64,
    /// "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// Intra-op CPU threads; 0 = libtorch's default.
    pub cpu_threads: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            out_dir: "runs".into(),
            seed: 1234,
            device: "auto".into(),
            cpu_threads: 0,
        }
    }
}

/// `[model]`, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ModelConfig {
    Gla(GlaConfig),
    Transformer(TransformerConfig),
    Mamba(MambaConfig),
}

/// Gated linear attention (flash-linear-attention's `GLAForCausalLM` layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlaConfig {
    /// Embedding rows and output logits.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Blocks (attention + MLP each).
    pub num_layers: usize,
    /// Heads; must divide key_dim and value_dim.
    pub num_heads: usize,
    /// key_dim = hidden_size * expand_k.
    pub expand_k: f64,
    /// value_dim = hidden_size * expand_v.
    pub expand_v: f64,
    /// SwiGLU width; `None` = 256 * ceil(2/3 * 4 * hidden_size / 256).
    pub intermediate_size: Option<usize>,
    /// Rank of the forget-gate projection (hidden -> rank -> key_dim).
    pub gate_low_rank_dim: usize,
    /// gk = logsigmoid(...) / gate_logit_normalizer.
    pub gate_logit_normalizer: f64,
    /// Short causal depthwise convolution (silu) on q, k, v.
    pub use_short_conv: bool,
    /// Kernel size of the short convolution.
    pub conv_size: usize,
    /// Output gate swish(g) after the per-head RMSNorm.
    pub use_output_gate: bool,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Share the input embedding with the output projection.
    pub tie_embeddings: bool,
    /// Std of the normal initialisation of linear and embedding weights.
    pub initializer_range: f64,
    /// A Hugging Face model directory whose weights a fresh run starts from (written by
    /// `glatrain export`, or a published model of the matching class); `None` = initialise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for GlaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 1024,
            num_layers: 24,
            num_heads: 4,
            expand_k: 0.5,
            expand_v: 1.0,
            intermediate_size: None,
            gate_low_rank_dim: 16,
            gate_logit_normalizer: 16.0,
            use_short_conv: false,
            conv_size: 4,
            use_output_gate: true,
            norm_eps: 1e-6,
            tie_embeddings: true,
            initializer_range: 0.02,
            init_from: None,
        }
    }
}

/// LLaMA-style softmax Transformer++.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerConfig {
    /// Embedding rows and output logits.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Blocks (attention + MLP each).
    pub num_layers: usize,
    /// Query heads; must divide hidden_size, giving an even head_dim (RoPE).
    pub num_heads: usize,
    /// Grouped-query attention; `None` = num_heads.
    pub num_kv_heads: Option<usize>,
    /// SwiGLU width; `None` = 256 * ceil(2/3 * 4 * hidden_size / 256).
    pub intermediate_size: Option<usize>,
    /// RoPE base.
    pub rope_theta: f64,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Share the input embedding with the output projection.
    pub tie_embeddings: bool,
    /// Std of the normal initialisation of linear and embedding weights.
    pub initializer_range: f64,
    /// A Hugging Face model directory whose weights a fresh run starts from (written by
    /// `glatrain export`, or a published model of the matching class); `None` = initialise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 1024,
            num_layers: 24,
            num_heads: 16,
            num_kv_heads: None,
            intermediate_size: None,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            tie_embeddings: true,
            initializer_range: 0.02,
            init_from: None,
        }
    }
}

/// Mamba (v1): no MLP, a selective-scan mixer per layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MambaConfig {
    /// Embedding rows and output logits.
    pub vocab_size: usize,
    /// Model width (d_model).
    pub hidden_size: usize,
    /// Mixer layers.
    pub num_layers: usize,
    /// SSM state size per channel.
    pub d_state: usize,
    /// d_inner = expand * hidden_size.
    pub expand: usize,
    /// Kernel size of the causal depthwise convolution.
    pub conv_size: usize,
    /// `None` = ceil(hidden_size / 16).
    pub dt_rank: Option<usize>,
    /// Lower end of the log-uniform initial step size.
    pub dt_min: f64,
    /// Upper end of the log-uniform initial step size.
    pub dt_max: f64,
    /// Floor applied to initial step sizes.
    pub dt_init_floor: f64,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Share the input embedding with the output projection.
    pub tie_embeddings: bool,
    /// Std of the normal initialisation of linear and embedding weights.
    pub initializer_range: f64,
    /// A Hugging Face model directory whose weights a fresh run starts from (written by
    /// `glatrain export`, or a published model of the matching class); `None` = initialise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for MambaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 1024,
            num_layers: 48,
            d_state: 16,
            expand: 2,
            conv_size: 4,
            dt_rank: None,
            dt_min: 1e-3,
            dt_max: 1e-1,
            dt_init_floor: 1e-4,
            norm_eps: 1e-5,
            tie_embeddings: true,
            initializer_range: 0.02,
            init_from: None,
        }
    }
}

/// `[data]`: corpora, tokenizer, sequence length, document boundaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// "embedded" (the corpus shipped in `data/`, train split) or a path: a directory written by
    /// `glatrain prepare` (manifest.json + shards), a single shard, or a nanoGPT `.bin`.
    pub train: String,
    /// Same forms as `train`; "embedded" means the embedded validation split.
    pub valid: String,
    /// "byte" (vocab 256, nothing to load) or the path of a Hugging Face `tokenizer.json`.
    /// Only used where text is tokenized (the embedded corpus, `eval` on text, `sample`).
    pub tokenizer: String,
    /// Tokens per training sequence (the context length).
    pub seq_len: usize,
    /// Compute each document of a packed sequence as if it were alone (no state, attention or
    /// convolution crosses a document boundary), in training and evaluation. Needs data that
    /// records where documents begin: the embedded corpus, or a dataset `glatrain prepare`
    /// wrote (manifest format version 2).
    pub document_boundaries: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: "embedded".into(),
            valid: "embedded".into(),
            tokenizer: "byte".into(),
            seq_len: 2048,
            document_boundaries: false,
        }
    }
}

/// Learning-rate schedule shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup, then cosine decay from `lr` to `min_lr` at `max_steps`.
    Cosine,
    /// Warmup-stable-decay: warmup, constant `lr`, then linear decay to `min_lr` over the last
    /// `decay_fraction` of `max_steps`.
    Wsd,
    /// Linear warmup, then constant `lr`.
    Constant,
}

/// Numeric precision of the forward/backward pass. Master weights and optimizer state are fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

/// What the backward recomputes instead of keeping from the forward
/// (`train.activation_checkpointing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Keep every activation the backward needs.
    #[default]
    None,
    /// Keep each block's input only; the backward runs the block's forward again.
    Full,
    /// Keep each block's input and the outputs of its matrix products; the backward recomputes
    /// the norms, the sequence mixer and the elementwise work from them.
    Selective,
}

impl ActivationCheckpointing {
    /// The TOML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Full => "full",
            Self::Selective => "selective",
        }
    }
}

/// `[train]`: optimisation and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per optimizer step (all micro-batches together). Exclusive with `batch_tokens`.
    pub batch_size: Option<usize>,
    /// Tokens per optimizer step; must be a multiple of `seq_len * micro_batch_size`.
    pub batch_tokens: Option<usize>,
    /// Sequences per forward/backward; the optimizer step accumulates
    /// `batch_size / micro_batch_size` of them.
    pub micro_batch_size: usize,
    /// Optimizer steps of the run.
    pub max_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    /// Linear warmup from 0 to `lr`.
    pub warmup_steps: u64,
    /// Shape of the learning-rate schedule.
    pub schedule: Schedule,
    /// Wsd only: fraction of `max_steps` spent decaying.
    pub decay_fraction: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub beta1: f64,
    /// AdamW second-moment decay.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Global-norm gradient clipping; 0 disables.
    pub grad_clip: f64,
    /// Forward/backward precision.
    pub precision: Precision,
    /// What the backward recomputes instead of keeping (memory for time).
    pub activation_checkpointing: ActivationCheckpointing,
    /// Dynamic loss scaling (fp16 only).
    pub loss_scale: LossScaleConfig,
    /// Stop the run after this many consecutive steps with non-finite gradients.
    pub max_consecutive_skips: u64,
    /// Evaluate every N steps (0 = only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (0 = the whole validation set).
    pub eval_batches: usize,
    /// Checkpoint every N steps (0 = only at the end and on interruption).
    pub checkpoint_every: u64,
    /// Complete checkpoints kept on disk (oldest deleted first).
    pub keep_checkpoints: usize,
    /// Data parallel: each rank keeps the AdamW moments of its share of the parameters only and
    /// updates those (ZeRO stage 1).
    pub shard_optimizer_state: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: None,
            batch_tokens: None,
            micro_batch_size: 8,
            max_steps: 1000,
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            decay_fraction: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            precision: Precision::Bf16,
            activation_checkpointing: ActivationCheckpointing::None,
            loss_scale: LossScaleConfig::default(),
            max_consecutive_skips: 20,
            eval_every: 500,
            eval_batches: 50,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            shard_optimizer_state: false,
        }
    }
}

/// `[train.loss_scale]`: dynamic loss scaling for fp16.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleConfig {
    /// Initial loss scale.
    pub init: f64,
    /// Multiply the scale by `growth_factor` after this many finite steps in a row.
    pub growth_interval: u64,
    /// Multiplier applied after `growth_interval` finite steps.
    pub growth_factor: f64,
    /// Multiply the scale by `backoff_factor` on a non-finite gradient (and skip the step).
    pub backoff_factor: f64,
    /// The scale never drops below this.
    pub min_scale: f64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init: 65536.0,
            growth_interval: 2000,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            min_scale: 1.0,
        }
    }
}

/// How the GLA function is computed: a kernel schedule, or the tensor-op reference. Every mode
/// computes the same function; the preflight resolves `kernels.mode = "auto"` to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlaMode {
    /// Chunk states materialised, parallel over chunks (the training default).
    Chunk,
    /// One block walks the chunks with the state on chip.
    FusedChunk,
    /// Token by token with the state in registers: short sequences and decoding.
    FusedRecurrent,
    /// The tensor-op reference (the only one on CPU).
    Reference,
}

impl GlaMode {
    /// Every mode.
    pub const ALL: [GlaMode; 4] = [
        GlaMode::Chunk,
        GlaMode::FusedChunk,
        GlaMode::FusedRecurrent,
        GlaMode::Reference,
    ];

    /// The TOML spelling ("chunk", "fused_chunk", "fused_recurrent", "reference").
    pub fn name(self) -> &'static str {
        match self {
            GlaMode::Chunk => "chunk",
            GlaMode::FusedChunk => "fused_chunk",
            GlaMode::FusedRecurrent => "fused_recurrent",
            GlaMode::Reference => "reference",
        }
    }

    /// The mode a TOML spelling names.
    pub fn from_name(name: &str) -> Option<GlaMode> {
        GlaMode::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// `kernels.mode`: a [`GlaMode`], or `"auto"` (the preflight picks per layer shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ModeChoice {
    /// The preflight chooses (rules or measurement).
    Auto,
    /// This mode for every GLA layer.
    Fixed(GlaMode),
}

impl ModeChoice {
    /// The TOML spelling ("auto" or the mode's).
    pub fn name(self) -> &'static str {
        match self {
            ModeChoice::Auto => "auto",
            ModeChoice::Fixed(mode) => mode.name(),
        }
    }
}

impl TryFrom<String> for ModeChoice {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s == "auto" {
            return Ok(ModeChoice::Auto);
        }
        GlaMode::from_name(&s)
            .map(ModeChoice::Fixed)
            .ok_or_else(|| {
                format!(
                    "unknown kernel mode `{s}`, expected one of `auto`, `chunk`, `fused_chunk`, \
                 `fused_recurrent`, `reference`"
                )
            })
    }
}

impl From<ModeChoice> for String {
    fn from(choice: ModeChoice) -> String {
        choice.name().to_string()
    }
}

/// How the preflight decides in `Auto` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreflightPolicy {
    /// Rules from the dimensions and the device profile; instant.
    Rules,
    /// Time each candidate on the real shapes; cached on disk.
    Measure,
}

/// `[kernels]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// GLA kernel mode, or auto.
    pub mode: ModeChoice,
    /// How `Auto` decides.
    pub preflight: PreflightPolicy,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            mode: ModeChoice::Auto,
            preflight: PreflightPolicy::Rules,
        }
    }
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressStyle {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    Bar,
    Lines,
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log scalars every N steps.
    pub log_every: u64,
    /// Write TensorBoard event files in the run directory.
    pub tensorboard: bool,
    /// `metrics.jsonl` in the run directory.
    pub jsonl: bool,
    /// Progress display.
    pub progress: ProgressStyle,
    /// `[first, last]`: record these optimizer steps with libtorch's profiler (a trace and a
    /// summary in the run directory); empty: no profile.
    pub profile_steps: Vec<u64>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            log_every: 10,
            tensorboard: true,
            jsonl: true,
            progress: ProgressStyle::Auto,
            profile_steps: Vec::new(),
        }
    }
}

/// SwiGLU width used by GLA and Transformer++ when `intermediate_size` is unset:
/// 256 * ceil(2/3 * 4 * hidden / 256) (2816 at hidden 1024).
pub fn default_intermediate_size(hidden_size: usize) -> usize {
    // Integer arithmetic: the float form 2.0 / 3.0 * 4.0 * h is off by an ulp for some h. In 128
    // bits, so that a huge hidden_size saturates (and validation names it) instead of wrapping.
    let width = (8 * hidden_size as u128).div_ceil(3).div_ceil(256) * 256;
    usize::try_from(width).unwrap_or(usize::MAX)
}

impl GlaConfig {
    /// Total key width, hidden_size * expand_k.
    pub fn key_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_k).round() as usize
    }
    /// Total value width, hidden_size * expand_v.
    pub fn value_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_v).round() as usize
    }
    /// Key width per head, key_dim / num_heads.
    pub fn head_k_dim(&self) -> usize {
        self.key_dim() / self.num_heads
    }
    /// Value width per head, value_dim / num_heads.
    pub fn head_v_dim(&self) -> usize {
        self.value_dim() / self.num_heads
    }
    /// SwiGLU width: `intermediate_size`, or [`default_intermediate_size`] when unset.
    pub fn mlp_size(&self) -> usize {
        self.intermediate_size
            .unwrap_or_else(|| default_intermediate_size(self.hidden_size))
    }
}

impl TransformerConfig {
    /// Width per head, hidden_size / num_heads.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Key/value heads: `num_kv_heads`, or num_heads when unset.
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
    /// SwiGLU width: `intermediate_size`, or [`default_intermediate_size`] when unset.
    pub fn mlp_size(&self) -> usize {
        self.intermediate_size
            .unwrap_or_else(|| default_intermediate_size(self.hidden_size))
    }
}

impl MambaConfig {
    /// Inner width of the mixer, expand * hidden_size.
    pub fn d_inner(&self) -> usize {
        self.expand * self.hidden_size
    }
    /// Rank of the step-size projection: `dt_rank`, or ceil(hidden_size / 16) when unset.
    pub fn dt_rank(&self) -> usize {
        self.dt_rank
            .unwrap_or_else(|| self.hidden_size.div_ceil(16))
    }
}

impl ModelConfig {
    /// Model width (`hidden_size`) of whichever model.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Gla(c) => c.hidden_size,
            ModelConfig::Transformer(c) => c.hidden_size,
            ModelConfig::Mamba(c) => c.hidden_size,
        }
    }

    /// Embedding rows and output logits of whichever model.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gla(c) => c.vocab_size,
            ModelConfig::Transformer(c) => c.vocab_size,
            ModelConfig::Mamba(c) => c.vocab_size,
        }
    }
    /// `model.init_from`: the Hugging Face model directory a fresh run starts from, if any.
    pub fn init_from(&self) -> Option<&str> {
        match self {
            ModelConfig::Gla(c) => c.init_from.as_deref(),
            ModelConfig::Transformer(c) => c.init_from.as_deref(),
            ModelConfig::Mamba(c) => c.init_from.as_deref(),
        }
    }
    /// "gla", "transformer" or "mamba".
    pub fn type_name(&self) -> &'static str {
        match self {
            ModelConfig::Gla(_) => "gla",
            ModelConfig::Transformer(_) => "transformer",
            ModelConfig::Mamba(_) => "mamba",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_intermediate_size_matches_flash_linear_attention() {
        assert_eq!(default_intermediate_size(1024), 2816);
        assert_eq!(default_intermediate_size(2048), 5632);
        assert_eq!(default_intermediate_size(128), 512);
        // flash-linear-attention: int(hidden * 4 * 2 / 3), rounded up to a multiple of 256.
        for hidden in 1..20_000usize {
            let fla = (hidden * 8 / 3).div_ceil(256) * 256;
            assert_eq!(default_intermediate_size(hidden), fla, "hidden {hidden}");
        }
    }

    #[test]
    fn derived_dimensions() {
        let gla = GlaConfig::default();
        assert_eq!((gla.key_dim(), gla.value_dim()), (512, 1024));
        assert_eq!(
            (gla.head_k_dim(), gla.head_v_dim(), gla.mlp_size()),
            (128, 256, 2816)
        );
        let gla = GlaConfig {
            intermediate_size: Some(100),
            ..GlaConfig::default()
        };
        assert_eq!(gla.mlp_size(), 100);

        let t = TransformerConfig::default();
        assert_eq!((t.head_dim(), t.kv_heads(), t.mlp_size()), (64, 16, 2816));
        let t = TransformerConfig {
            num_kv_heads: Some(4),
            ..t
        };
        assert_eq!(t.kv_heads(), 4);

        let m = MambaConfig::default();
        assert_eq!((m.d_inner(), m.dt_rank()), (2048, 64));
        let m = MambaConfig {
            hidden_size: 1000,
            ..m
        };
        assert_eq!(m.dt_rank(), 63);
    }

    #[test]
    fn kernel_mode_names_are_the_toml_spelling() {
        let choices = [ModeChoice::Auto]
            .into_iter()
            .chain(GlaMode::ALL.map(ModeChoice::Fixed));
        for choice in choices {
            let value = toml::Value::try_from(choice).unwrap();
            assert_eq!(value.as_str(), Some(choice.name()));
            assert_eq!(value.try_into::<ModeChoice>().unwrap(), choice);
        }
        for mode in GlaMode::ALL {
            assert_eq!(GlaMode::from_name(mode.name()), Some(mode));
        }
        let err = toml::Value::String("fast".into())
            .try_into::<ModeChoice>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`fast`") && err.contains("fused_chunk"),
            "{err}"
        );
    }
}
