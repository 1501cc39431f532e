//! The command line under the conditions operators meet: two processes on one run, signals,
//! a file system that refuses a write, memory that runs out, sizes and limits that do not fit.
//! Tiny models on the CPU; every test takes seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::Duration;

use glatrain_testing::process::{
    assert_exit, assert_success, cli_path, dir_with, logged_series, send_signal, start, text,
    wait_until,
};

/// A micro Transformer++ whose steps take milliseconds, checkpointing every 5 steps.
const CONFIG: &str = r#"
[run]
name = "r"
device = "cpu"
cpu_threads = 1

[model]
type = "transformer"
vocab_size = 256
hidden_size = 64
num_layers = 2
num_heads = 2

[data]
seq_len = 64

[train]
batch_size = 4
micro_batch_size = 4
max_steps = 100000
warmup_steps = 2
precision = "fp32"
eval_every = 0
eval_batches = 1
checkpoint_every = 5
keep_checkpoints = 2

[logging]
log_every = 1
tensorboard = false
progress = "lines"
"#;

fn binary() -> Command {
    Command::new(cli_path(env!("CARGO_BIN_EXE_glatrain")))
}

/// A directory with `r.toml`, the config above.
fn workdir() -> tempfile::TempDir {
    dir_with("r.toml", CONFIG)
}

fn run(dir: &Path, args: &[&str]) -> Output {
    binary()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the glatrain binary runs")
}

/// `glatrain` through `sh -c '<limits>; exec glatrain ...'`, for resource limits.
fn run_limited(dir: &Path, limits: &str, args: &[&str]) -> Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "{limits}; exec '{}' {}",
        cli_path(env!("CARGO_BIN_EXE_glatrain")).display(),
        quoted.join(" ")
    );
    Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn start_in(dir: &Path, args: &[&str]) -> Child {
    start(binary().args(args).current_dir(dir))
}

/// The `step` and `train/loss` of every training line of a run's metrics.jsonl.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    logged_series(run_dir, "train/loss")
}

/// Waits until the run has logged `steps` steps.
fn wait_for_steps(run_dir: &Path, steps: usize) {
    wait_until("the training steps", || losses(run_dir).len() >= steps);
}

fn finish(child: Child) -> (ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (out.status, text(&out.stderr))
}

/// Temporary entries (`.NAME.tmp-PID-N`) directly in `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    glatrain_fs::is_temporary_name(&p.file_name().unwrap().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A second process on a training run, a `--resume` included, is refused with exit 2 naming the
/// holder, and the running one goes on with its metrics intact; SIGINT then stops it with 130,
/// and the resumed run's losses are the uninterrupted run's, bit for bit.
#[test]
fn one_writer_per_run_and_an_interrupted_run_resumes_exactly() {
    let dir = workdir();
    let d = dir.path();
    // No periodic checkpoints: their fsyncs would take most of the time.
    let short = [
        "--set",
        "train.max_steps=150",
        "--set",
        "train.checkpoint_every=0",
    ];
    let mut straight = vec!["--config", "r.toml", "--set", "run.name=straight"];
    straight.extend(short);
    let straight = run(d, &straight);
    assert_eq!(
        straight.status.code(),
        Some(0),
        "{}",
        text(&straight.stderr)
    );

    let mut args = vec!["--config", "r.toml"];
    args.extend(short);
    let first = start_in(d, &args);
    let run_dir = d.join("runs/r");
    wait_for_steps(&run_dir, 3);
    let mut second_args = args.clone();
    second_args.push("--resume");
    let second = run(d, &second_args);
    assert_eq!(second.status.code(), Some(2), "{}", text(&second.stderr));
    let msg = text(&second.stderr);
    assert!(
        msg.contains(&format!("in use by process {}", first.id())) && msg.contains("runs/r/lock"),
        "{msg}"
    );
    let logged = losses(&run_dir).len();
    send_signal(first.id(), "INT");
    let (status, err) = finish(first);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("SIGINT: writing a checkpoint of step"),
        "{err}"
    );
    let interrupted = losses(&run_dir);
    assert!(
        interrupted.len() >= logged,
        "the refused --resume truncated the metrics"
    );
    assert!(
        interrupted.len() < 300,
        "the run finished before the signal"
    );

    let resumed = run(d, &second_args);
    assert_success(&resumed);
    let bits = |l: Vec<(u64, f64)>| {
        l.into_iter()
            .map(|(s, x)| (s, x.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        bits(losses(&run_dir)),
        bits(losses(&d.join("runs/straight")))
    );
}

/// A second signal exits at once with 128 + its number, never a crash (`exit` from the signal
/// thread would run libtorch's destructors under the computing main thread: a SIGSEGV in about
/// one trial of eight of this test), and `--resume` continues from the last checkpoint.
#[test]
fn a_second_signal_exits_at_once_and_the_run_resumes() {
    let dir = workdir();
    let d = dir.path();
    let args = ["--config", "r.toml"];
    let run_dir = d.join("runs/r");
    for trial in 0..6 {
        let mut trial_args = args.to_vec();
        if trial > 0 {
            trial_args.push("--resume");
        }
        let child = start_in(d, &trial_args);
        wait_for_steps(&run_dir, 5 * (trial + 1) + 2);
        send_signal(child.id(), "TERM");
        std::thread::sleep(Duration::from_millis(15));
        send_signal(child.id(), "TERM");
        let (status, err) = finish(child);
        assert_eq!(status.code(), Some(143), "trial {trial}: {status:?}\n{err}");
    }
    let done = run(
        d,
        &[
            "--config",
            "r.toml",
            "--resume",
            "--set",
            "train.max_steps=60",
        ],
    );
    let msg = text(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{msg}");
    assert!(temporaries(&run_dir.join("checkpoints")).is_empty());
}

/// A checkpoint write that fails (here the file-size limit, as a full disk would) leaves no
/// temporary directory, names the file, exits 1; `--resume` afterwards works.
#[test]
fn a_failed_checkpoint_write_leaves_nothing_and_resume_works() {
    let dir = workdir();
    let d = dir.path();
    let first = run(d, &["--config", "r.toml", "--set", "train.max_steps=5"]);
    assert_success(&first);
    // The weights file is about 400 KB; the limit is 64 KiB (dash counts 512-byte blocks) and
    // SIGXFSZ is ignored, so writes past it fail with EFBIG.
    let again = [
        "--config",
        "r.toml",
        "--resume",
        "--set",
        "train.max_steps=10",
    ];
    let full = run_limited(d, "ulimit -f 128; trap '' XFSZ", &again);
    let msg = text(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("runs/r/checkpoints/.step-10.tmp-") && msg.contains("weights.safetensors"),
        "{msg}"
    );
    let checkpoints = d.join("runs/r/checkpoints");
    assert!(
        temporaries(&checkpoints).is_empty(),
        "{:?}",
        temporaries(&checkpoints)
    );
    let resumed = run(d, &again);
    assert_success(&resumed);
    assert!(checkpoints.join("step-10/manifest.json").exists());
}

/// Memory that runs out (an address-space limit of 4 GB, of which libtorch reserves 2.7 here,
/// and attention over a 2048-token context at micro-batch 32, 1.4 GiB by the preflight's
/// estimate) is exit 1 with libtorch's message, the peak so far and the checkpointing mode and
/// micro-batch that fit, without a panic or a C++ stack trace.
#[test]
fn an_allocation_failure_is_an_error_not_a_panic() {
    let dir = workdir();
    let out = run_limited(
        dir.path(),
        "ulimit -v 4000000",
        &[
            "--config",
            "r.toml",
            "--set",
            "data.seq_len=2048",
            "--set",
            "train.micro_batch_size=32",
            "--set",
            "train.batch_size=32",
            "--set",
            "model.hidden_size=128",
            "--set",
            "model.num_heads=4",
        ],
    );
    let msg = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("the forward and backward pass ran out of memory")
            && msg.contains("can't allocate memory")
            && msg.contains("to fit: --set train.activation_checkpointing=selective, or --set train.micro_batch_size=16 (train.batch_tokens stays")
            && msg.contains("held at the peak so far"),
        "{msg}"
    );
    assert!(
        !msg.contains("panicked") && !msg.contains("frame #") && !msg.contains("RUST_BACKTRACE"),
        "{msg}"
    );
}

/// Holds all but 4 GiB of CUDA device 0 until killed; says "held" once it does.
const HOLD_GPU_MEMORY: &str = "import time, torch\n\
free, _ = torch.cuda.mem_get_info(0)\n\
held = torch.empty(free - (4 << 30), dtype=torch.uint8, device='cuda:0')\n\
print('held', flush=True)\n\
time.sleep(600)\n";

/// On a GPU, memory that runs out at run time (another process holds all but 4 GiB, which the
/// preflight, counting the device's memory, cannot know): a resumed run's first step is exit 1
/// with what was being allocated, the peak so far and the advice, the checkpoint it resumed from
/// stays, and no panic or C++ trace reaches the user. Needs python3 with torch (the GPU
/// machine's); skipped without a CUDA device.
#[test]
fn running_out_of_gpu_memory_is_exit_1_and_keeps_the_checkpoint() {
    if glatrain_testing::cuda_or_skip().is_none() {
        return;
    }
    let dir = workdir();
    let d = dir.path();
    // A step of 16 x 2048 tokens through 8 layers 1024 wide keeps about 10 GB for its backward;
    // the weights and AdamW state (1.6 GB) fit the 4 GiB left.
    let gpu = [
        "--config",
        "r.toml",
        "--set",
        "run.device=\"cuda\"",
        "--set",
        "train.precision=\"bf16\"",
        "--set",
        "model.hidden_size=1024",
        "--set",
        "model.num_heads=8",
        "--set",
        "model.num_layers=8",
        "--set",
        "data.seq_len=2048",
        "--set",
        "train.micro_batch_size=16",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.checkpoint_every=2",
    ];
    let first = run(d, &[&gpu[..], &["--set", "train.max_steps=2"]].concat());
    assert!(first.status.success(), "{}", text(&first.stderr));
    let mut holder = Command::new("python3")
        .args(["-c", HOLD_GPU_MEMORY])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut said,
    )
    .unwrap();
    assert_eq!(said.trim(), "held", "the memory holder did not start");
    let out = run(
        d,
        &[&gpu[..], &["--resume", "--set", "train.max_steps=4"]].concat(),
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let msg = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("ran out of memory")
            && msg.contains("held at the peak so far")
            && msg.contains("to fit"),
        "{msg}"
    );
    assert!(
        !msg.contains("panicked") && !msg.contains("frame #") && !msg.contains("RUST_BACKTRACE"),
        "{msg}"
    );
    assert!(d.join("runs/r/checkpoints/step-2/manifest.json").exists());
}

/// Sizes that do not fit 64 bits, more threads than cores, an overlong run.name: exit 2 before
/// anything is written, the message naming the key (and, for a huge value, not repeating it).
#[test]
fn limits_are_refused_before_anything_is_written() {
    let dir = workdir();
    let d = dir.path();
    let refused = |set: &str, expected: &str| {
        let out = run(d, &["--config", "r.toml", "--set", set]);
        let msg = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{set}: {msg}");
        assert!(msg.contains(expected), "{set}: {msg}");
        assert!(!d.join("runs").exists(), "{set} wrote something");
        msg
    };
    refused(
        "model.vocab_size=4611686018427387904",
        "model.vocab_size = 4611686018427387904: the embedding",
    );
    refused(
        "model.hidden_size=4611686018427387904",
        "model.hidden_size = 4611686018427387904: ",
    );
    let cores = std::thread::available_parallelism().unwrap().get();
    refused(
        "run.cpu_threads=100000",
        &format!("run.cpu_threads = 100000: this machine has {cores} CPU cores"),
    );
    refused(
        &format!("run.name={}", "n".repeat(300)),
        "at most 100 characters",
    );
    let huge = CONFIG.replace(
        "name = \"r\"",
        &format!("name = \"{}\"", "n".repeat(1 << 20)),
    );
    std::fs::write(d.join("huge.toml"), huge).unwrap();
    let out = run(d, &["--config", "huge.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.len() < 1000,
        "{} bytes of error",
        out.stderr.len()
    );
}

/// `eval` refuses an unusable chart path before evaluating, and eval/sample name a directory
/// that does not exist; `sample --prompt-file` continues a file's text.
#[test]
fn eval_and_sample_check_their_arguments() {
    let dir = workdir();
    let d = dir.path();
    let trained = run(d, &["--config", "r.toml", "--set", "train.max_steps=2"]);
    assert_success(&trained);
    let out = run(d, &["eval", "--checkpoint", "runs/r", "--plot", "/tmp"]);
    assert_exit(
        &out,
        2,
        "/tmp: cannot write the chart there: it is a directory",
    );
    for cmd in [
        &["eval", "--checkpoint", "runs/none"][..],
        &["sample", "--checkpoint", "runs/none", "--prompt", "a"],
    ] {
        let out = run(d, cmd);
        assert_exit(&out, 2, "runs/none: no such checkpoint or run directory");
    }
    std::fs::write(d.join("prompt.txt"), "The jury said").unwrap();
    let args = [
        "sample",
        "--checkpoint",
        "runs/r",
        "--max-tokens",
        "80",
        "--temperature",
        "0",
    ];
    let mut from_file = args.to_vec();
    from_file.extend(["--prompt-file", "prompt.txt"]);
    let out = run(d, &from_file);
    assert_success(&out);
    let sample = text(&out.stdout);
    assert!(sample.starts_with("The jury said"), "{sample}");
    assert!(
        text(&out.stderr).contains("past the 64 the model was trained on"),
        "{}",
        text(&out.stderr)
    );
    let mut inline = args.to_vec();
    inline.extend(["--prompt", "The jury said"]);
    assert_eq!(run(d, &inline).stdout, out.stdout);
    let mut missing = args.to_vec();
    missing.extend(["--prompt-file", "none.txt"]);
    let out = run(d, &missing);
    assert_exit(&out, 2, "none.txt: cannot read the prompt");
}
