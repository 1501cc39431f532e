//! Setting up a run on a device: the device from `run.device`, libtorch's thread count, the
//! kernels compiling in the background, the model in a fresh VarStore, and copying checkpoint
//! weights into it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use glatrain_config::{GlaMode, ModelConfig, ResolvedConfig};
use glatrain_models::CausalLm;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::boundary::catch_torch;
use crate::error::TrainError;

/// The device named by `spec` ("auto", "cpu", "cuda", "cuda:N"); `source` names the config in
/// errors.
pub fn resolve_device(spec: &str, source: &str) -> Result<Device, TrainError> {
    let bad = |reason: String| TrainError::BadValue {
        source_name: source.to_string(),
        key: "run.device",
        value: format!("{spec:?}"),
        reason,
    };
    let cuda = |ordinal: usize| {
        if !tch::Cuda::is_available() {
            return Err(bad(
                "no CUDA device is available here (use \"cpu\" or \"auto\")".into(),
            ));
        }
        let count = tch::Cuda::device_count() as usize;
        if ordinal >= count {
            return Err(bad(format!("there are {count} CUDA devices (0..{count})")));
        }
        Ok(Device::Cuda(ordinal))
    };
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(bad(
                "expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"".into()
            )),
        },
    }
}

/// The device of this process: `spec` resolved as by [`resolve_device`], except in a
/// data-parallel run of several ranks (`world`), where `"auto"` and `"cuda"` mean
/// `cuda:LOCAL_RANK` when CUDA is available, so that the ranks of a host each train on their own
/// device (`CUDA_VISIBLE_DEVICES` chooses which). An explicit `"cuda:N"` would put every rank on
/// the same device: refused then.
pub fn resolve_rank_device(
    spec: &str,
    source: &str,
    world: Option<&glatrain_dist::WorldEnv>,
) -> Result<Device, TrainError> {
    let Some(world) = world.filter(|w| w.world_size > 1) else {
        return resolve_device(spec, source);
    };
    let bad = |reason: String| TrainError::BadValue {
        source_name: source.to_string(),
        key: "run.device",
        value: format!("{spec:?}"),
        reason,
    };
    if spec.starts_with("cuda:") {
        return Err(bad(format!(
            "names one device for all WORLD_SIZE={} ranks; use \"cuda\" or \"auto\" (the rank \
             with LOCAL_RANK=n trains on cuda:n) and CUDA_VISIBLE_DEVICES to choose the devices",
            world.world_size
        )));
    }
    match resolve_device(spec, source)? {
        Device::Cuda(_) => {
            let count = tch::Cuda::device_count() as usize;
            if world.local_rank >= count {
                return Err(bad(format!(
                    "the rank with LOCAL_RANK={} trains on cuda:{}, but this host has {count} \
                     CUDA devices: start at most {count} ranks per host",
                    world.local_rank, world.local_rank
                )));
            }
            Ok(Device::Cuda(world.local_rank))
        }
        device => Ok(device),
    }
}

/// The CPU cores this process may use (`None` when the system does not say).
pub fn cpu_cores() -> Option<usize> {
    std::thread::available_parallelism().ok().map(|n| n.get())
}

/// Applies `run.cpu_threads` (0 keeps libtorch's default) and returns the count in effect. More
/// threads than the machine has cores only slow every step down (each waits for the slowest):
/// training refuses them, naming the key, the value and the core count.
pub fn apply_threads(cfg: &ResolvedConfig) -> Result<i32, TrainError> {
    let n = cfg.config.run.cpu_threads;
    if let Some(cores) = cpu_cores().filter(|&cores| n > cores) {
        return Err(TrainError::BadValue {
            source_name: cfg.source.clone(),
            key: "run.cpu_threads",
            value: n.to_string(),
            reason: format!(
                "this machine has {cores} CPU cores; use at most {cores} (0 = libtorch's default)"
            ),
        });
    }
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
    Ok(tch::get_num_threads())
}

/// [`apply_threads`] for evaluation and sampling, which read a run's config written on another
/// machine perhaps: more threads than cores here are lowered to the core count, with a note.
pub fn apply_threads_for_inference(cfg: &ResolvedConfig) {
    let n = cfg.config.run.cpu_threads;
    let usable = match cpu_cores() {
        Some(cores) if n > cores => {
            eprintln!(
                "note: {}: run.cpu_threads = {n}, but this machine has {cores} CPU cores; using {cores}",
                cfg.source
            );
            cores
        }
        _ => n,
    };
    if usable > 0 {
        tch::set_num_threads(usable as i32);
    }
}

/// A model and the VarStore holding its parameters.
pub struct BuiltModel {
    pub vs: VarStore,
    pub model: Box<dyn CausalLm>,
}

impl std::fmt::Debug for BuiltModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltModel")
            .field("model", &self.model.config().type_name())
            .field("device", &self.vs.device())
            .finish()
    }
}

/// Serialises seeding and initialisation: libtorch's generator is process-wide, so two models
/// built at once on different threads (parallel tests, a library user's threads) would draw from
/// it interleaved and neither would get the initialisation its seed promises.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Seeds libtorch with `run.seed` and builds the configured model on `device`, its GLA layers
/// running `mode` (the preflight's choice), keeping for the backward what
/// `train.activation_checkpointing` says. The same seed gives the same initial weights
/// whatever other threads of the process do with glatrain.
pub fn build_model(
    cfg: &ResolvedConfig,
    device: Device,
    mode: GlaMode,
) -> Result<BuiltModel, TrainError> {
    // A panic while holding the lock poisons it without corrupting anything it guards.
    let _init = INIT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(cfg.config.run.seed as i64);
    let vs = VarStore::new(device);
    let mut model = catch_torch("building the model", || {
        Ok(glatrain_models::build(&vs.root(), &cfg.config.model, mode))
    })?
    .map_err(|source| TrainError::Model {
        source_name: cfg.source.clone(),
        source: Box::new(source),
    })?;
    model.set_activation_checkpointing(cfg.config.train.activation_checkpointing);
    Ok(BuiltModel { vs, model })
}

/// Starts compiling (or reading from the disk cache) the kernels this run calls, on background
/// threads, so that NVRTC overlaps building the model and opening the data instead of delaying
/// the first step: GLA's, and the fused norms and SwiGLU of every model (for the fp32 residual
/// stream's norms and for activations in `kind`). An op's first call waits for a compilation
/// still under way (with an empty cache, only for the quick tier; see
/// `glatrain_cuda::TierPolicy`); a failure here is left for that call to report (it compiles
/// again and returns the error).
pub fn prepare_kernels(cfg: &ResolvedConfig, device: Device, mode: GlaMode, kind: Kind) {
    let Device::Cuda(ordinal) = device else {
        return;
    };
    match &cfg.config.model {
        ModelConfig::Gla(_) => {
            std::thread::spawn(move || glatrain_ops::gla::prepare(ordinal, kind, mode, false));
        }
        ModelConfig::Mamba(_) => {
            std::thread::spawn(move || glatrain_ops::selective_scan::prepare(ordinal, kind, false));
        }
        ModelConfig::Transformer(_) => {}
    }
    std::thread::spawn(move || {
        for k in [Kind::Float, kind] {
            let _ = glatrain_ops::fused::prepare(ordinal, k, false);
        }
    });
}

/// The VarStore's variables sorted by name.
pub fn named_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Copies checkpoint `weights` into `vs`. The names and shapes must match exactly; the error
/// names the checkpoint directory and the first tensor that differs.
pub fn load_weights(
    vs: &VarStore,
    weights: &BTreeMap<String, Tensor>,
    dir: &Path,
) -> Result<(), TrainError> {
    let mismatch = |reason: String| TrainError::CheckpointMismatch {
        dir: dir.to_path_buf(),
        reason,
    };
    let vars = named_variables(vs);
    for (name, var) in &vars {
        let src = weights.get(name).ok_or_else(|| {
            mismatch(format!(
                "weights.safetensors has no tensor `{name}` that the model needs"
            ))
        })?;
        if src.size() != var.size() {
            return Err(mismatch(format!(
                "tensor `{name}` has shape {:?} in the checkpoint, the model's is {:?}",
                src.size(),
                var.size()
            )));
        }
    }
    if let Some(extra) = weights
        .keys()
        .find(|k| !vars.iter().any(|(name, _)| name == *k))
    {
        return Err(mismatch(format!(
            "weights.safetensors has a tensor `{extra}` that the model does not have"
        )));
    }
    tch::no_grad(|| {
        vars.into_iter().try_for_each(|(name, mut var)| {
            var.f_copy_(&weights[&name])
                .map_err(|e| mismatch(format!("tensor `{name}` cannot be loaded: {e}")))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Kind};

    #[test]
    fn devices() {
        assert_eq!(resolve_device("cpu", "x.toml").unwrap(), Device::Cpu);
        let err = resolve_device("tpu", "x.toml").unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with("x.toml: run.device = \"tpu\""),
            "{err}"
        );
        if !tch::Cuda::is_available() {
            let err = resolve_device("cuda:0", "x.toml").unwrap_err().to_string();
            assert!(err.contains("no CUDA device"), "{err}");
            assert_eq!(resolve_device("auto", "x.toml").unwrap(), Device::Cpu);
        }
    }

    fn world(local_rank: usize, world_size: usize) -> glatrain_dist::WorldEnv {
        glatrain_dist::WorldEnv::on_this_host(
            local_rank,
            world_size,
            29500,
            std::time::Duration::from_secs(30),
        )
    }

    #[test]
    fn each_rank_of_a_host_takes_the_cuda_device_of_its_local_rank() {
        let one_rank = world(0, 1);
        for spec in ["cpu", "auto"] {
            assert_eq!(
                resolve_rank_device(spec, "x.toml", Some(&one_rank)).unwrap(),
                resolve_device(spec, "x.toml").unwrap()
            );
        }
        let err = resolve_rank_device("cuda:0", "x.toml", Some(&world(1, 2))).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().starts_with(
                "x.toml: run.device = \"cuda:0\": names one device for all WORLD_SIZE=2"
            ),
            "{err}"
        );
        let count = tch::Cuda::device_count() as usize;
        for local_rank in [0, 1, count] {
            let got = resolve_rank_device("auto", "x.toml", Some(&world(local_rank, 4)));
            match got {
                Ok(device) if count == 0 => assert_eq!(device, Device::Cpu),
                Ok(device) => assert_eq!(device, Device::Cuda(local_rank)),
                Err(err) => {
                    assert!(count > 0 && local_rank >= count, "{err}");
                    assert!(err.to_string().contains("start at most"), "{err}");
                }
            }
        }
        assert_eq!(
            resolve_rank_device("cpu", "x.toml", Some(&world(3, 4))).unwrap(),
            Device::Cpu
        );
    }

    #[test]
    fn cpu_threads_beyond_the_cores_are_refused_naming_key_value_and_cores() {
        let cores = cpu_cores().expect("Linux reports its cores");
        let cfg = |threads: usize| {
            glatrain_config::from_str(
                "[model]\ntype = \"gla\"",
                "x.toml",
                &[format!("run.cpu_threads={threads}")],
            )
            .unwrap()
        };
        let err = apply_threads(&cfg(100_000)).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            format!(
                "x.toml: run.cpu_threads = 100000: this machine has {cores} CPU cores; use at \
                 most {cores} (0 = libtorch's default)"
            )
        );
        assert_eq!(apply_threads(&cfg(1)).unwrap(), 1);
    }

    #[test]
    fn weights_must_match_by_name_and_shape() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _w = (vs.root() / "a").zeros("weight", &[2, 3]);
        let dir = Path::new("runs/x/checkpoints/step-1");
        let good: BTreeMap<String, Tensor> = [(
            "a.weight".to_string(),
            Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
        )]
        .into();
        load_weights(&vs, &good, dir).unwrap();
        assert_eq!(
            named_variables(&vs)[0].1.sum(Kind::Float).double_value(&[]),
            6.0
        );

        let wrong: BTreeMap<String, Tensor> = [(
            "a.weight".to_string(),
            Tensor::ones([3, 2], (Kind::Float, Device::Cpu)),
        )]
        .into();
        let err = load_weights(&vs, &wrong, dir).unwrap_err().to_string();
        assert!(
            err.contains("step-1") && err.contains("a.weight") && err.contains("[3, 2]"),
            "{err}"
        );

        let missing = BTreeMap::new();
        let err = load_weights(&vs, &missing, dir).unwrap_err().to_string();
        assert!(err.contains("no tensor `a.weight`"), "{err}");

        let mut extra = good;
        extra.insert(
            "b.bias".into(),
            Tensor::ones([1], (Kind::Float, Device::Cpu)),
        );
        let err = load_weights(&vs, &extra, dir).unwrap_err().to_string();
        assert!(err.contains("`b.bias`"), "{err}");
    }
}
