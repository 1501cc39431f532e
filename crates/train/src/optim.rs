//! AdamW with its state in tensors (tch cannot save an optimizer's state), global-norm gradient
//! clipping and the gradient bookkeeping of a step.
//!
//! The update is PyTorch's `torch.optim.AdamW` (`fused=True`, `amsgrad=False`), run by libtorch's
//! multi-tensor kernel over each weight-decay group ([`glatrain_shim::multi_tensor`]):
//!
//! ```text
//! p  <- p * (1 - lr * wd)                       decoupled decay, wd = 0 in the no-decay group
//! m  <- b1 m + (1 - b1) g                       fp32 moments
//! v  <- b2 v + (1 - b2) g^2
//! p  <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! `t` counts applied updates only: a skipped step (non-finite gradients) advances neither `t`
//! nor the moments. A parameter without a gradient this step (gradients are dropped, not zeroed,
//! between steps) is left alone, as PyTorch does.
//!
//! With the optimizer state sharded over data-parallel ranks (ZeRO stage 1, [`AdamW::keep_only`])
//! a rank keeps the moments of the parameters it owns and updates those only; the trainer
//! then sends each parameter from its owner to the other ranks.

use std::collections::BTreeMap;

use glatrain_shim::multi_tensor::{self, AdamWStep, AdamWTensors};
use tch::{Kind, TchError, Tensor};

use crate::boundary::torch_error;
use crate::error::TrainError;

/// AdamW's fixed hyper-parameters; the learning rate comes per step from the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of the decay group.
    pub weight_decay: f64,
}

/// One trainable parameter and its fp32 moments.
#[derive(Debug)]
pub struct ParamState {
    /// VarStore path, also the checkpoint key.
    pub name: String,
    /// The fp32 master weight (a VarStore variable, shared storage).
    pub param: Tensor,
    /// Whether weight decay applies (false for norms, biases, gate biases, A_log, D).
    pub decay: bool,
    /// Whether this process keeps its moments and updates it (all parameters, unless the state
    /// is sharded over ranks).
    pub owned: bool,
    /// The moments; empty where not `owned`.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed, name-ordered list of parameters.
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Updates applied so far (`t` of the bias correction).
    step: u64,
    /// `step` as the fp32 scalar on the parameters' device that the fused kernel reads.
    step_on_device: Tensor,
}

impl AdamW {
    /// Builds the optimizer over `(name, variable, decay)` triples; moments start at zero (an
    /// error when their memory cannot be allocated). Parameters are kept sorted by name so every
    /// run visits them in the same order.
    pub fn new(params: Vec<(String, Tensor, bool)>, cfg: AdamWConfig) -> Result<Self, TrainError> {
        let zeros = |param: &Tensor| param.f_zeros_like()?.f_to_kind(Kind::Float);
        let mut params = params
            .into_iter()
            .map(|(name, param, decay)| {
                Ok(ParamState {
                    exp_avg: zeros(&param)?,
                    exp_avg_sq: zeros(&param)?,
                    name,
                    param,
                    decay,
                    owned: true,
                })
            })
            .collect::<Result<Vec<ParamState>, TchError>>()
            .map_err(torch_error("allocating the AdamW moments"))?;
        params.sort_by(|a, b| a.name.cmp(&b.name));
        let device = params
            .first()
            .map_or(tch::Device::Cpu, |p| p.param.device());
        Ok(Self {
            cfg,
            params,
            step: 0,
            step_on_device: Tensor::f_zeros([], (Kind::Float, device))
                .map_err(torch_error("allocating the AdamW step counter"))?,
        })
    }

    /// The parameters with their moments, sorted by name.
    pub fn params(&self) -> &[ParamState] {
        &self.params
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Keeps the moments of the parameters (in [`Self::params`] order) that `owned` picks, and
    /// drops the others' (ZeRO stage 1): [`Self::step`] then updates the owned ones only.
    pub fn keep_only(&mut self, owned: impl Fn(usize) -> bool) -> Result<(), TrainError> {
        for (i, p) in self.params.iter_mut().enumerate() {
            if !owned(i) {
                let empty = Tensor::f_empty([0], (Kind::Float, p.param.device()))
                    .map_err(torch_error("dropping AdamW moments"))?;
                p.exp_avg = empty.shallow_clone();
                p.exp_avg_sq = empty;
                p.owned = false;
            }
        }
        Ok(())
    }

    /// Drops the gradients of every parameter (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&mut self) {
        let params: Vec<&Tensor> = self.params.iter().map(|p| &p.param).collect();
        multi_tensor::clear_grads(&params);
    }

    /// The gradients, in parameter order; `None` where a parameter received none.
    pub fn grads(&self) -> Result<Vec<Option<Tensor>>, TrainError> {
        self.params
            .iter()
            .map(|p| {
                let g = p.param.f_grad().map_err(torch_error("reading gradients"))?;
                Ok(g.defined().then_some(g))
            })
            .collect()
    }

    /// Applies one AdamW update with learning rate `lr` to every parameter that has a gradient.
    /// An error (libtorch refusing the update) leaves the update count unchanged.
    pub fn step(&mut self, lr: f64) -> Result<(), TrainError> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let grads = self.grads()?;
        let step = self.step + 1;
        tch::no_grad(|| {
            // In place; the returned handle is the same tensor.
            let _ = self
                .step_on_device
                .f_fill_(step as f64)
                .map_err(torch_error("the AdamW update"))?;
            for decay in [true, false] {
                let group: Vec<AdamWTensors> = self
                    .params
                    .iter()
                    .zip(&grads)
                    .filter(|(p, _)| p.decay == decay && p.owned)
                    .filter_map(|(p, g)| g.as_ref().map(|g| (p, g)))
                    .map(|(p, g)| AdamWTensors {
                        param: &p.param,
                        grad: g,
                        exp_avg: &p.exp_avg,
                        exp_avg_sq: &p.exp_avg_sq,
                    })
                    .collect();
                if group.is_empty() {
                    continue;
                }
                let hp = AdamWStep {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay: if decay { weight_decay } else { 0.0 },
                };
                multi_tensor::fused_adamw(&group, &self.step_on_device, hp)
                    .map_err(|e| torch_error("the AdamW update")(TchError::Torch(e)))?;
            }
            Ok::<(), TrainError>(())
        })?;
        self.step = step;
        Ok(())
    }

    /// Named state tensors for the checkpoint: `exp_avg.<name>` and `exp_avg_sq.<name>` (empty
    /// ones for parameters this process does not own).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((
                format!("exp_avg_sq.{}", p.name),
                p.exp_avg_sq.shallow_clone(),
            ));
        }
        out
    }

    /// Restores the moments (of the owned parameters) from checkpoint tensors and the update
    /// count from `state.json`. Every parameter must have both moments with its shape; the
    /// error names the first that is missing or mismatched.
    pub fn load_state(
        &mut self,
        mut tensors: BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), OptimStateError> {
        for p in &mut self.params {
            for (prefix, dst) in [
                ("exp_avg", &mut p.exp_avg),
                ("exp_avg_sq", &mut p.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", p.name);
                let src = tensors
                    .remove(&key)
                    .ok_or_else(|| OptimStateError::Missing(key.clone()))?;
                if src.size() != p.param.size() {
                    return Err(OptimStateError::Shape {
                        key,
                        found: src.size(),
                        expected: p.param.size(),
                    });
                }
                if !p.owned {
                    continue;
                }
                tch::no_grad(|| dst.f_copy_(&src)).map_err(|e| OptimStateError::Copy {
                    key,
                    message: e.to_string(),
                })?;
            }
        }
        if let Some(key) = tensors.into_keys().next() {
            return Err(OptimStateError::Unexpected(key));
        }
        self.step = step;
        Ok(())
    }
}

/// A mismatch between saved optimizer state and the model's parameters.
#[derive(Debug, thiserror::Error)]
pub enum OptimStateError {
    #[error("optimizer state has no tensor `{0}`")]
    Missing(String),
    #[error("optimizer state tensor `{key}` has shape {found:?}, the parameter has {expected:?}")]
    Shape {
        key: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("optimizer state has a tensor `{0}` for a parameter the model does not have")]
    Unexpected(String),
    #[error("optimizer state tensor `{key}` cannot be copied: {message}")]
    Copy { key: String, message: String },
}

/// The global L2 norm of `grads` (missing ones count as zero), computed as the norm of the
/// per-tensor norms in fp32 (as `torch.nn.utils.clip_grad_norm_`). A single host sync.
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64, TrainError> {
    let grads: Vec<&Tensor> = grads.iter().flatten().collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let what = "the gradient norm";
    multi_tensor::global_norm(&grads)
        .map_err(|e| torch_error(what)(TchError::Torch(e)))?
        .f_double_value(&[])
        .map_err(torch_error(what))
}

/// Scales `grads` in place by `factor` (unscaling a loss scale, or clipping).
pub fn scale_grads(grads: &mut [Option<Tensor>], factor: f64) -> Result<(), TrainError> {
    let grads: Vec<&Tensor> = grads.iter().flatten().collect();
    if grads.is_empty() {
        return Ok(());
    }
    tch::no_grad(|| multi_tensor::scale_all(&grads, factor))
        .map_err(|e| torch_error("scaling the gradients")(TchError::Torch(e)))
}

/// Clips `grads` to global norm `max_norm` given their norm `norm` (from [`global_grad_norm`]);
/// returns the factor applied (1 when no clipping happened). `max_norm <= 0` disables clipping.
/// The factor is `max_norm / (norm + 1e-6)` as in PyTorch.
pub fn clip_grads(
    grads: &mut [Option<Tensor>],
    norm: f64,
    max_norm: f64,
) -> Result<f64, TrainError> {
    if max_norm <= 0.0 {
        return Ok(1.0);
    }
    let factor = max_norm / (norm + 1e-6);
    if factor >= 1.0 {
        return Ok(1.0);
    }
    scale_grads(grads, factor)?;
    Ok(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, values: &[f32]) {
        let loss = (p * Tensor::from_slice(values)).sum(Kind::Float);
        loss.backward();
    }

    fn to_vec(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// Two steps of AdamW on scalars, against the formulas evaluated by hand in f64.
    #[test]
    fn adamw_matches_hand_computation() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let w = var(&[1.0, -2.0]);
        let b = var(&[0.5]);
        let mut opt = AdamW::new(
            vec![
                ("w".into(), w.shallow_clone(), true),
                ("b".into(), b.shallow_clone(), false),
            ],
            cfg,
        )
        .unwrap();
        let lr = 0.01;
        let grads1 = [0.3f64, -0.4];
        let grads2 = [0.1f64, 0.2];
        let gb = [2.0f64, -1.0];

        set_grad(&w, &[0.3, -0.4]);
        set_grad(&b, &[2.0]);
        opt.step(lr).unwrap();
        opt.zero_grad();
        set_grad(&w, &[0.1, 0.2]);
        set_grad(&b, &[-1.0]);
        opt.step(lr).unwrap();

        let hand = |p0: f64, g: [f64; 2], wd: f64| {
            let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
            for (t, gt) in g.iter().enumerate() {
                let t = (t + 1) as i32;
                p *= 1.0 - lr * wd;
                m = 0.9 * m + 0.1 * gt;
                v = 0.95 * v + 0.05 * gt * gt;
                let denom = v.sqrt() / (1.0 - 0.95f64.powi(t)).sqrt() + 1e-8;
                p -= lr / (1.0 - 0.9f64.powi(t)) * m / denom;
            }
            p
        };
        let w_now = to_vec(&w);
        let expect_w = [
            hand(1.0, [grads1[0], grads2[0]], 0.1),
            hand(-2.0, [grads1[1], grads2[1]], 0.1),
        ];
        let expect_b = hand(0.5, gb, 0.0);
        for (got, want) in w_now.iter().zip(expect_w) {
            assert!((got - want).abs() < 1e-6, "w: {got} vs {want}");
        }
        let b_now = to_vec(&b)[0];
        assert!((b_now - expect_b).abs() < 1e-6, "b: {b_now} vs {expect_b}");
        assert_eq!(opt.step_count(), 2);
    }

    #[test]
    fn no_decay_group_is_untouched_by_decay() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let decayed = var(&[1.0]);
        let plain = var(&[1.0]);
        let mut opt = AdamW::new(
            vec![
                ("a".into(), decayed.shallow_clone(), true),
                ("b".into(), plain.shallow_clone(), false),
            ],
            cfg,
        )
        .unwrap();
        // Zero gradients: Adam's update is 0, only the decay moves a weight.
        set_grad(&decayed, &[0.0]);
        set_grad(&plain, &[0.0]);
        opt.step(0.1).unwrap();
        assert!((to_vec(&decayed)[0] - 0.95).abs() < 1e-7);
        assert_eq!(to_vec(&plain)[0], 1.0);
    }

    #[test]
    fn clipping_returns_the_pre_clip_norm() {
        let mut grads = vec![
            Some(Tensor::from_slice(&[3.0f32, 0.0])),
            None,
            Some(Tensor::from_slice(&[0.0f32, 4.0])),
        ];
        let norm = global_grad_norm(&grads).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let factor = clip_grads(&mut grads, norm, 1.0).unwrap();
        assert!((factor - 1.0 / (5.0 + 1e-6)).abs() < 1e-9);
        assert!((global_grad_norm(&grads).unwrap() - 1.0).abs() < 1e-5);
        // Under the threshold nothing changes.
        let mut small = vec![Some(Tensor::from_slice(&[0.3f32, 0.4]))];
        assert_eq!(clip_grads(&mut small, 0.5, 1.0).unwrap(), 1.0);
        assert_eq!(
            to_vec(small[0].as_ref().unwrap()),
            vec![0.3f32 as f64, 0.4f32 as f64]
        );
    }

    #[test]
    fn non_finite_gradients_give_non_finite_norm() {
        let grads = vec![Some(Tensor::from_slice(&[1.0f32, f32::INFINITY]))];
        assert!(!global_grad_norm(&grads).unwrap().is_finite());
        let grads = vec![Some(Tensor::from_slice(&[f32::NAN]))];
        assert!(!global_grad_norm(&grads).unwrap().is_finite());
    }

    #[test]
    fn state_round_trip_and_mismatch_errors() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let p = var(&[1.0, 2.0]);
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone(), true)], cfg).unwrap();
        set_grad(&p, &[1.0, -1.0]);
        opt.step(0.1).unwrap();
        let saved: BTreeMap<String, Tensor> = opt
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();

        let q = var(&[1.0, 2.0]);
        let mut fresh = AdamW::new(vec![("p".into(), q.shallow_clone(), true)], cfg).unwrap();
        let copy = |m: &BTreeMap<String, Tensor>| {
            m.iter()
                .map(|(k, t)| (k.clone(), t.copy()))
                .collect::<BTreeMap<_, _>>()
        };
        fresh.load_state(copy(&saved), 1).unwrap();
        assert_eq!(fresh.step_count(), 1);
        assert_eq!(
            to_vec(&fresh.params()[0].exp_avg),
            to_vec(&opt.params()[0].exp_avg)
        );

        let mut missing = copy(&saved);
        missing.remove("exp_avg_sq.p");
        let err = fresh.load_state(missing, 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg_sq.p"), "{err}");

        let mut wrong = copy(&saved);
        wrong.insert(
            "exp_avg.p".into(),
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
        );
        let err = fresh.load_state(wrong, 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg.p") && err.contains("[3]"), "{err}");

        let mut extra = copy(&saved);
        extra.insert(
            "exp_avg.ghost".into(),
            Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        );
        let err = fresh.load_state(extra, 1).unwrap_err().to_string();
        assert!(err.contains("exp_avg.ghost"), "{err}");
    }
}
