//! Mamba (v1) with Hugging Face's `MambaForCausalLM` names: `backbone.embeddings`,
//! `backbone.layers.N.norm`, `backbone.layers.N.mixer.{in_proj, conv1d, x_proj, dt_proj,
//! A_log, D, out_proj}`, `backbone.norm_f`, `lm_head`. Residual blocks `x + mixer(norm(x))`,
//! no MLP.
//!
//! Initialisation as the reference `mamba_ssm`: `in_proj`, `x_proj` and `conv1d` keep
//! PyTorch's default uniform(+-1/sqrt(fan_in)) (the conv bias too); `out_proj` the same divided
//! by sqrt(num_layers) (GPT-2 prenorm rescaling, one residual per layer); `dt_proj.weight`
//! uniform(+-dt_rank^-0.5) and `dt_proj.bias` the inverse softplus of a log-uniform dt in
//! `[dt_min, dt_max]` clamped below at `dt_init_floor`; `A_log = log(1..=d_state)` per
//! channel; `D = 1`; embeddings `N(0, initializer_range)` (the only use of that key, as in
//! `mamba_ssm`); norms one.

use crate::conv::CausalConv;
use crate::documents::{PackedDocuments, RecurrentSettings};
use crate::error::{check_norm_and_init, require_positive, require_positive_number, ModelError};
use crate::language_model::{Block, LanguageModel, Parts};
use crate::linear::{torch_default_uniform, Embedding, Linear, LmHead, ProjectedInput};
use crate::norm::RmsNorm;
use glatrain_config::{MambaConfig, ModelConfig};
use glatrain_ops::selective_scan::kernels::geometry::MAX_STATES;
use glatrain_ops::{selective_scan, ScanInputs, ScanMode, ScanOptions};
use tch::{nn, Device, Kind, Tensor};

/// Checks that `cfg` describes a buildable model; errors name the offending key.
pub fn validate(cfg: &MambaConfig) -> Result<(), ModelError> {
    require_positive("vocab_size", cfg.vocab_size)?;
    require_positive("hidden_size", cfg.hidden_size)?;
    require_positive("num_layers", cfg.num_layers)?;
    require_positive("d_state", cfg.d_state)?;
    require_positive("expand", cfg.expand)?;
    require_positive("conv_size", cfg.conv_size)?;
    require_positive("dt_rank", cfg.dt_rank())?;
    require_positive_number("dt_min", cfg.dt_min)?;
    if !(cfg.dt_max.is_finite() && cfg.dt_max >= cfg.dt_min) {
        return Err(ModelError::bad(
            "dt_max",
            cfg.dt_max,
            format!("must be a number >= dt_min {}", cfg.dt_min),
        ));
    }
    require_positive_number("dt_init_floor", cfg.dt_init_floor)?;
    check_norm_and_init(cfg.norm_eps, cfg.initializer_range)
}

/// Per-layer decoding state.
#[derive(Debug, Default)]
pub struct MambaLayerCache {
    /// The convolution's last inputs, `[B, d_inner, conv_size - 1]`.
    conv: Option<Tensor>,
    /// The SSM state, `[B, d_inner, d_state]` fp32.
    ssm: Option<Tensor>,
}

/// The selective-SSM mixer of one layer.
#[derive(Debug)]
pub struct MambaMixer {
    in_proj: Linear,
    conv1d: CausalConv,
    x_proj: Linear,
    dt_proj: Linear,
    /// `[d_inner, d_state]`, fp32 at creation.
    a_log: Tensor,
    /// `[d_inner]`.
    d: Tensor,
    out_proj: Linear,
    d_inner: i64,
    d_state: i64,
    dt_rank: i64,
    /// The kernels up to their largest d_state (on the CPU the op runs the reference anyway).
    scan_mode: ScanMode,
}

impl MambaMixer {
    /// Variables under `p` (a block's `mixer`). `cfg` must have passed [`validate`].
    pub fn new(p: &nn::Path, cfg: &MambaConfig) -> Self {
        let hidden = cfg.hidden_size as i64;
        let e = cfg.d_inner() as i64;
        let n = cfg.d_state as i64;
        let r = cfg.dt_rank() as i64;
        let k = cfg.conv_size as i64;
        let dt_std = (r as f64).powf(-0.5);
        let dt_weight = nn::Init::Uniform {
            lo: -dt_std,
            up: dt_std,
        };
        let opts = (Kind::Float, p.device());
        let a_log = Tensor::arange_start(1, n + 1, opts)
            .log()
            .unsqueeze(0)
            .repeat([e, 1]);
        let dt_bias = inverse_softplus_dt(e, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, p);
        let dt_proj = Linear {
            weight: (p / "dt_proj").var("weight", &[e, r], dt_weight),
            bias: Some((p / "dt_proj").var_copy("bias", &dt_bias)),
        };
        let out_gain = 1.0 / (cfg.num_layers as f64).sqrt();
        Self {
            in_proj: Linear::with_init(
                &(p / "in_proj"),
                hidden,
                2 * e,
                torch_default_uniform(hidden, 1.0),
                None,
            ),
            conv1d: CausalConv::new(
                &(p / "conv1d"),
                e,
                k,
                torch_default_uniform(k, 1.0),
                Some(torch_default_uniform(k, 1.0)),
            ),
            x_proj: Linear::with_init(
                &(p / "x_proj"),
                e,
                r + 2 * n,
                torch_default_uniform(e, 1.0),
                None,
            ),
            dt_proj,
            a_log: p.var_copy("A_log", &a_log),
            d: p.ones("D", &[e]),
            out_proj: Linear::with_init(
                &(p / "out_proj"),
                e,
                hidden,
                torch_default_uniform(e, out_gain),
                None,
            ),
            d_inner: e,
            d_state: n,
            dt_rank: r,
            scan_mode: if n > MAX_STATES {
                ScanMode::Reference
            } else {
                ScanMode::Kernels
            },
        }
    }

    /// Mixes the sequence from `in_proj`'s output (which the block computes with its norm,
    /// [`ProjectedInput`]); with a cache, continues from (and updates) its states.
    ///
    /// The selective scan is `glatrain_ops::selective_scan` as mamba_ssm's `selective_scan_fn`
    /// gets it: the dt projection's matmul in the compute dtype, its bias and the softplus
    /// fused into the scan (in fp32), the gate `silu(z)` too; z, B and C are column slices of
    /// the projections' outputs, read in place. On CUDA the scan runs its kernels (the
    /// reference past their d_state of 256), on the CPU the reference (token by token).
    ///
    /// # Shapes
    /// `xz: [B, T, 2 d_inner]` -> `[B, T, hidden]`.
    pub fn forward(
        &self,
        xz: &Tensor,
        mut cache: Option<&mut MambaLayerCache>,
        documents: Option<&PackedDocuments>,
    ) -> Tensor {
        let (e, n, r) = (self.d_inner, self.d_state, self.dt_rank);
        let prev_conv = cache.as_mut().and_then(|c| c.conv.take());
        let resets = documents.and_then(|d| d.resets.as_ref());
        let (u, conv_state) = match resets {
            Some(resets) => {
                let u = self
                    .conv1d
                    .forward_sequences(&xz.narrow(2, 0, e), Some(resets));
                (u, None)
            }
            None => {
                let (u, state) = self.conv1d.forward(&xz.narrow(2, 0, e), prev_conv.as_ref());
                (u, Some(state))
            }
        };
        // Time-major rows for the scan and x_proj (decoding's convolution returns channel-major).
        let u = u.contiguous();
        let x_dbl = self.x_proj.forward(&u); // [B, T, R + 2N]
        let delta = x_dbl
            .narrow(2, 0, r)
            .linear(&self.dt_proj.weight, None::<&Tensor>);
        let a = -self.a_log.to_kind(Kind::Float).exp();
        let prev_ssm = cache.as_mut().and_then(|c| c.ssm.take());
        let (b, c, z) = (
            x_dbl.narrow(2, r, n),
            x_dbl.narrow(2, r + n, n),
            xz.narrow(2, e, e),
        );
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d: Some(&self.d),
            z: Some(&z),
            delta_bias: self.dt_proj.bias.as_ref(),
            initial_state: prev_ssm.as_ref(),
            resets,
        };
        let options = ScanOptions {
            output_final_state: cache.is_some(),
            mode: self.scan_mode,
            ..ScanOptions::default()
        };
        let (y, ssm_state) = selective_scan(&inputs, &options)
            .unwrap_or_else(|e| panic!("selective scan failed on the layer's own inputs: {e}"));
        if let Some(c) = cache {
            c.conv = conv_state;
            c.ssm = ssm_state;
        }
        self.out_proj.forward(&y)
    }
}

impl ProjectedInput for MambaMixer {
    fn input_weights(&self) -> Vec<&Tensor> {
        vec![&self.in_proj.weight]
    }
}

/// `dt_proj.bias`: softplus^-1(dt) with dt log-uniform in `[dt_min, dt_max]`, at least `floor`.
fn inverse_softplus_dt(e: i64, dt_min: f64, dt_max: f64, floor: f64, p: &nn::Path) -> Tensor {
    let u = Tensor::rand([e], (Kind::Float, p.device()));
    let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
        .exp()
        .clamp_min(floor);
    // softplus^-1(y) = y + log(1 - exp(-y)) = y + log(-expm1(-y)).
    &dt + (-(-&dt).expm1()).log()
}

/// `x + mixer(norm(x))`.
#[derive(Debug)]
pub struct MambaBlock {
    norm: RmsNorm,
    mixer: MambaMixer,
}

impl Block for MambaBlock {
    const FAMILY: &'static str = "mamba";
    type Cache = MambaLayerCache;
    type Settings = RecurrentSettings;

    fn forward(
        &self,
        x: &Tensor,
        documents: &Option<PackedDocuments>,
        cache: Option<&mut MambaLayerCache>,
    ) -> Tensor {
        let xz = self.norm.forward_into(x, &self.mixer);
        x + self.mixer.forward(&xz[0], cache, documents.as_ref())
    }
}

/// Mamba language model (`transformers`' `MambaForCausalLM`).
pub type MambaModel = LanguageModel<MambaBlock>;

impl MambaModel {
    /// Creates the variables under `root` (paths as in the module docs).
    pub fn new(root: &nn::Path, cfg: &MambaConfig) -> Result<Self, ModelError> {
        validate(cfg)?;
        if let Device::Cuda(ordinal) = root.device() {
            glatrain_cuda::Gpu::get(ordinal)
                .map_err(|source| ModelError::Kernels { ordinal, source })?;
        }
        let hidden = cfg.hidden_size as i64;
        let vocab = cfg.vocab_size as i64;
        let std = cfg.initializer_range;
        let backbone = root / "backbone";
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = &backbone / "layers" / i;
                MambaBlock {
                    norm: RmsNorm::new(&(&p / "norm"), hidden, cfg.norm_eps),
                    mixer: MambaMixer::new(&(&p / "mixer"), cfg),
                }
            })
            .collect();
        Ok(Self::assemble(Parts {
            config: ModelConfig::Mamba(cfg.clone()),
            embeddings: Embedding::new(&(&backbone / "embeddings"), vocab, hidden, std),
            layers,
            norm: RmsNorm::new(&(&backbone / "norm_f"), hidden, cfg.norm_eps),
            lm_head: LmHead::new(&(root / "lm_head"), cfg.tie_embeddings, vocab, hidden, std),
            settings: RecurrentSettings {
                gla: false,
                resets: true,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> MambaConfig {
        MambaConfig {
            vocab_size: 13,
            hidden_size: 16,
            num_layers: 4,
            d_state: 4,
            dt_min: 1e-3,
            dt_max: 1e-1,
            ..MambaConfig::default()
        }
    }

    #[test]
    fn dt_bias_inverts_softplus_into_the_configured_range() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mixer = MambaMixer::new(&vs.root(), &tiny());
        let dt = mixer.dt_proj.bias.as_ref().unwrap().softplus();
        let (lo, hi) = (dt.min().double_value(&[]), dt.max().double_value(&[]));
        assert!(
            lo >= 1e-3 * 0.999 && hi <= 1e-1 * 1.001,
            "dt in [{lo}, {hi}]"
        );
        let a = -mixer.a_log.exp();
        let want = -Tensor::arange_start(1, 5, (Kind::Float, Device::Cpu));
        assert!(a.get(7).allclose(&want, 1e-6, 1e-6, false));
        assert_eq!(mixer.a_log.kind(), Kind::Float);
    }

    #[test]
    fn initial_bounds_follow_mamba_ssm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = tiny();
        let mixer = MambaMixer::new(&vs.root(), &cfg);
        let max_abs = |t: &Tensor| t.abs().max().double_value(&[]);
        // out_proj: 1/sqrt(d_inner) / sqrt(num_layers) = 1/sqrt(32) / 2.
        assert!(max_abs(&mixer.out_proj.weight) <= 1.0 / 32f64.sqrt() / 2.0);
        assert!(max_abs(&mixer.out_proj.weight) > 1.0 / 32f64.sqrt() / 4.0);
        let dt_bound = 1.0 / (cfg.dt_rank() as f64).sqrt();
        assert!(max_abs(&mixer.dt_proj.weight) <= dt_bound);
        assert!(max_abs(&mixer.conv1d.weight) <= 0.5, "1/sqrt(conv_size 4)");
        assert_eq!(mixer.d.sum(Kind::Float).double_value(&[]), 32.0);
    }
}
