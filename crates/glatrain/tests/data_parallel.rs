//! Data-parallel training through the real launcher (`--nproc-per-node`) on the CPU (Gloo):
//! two ranks train as one rank with twice the micro-batch, a killed rank stops the run with a
//! message naming it, the run resumes exactly, and bad launches are exit 2; and on two CUDA
//! devices (NCCL, skipped without them), two ranks train as one. Tiny GLA models; each run takes
//! seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use glatrain_fs::sorted_names;
use glatrain_testing::process::{
    assert_success, cli_path, dir_with, logged_series, send_signal, start, text, wait_until,
};

/// A micro GLA model, fp32, one libtorch thread per rank, a checkpoint every 5 steps.
const CONFIG: &str = r#"
[run]
name = "r"
device = "cpu"
cpu_threads = 1

[model]
type = "gla"
vocab_size = 256
hidden_size = 64
num_layers = 2
num_heads = 2

[data]
seq_len = 32

[train]
batch_size = 8
micro_batch_size = 8
max_steps = 20
warmup_steps = 2
precision = "fp32"
eval_every = 0
eval_batches = 1
checkpoint_every = 5
keep_checkpoints = 10

[logging]
log_every = 1
tensorboard = false
progress = "lines"
"#;

/// The launch of most tests: two ranks, each with micro-batches of 4 (one rank's 8).
const TWO_RANKS_OF_4: [&str; 4] = ["--nproc-per-node", "2", "--set", "train.micro_batch_size=4"];

fn workdir() -> tempfile::TempDir {
    dir_with("r.toml", CONFIG)
}

fn glatrain(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(cli_path(env!("CARGO_BIN_EXE_glatrain")));
    cmd.args(["--config", "r.toml"])
        .args(args)
        .current_dir(dir)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("MASTER_PORT");
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    glatrain(dir, args).output().unwrap()
}

fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    logged_series(run_dir, "train/loss")
}

fn max_relative_difference(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.1 - y.1).abs() / y.1.abs())
        .fold(0.0, f64::max)
}

/// Trains run `one` on one rank with micro-batches of `2 * micro` and run `two` on two ranks with
/// `micro` each, both with `extra` arguments; checks that both succeed and returns two's output.
fn one_rank_and_two(dir: &Path, extra: &[&str], micro: u32) -> Output {
    let one_micro = format!("train.micro_batch_size={}", 2 * micro);
    let one = run(
        dir,
        &[extra, &["--set", "run.name=one", "--set", &one_micro]].concat(),
    );
    assert_success(&one);
    let two_micro = format!("train.micro_batch_size={micro}");
    let two_ranks = [
        "--nproc-per-node",
        "2",
        "--set",
        "run.name=two",
        "--set",
        &two_micro,
    ];
    let two = run(dir, &[extra, &two_ranks].concat());
    assert_success(&two);
    two
}

#[test]
fn two_ranks_train_as_one_rank_with_twice_the_micro_batch() {
    let dir = workdir();
    let two = one_rank_and_two(dir.path(), &[], 4);
    let err = text(&two.stderr);
    assert!(err.contains("launching 2 ranks"), "{err}");
    assert!(
        err.contains("micro-batches of 4 on each of 2 ranks"),
        "{err}"
    );
    // One writer: one summary line, one set of files, one record per step.
    let summaries = text(&two.stdout)
        .lines()
        .filter(|l| l.contains("steps ("))
        .count();
    assert_eq!(summaries, 1, "{}", text(&two.stdout));
    let runs = dir.path().join("runs");
    assert_eq!(
        sorted_names(&runs.join("one")).unwrap(),
        sorted_names(&runs.join("two")).unwrap()
    );
    let (l1, l2) = (losses(&runs.join("one")), losses(&runs.join("two")));
    assert_eq!(l1.len(), 20);
    let diff = max_relative_difference(&l2, &l1);
    eprintln!("largest relative loss difference, 2 ranks x 4 vs 1 rank x 8, 20 steps: {diff:e}");
    assert!(diff <= 1e-6, "{diff}");
    // Rank 0 evaluates the sequences one rank with the global micro-batch would.
    let (e1, e2) = (
        logged_series(&runs.join("one"), "eval/loss"),
        logged_series(&runs.join("two"), "eval/loss"),
    );
    assert_eq!(e1.len(), 1);
    let diff = max_relative_difference(&e2, &e1);
    assert!(diff <= 1e-6, "evaluation: {diff}");
}

/// On two CUDA devices through NCCL, each rank on `cuda:LOCAL_RANK` (`run.device = "cuda"`):
/// 2 ranks x 4 train as 1 rank x 8. Skips with fewer than two CUDA devices.
#[test]
fn two_ranks_on_two_gpus_train_as_one_rank_with_twice_the_micro_batch() {
    if tch::Cuda::device_count() < 2 {
        println!("skipped: fewer than 2 CUDA devices");
        return;
    }
    let dir = workdir();
    one_rank_and_two(dir.path(), &["--set", "run.device=\"cuda\""], 4);
    let runs = dir.path().join("runs");
    let (l1, l2) = (losses(&runs.join("one")), losses(&runs.join("two")));
    assert_eq!(l1.len(), 20);
    let diff = max_relative_difference(&l2, &l1);
    eprintln!("largest relative loss difference on 2 GPUs, 2 ranks x 4 vs 1 rank x 8: {diff:e}");
    // fp32 on the GPU: the ranks sum their halves of each mean in another order than one rank.
    assert!(diff <= 1e-4, "{diff}");
}

/// With micro-batches accumulated and blocks recomputed in the backward (the gradient average
/// starts from hooks inside that nested backward), 2 ranks still train as 1.
#[test]
fn accumulation_and_activation_checkpointing_keep_two_ranks_equal_to_one() {
    let dir = workdir();
    let common = [
        "--set",
        "train.max_steps=8",
        "--set",
        "train.activation_checkpointing=\"full\"",
    ];
    let two = one_rank_and_two(dir.path(), &common, 2);
    assert!(
        text(&two.stderr).contains("2 micro-batches of 2 on each of 2 ranks"),
        "{}",
        text(&two.stderr)
    );
    let runs = dir.path().join("runs");
    let diff = max_relative_difference(&losses(&runs.join("two")), &losses(&runs.join("one")));
    assert!(diff <= 1e-6, "{diff}");
}

/// The pids of `launcher`'s children, with their `RANK`.
fn ranks_of(launcher: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if let Some(rank) = environ
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("RANK="))
        {
            out.push((pid, rank.to_string()));
        }
    }
    out
}

/// Waits until `done`, while `launcher` runs.
fn wait_for(launcher: &mut Child, what: &str, mut done: impl FnMut() -> bool) {
    wait_until(what, || {
        if done() {
            return true;
        }
        if let Some(status) = launcher.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(launcher.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the launcher ended ({status}) before {what}:\n{err}");
        }
        false
    });
}

fn newest_checkpoint(run_dir: &Path) -> Option<u64> {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("manifest.json").exists())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .max()
}

#[test]
fn a_killed_rank_stops_the_run_and_the_run_resumes_exactly() {
    let dir = workdir();
    // A constant learning rate: the killed run may train up to any step without changing the
    // steps it shares with the uninterrupted one.
    let common = [
        &TWO_RANKS_OF_4[..],
        &["--set", "train.schedule=\"constant\""],
    ]
    .concat();
    let killed_dir: PathBuf = dir.path().join("runs/killed");
    let mut launcher = start(glatrain(dir.path(), &common).args([
        "--set",
        "run.name=killed",
        "--set",
        "train.max_steps=100000",
    ]));
    wait_for(&mut launcher, "the first checkpoint", || {
        newest_checkpoint(&killed_dir).is_some()
    });
    let ranks = ranks_of(launcher.id());
    let rank1 = ranks.iter().find(|(_, r)| r == "1").expect("rank 1 runs").0;
    let killed_at = Instant::now();
    send_signal(rank1, "KILL");
    let out = launcher.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let err = text(&out.stderr);
    eprintln!("the launcher ended {took:?} after rank 1 was killed");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(!out.status.success(), "{:?}", out.status);
    assert!(
        err.contains("rank 1 was killed by signal 9 (SIGKILL)"),
        "{err}"
    );
    for (pid, _) in &ranks {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "rank {pid} lives on"
        );
    }

    // Resume a few steps past the newest checkpoint; compare with an uninterrupted run.
    let resumed_at = newest_checkpoint(&killed_dir).unwrap();
    let steps = format!("train.max_steps={}", resumed_at + 3);
    let resumed = run(
        dir.path(),
        &[
            &common[..],
            &["--set", "run.name=killed", "--set", &steps, "--resume"],
        ]
        .concat(),
    );
    assert_success(&resumed);
    let whole = run(
        dir.path(),
        &[&common[..], &["--set", "run.name=whole", "--set", &steps]].concat(),
    );
    assert_success(&whole);
    let runs = dir.path().join("runs");
    let (a, b) = (losses(&runs.join("killed")), losses(&runs.join("whole")));
    assert_eq!(a.len() as u64, resumed_at + 3);
    let bits = |l: &[(u64, f64)]| l.iter().map(|&(s, x)| (s, x.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b), "resumed at step {resumed_at}");
}

#[test]
fn a_sharded_optimizer_state_trains_and_resumes_as_the_replicated_one() {
    let dir = workdir();
    let two = |name: &str, steps: u64, extra: &[&str]| {
        let (name, steps) = (
            format!("run.name={name}"),
            format!("train.max_steps={steps}"),
        );
        let mut args = TWO_RANKS_OF_4.to_vec();
        args.extend([
            "--set",
            "train.schedule=\"constant\"",
            "--set",
            &name,
            "--set",
            &steps,
        ]);
        args.extend_from_slice(extra);
        let out = run(dir.path(), &args);
        assert_success(&out);
        text(&out.stderr)
    };
    let shard = ["--set", "train.shard_optimizer_state=true"];
    two("replicated", 12, &[]);
    let err = two("sharded", 6, &shard);
    assert!(
        err.contains("optimizer state sharded over 2 ranks"),
        "{err}"
    );
    two("sharded", 12, &[&shard[..], &["--resume"]].concat());
    let runs = dir.path().join("runs");
    let bits = |l: Vec<(u64, f64)>| l.iter().map(|&(s, x)| (s, x.to_bits())).collect::<Vec<_>>();
    assert_eq!(
        bits(losses(&runs.join("sharded"))),
        bits(losses(&runs.join("replicated")))
    );
    // The gathered moments are the replicated run's, bit for bit.
    let optimizer = |name: &str| {
        std::fs::read(
            runs.join(name)
                .join("checkpoints/step-12/optimizer.safetensors"),
        )
        .unwrap()
    };
    assert!(optimizer("sharded") == optimizer("replicated"));
    // One rank continues the sharded run.
    let one = run(
        dir.path(),
        &[
            "--set",
            "run.name=sharded",
            "--set",
            "train.schedule=\"constant\"",
            "--set",
            "train.max_steps=14",
            "--resume",
        ],
    );
    assert_success(&one);
    assert_eq!(losses(&runs.join("sharded")).len(), 14);
}

#[test]
fn a_signal_to_the_launcher_stops_every_rank_after_the_same_step() {
    let dir = workdir();
    let run_dir = dir.path().join("runs/r");
    let mut launcher = start(&mut glatrain(
        dir.path(),
        &[
            &TWO_RANKS_OF_4[..],
            &[
                "--set",
                "train.max_steps=100000",
                "--set",
                "train.checkpoint_every=0",
            ],
        ]
        .concat(),
    ));
    wait_for(&mut launcher, "three steps", || losses(&run_dir).len() >= 3);
    send_signal(launcher.id(), "INT");
    let out = launcher.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    // Rank 0 alone speaks, and writes the checkpoint of the step every rank stopped after.
    assert_eq!(err.matches("stop requested").count(), 1, "{err}");
    assert!(!err.contains("error"), "{err}");
    let last = losses(&run_dir).last().unwrap().0;
    assert_eq!(newest_checkpoint(&run_dir), Some(last), "{err}");
}

#[test]
fn bad_launches_are_exit_2_with_the_reason() {
    let dir = workdir();
    /// Arguments, environment, what the message says.
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--nproc-per-node", "0"], vec![], "--nproc-per-node"),
        (
            vec![],
            vec![("RANK", "2"), ("WORLD_SIZE", "2")],
            "RANK=\"2\"",
        ),
        (vec![], vec![("WORLD_SIZE", "2")], "RANK is not set"),
        (
            vec![],
            vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
            "MASTER_ADDR",
        ),
        (
            TWO_RANKS_OF_4.to_vec(),
            vec![("RANK", "0"), ("WORLD_SIZE", "2")],
            "WORLD_SIZE=2 is set",
        ),
        (
            vec![
                "--nproc-per-node",
                "2",
                "--set",
                "train.batch_size=4",
                "--set",
                "train.micro_batch_size=4",
            ],
            vec![],
            "multiple of 4 x 2 = 8",
        ),
        (
            [&TWO_RANKS_OF_4[..], &["--set", "run.device=\"cuda:0\""]].concat(),
            vec![],
            "names one device for all WORLD_SIZE=2 ranks",
        ),
    ];
    for (args, env, expected) in cases {
        let out = glatrain(dir.path(), &args)
            .envs(env.clone())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(expected), "{args:?} {env:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("frame #"),
            "{err}"
        );
        assert!(
            !dir.path().join("runs").exists(),
            "{args:?} {env:?} wrote a run"
        );
    }
}
