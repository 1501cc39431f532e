#!/usr/bin/env bash
# GPU check: every test binary of the crates with GPU tests (the CUDA kernel tests against the f64
# reference, at both kernel compile tiers; the tiers against each other; the shim and the models
# under bf16 autocast; the NCCL process group), then the benchmark (`glatrain bench`), with a summary.
#
#   scripts/gpu-check.sh                 build here, then run (a machine with cargo, a GPU, torch)
#   scripts/gpu-check.sh build [DIR]     build the test binaries and the glatrain CLI into DIR
#                                        (default .device/ops), with the kernel sources
#   scripts/gpu-check.sh run [DIR] [OUT] run what `build` left in DIR on a GPU machine with
#                                        PyTorch 2.11 (no Rust needed); logs and JSON go to OUT
#   scripts/gpu-check.sh measure [DIR] [OUT]
#                                        the training measurements: GLA-340M, Transformer++-340M,
#                                        Mamba-370M and GLA-1.3B as shipped (8 x 2048, bf16) with
#                                        tokens/s, MFU, peak memory against the preflight's
#                                        estimate and a step profile each, and GLA-340M at 32K to
#                                        128K tokens; BEFORE=path/to/glatrain also times an
#                                        earlier build on the same runs, for a before/after table
#   scripts/gpu-check.sh session [DIR] [OUT]
#                                        one device call's worth (DEADLINE seconds, default 560):
#                                        the phases in PHASES (default "tests speed bench long
#                                        memory article"): the test binaries side by side (TESTS:
#                                        a glob of their names, default all), the speed runs
#                                        ("mamba": Mamba-370M's alone, beside BEFORE;
#                                        "documents": with data.document_boundaries, and the
#                                        long-context configs as shipped), the
#                                        benchmark, the long-context runs, the memory-estimate
#                                        runs, the article's comparison; "losses": 200 steps
#                                        against BEFORE (and ALTERNATIVE=path/to/glatrain, a
#                                        third build, when set) and one NCCL rank. Each step is skipped
#                                        when its time limit no longer fits; everything lands in
#                                        OUT/session.tar.gz
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-all}
DIR=$(realpath -m "${2:-$ROOT/.device/ops}")
START=$SECONDS

# Seconds left before $DEADLINE (seconds from the start; unset: no limit).
left() { echo $((${DEADLINE:-1000000} - (SECONDS - START))); }

# The environment the built binaries need on a machine with PyTorch: libtorch, the wheel's
# libnvrtc for run-time kernel compilation, the kernel sources and a kernel cache.
device_env() {
  local torch_dir
  torch_dir=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
  export LD_LIBRARY_PATH="$torch_dir/lib:$torch_dir/../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
  export GLATRAIN_KERNEL_DIR="$DIR/kernels"
  export GLATRAIN_CACHE_DIR=${GLATRAIN_CACHE_DIR:-/tmp/glatrain-kernel-cache}
}

# The test executables of the packages given (cargo's -p arguments), built in release.
test_binaries() {
  cargo test --release "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])'
}

build() {
  # shellcheck source=env.sh
  source "$ROOT/scripts/env.sh"
  cd "$ROOT"
  rm -rf "$DIR" && mkdir -p "$DIR/tests" "$DIR/cli-tests" "$DIR/kernels"
  cargo build --release -p glatrain
  test_binaries -p glatrain-cuda -p glatrain-shim -p glatrain-dist -p glatrain-ops -p glatrain-models |
    while read -r exe; do cp "$exe" "$DIR/tests/"; done
  # The CLI's tests run the binary; on the GPU machine only their GPU tests run (see cli_tests).
  test_binaries -p glatrain | while read -r exe; do cp "$exe" "$DIR/cli-tests/"; done
  cp target/release/glatrain "$DIR/"
  cp kernels/*.cu kernels/*.cuh "$DIR/kernels/"
  strip --strip-debug "$DIR"/tests/* "$DIR"/cli-tests/* "$DIR/glatrain"
  du -sh "$DIR"
}

# The compile tiers a test binary runs at: both for the kernel tests (the quick code serves first
# calls, so it must be as correct as the optimised code), else the default.
tiers_of() {
  case $1 in
    cuda_gla-* | cuda_scan-* | cuda_fused-*) echo "full quick" ;;
    *) echo default ;;
  esac
}

run() {
  local out=${1:-$ROOT/.device/out}
  mkdir -p "$out"
  device_env
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  local summary=() failed=0
  for t in "$DIR"/tests/*; do
    local name tiers tier log label start status
    name=$(basename "$t")
    tiers=$(tiers_of "$name")
    for tier in $tiers; do
      start=$SECONDS
      log="$out/test-$name.log" label=$name
      [[ $tier == default ]] || log="$out/test-$name-$tier.log" label="$name ($tier)"
      if GLATRAIN_KERNEL_TIER=${tier/default/} timeout 300 "$t" --test-threads=1 --nocapture >"$log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
      summary+=("$(printf '%-48s %-7s %4d s' "$label" "$status" $((SECONDS - start)))")
      tail -n 25 "$log"
    done
  done
  cli_tests "$out" 300 || failed=1
  LIMIT_BENCH=300 bench bench || failed=1
  echo "== summary =="
  printf '%s\n' "${summary[@]}"
  cat "$out/tests.txt" 2>/dev/null || true
  return $failed
}

# One training run of binary $1 named $2 on config $3 (more --set overrides after it), on the
# embedded corpus, with a run directory under $RUNS; its log goes to $out/$2.log. $LIMIT
# (seconds, default 400) bounds it; it is skipped when that no longer fits before $DEADLINE.
train_run() {
  local bin=$1 name=$2 config=$3
  shift 3
  local start=$SECONDS status=ok limit=${LIMIT:-400}
  if (($(left) < limit + 10)); then
    summary+=("$(printf '%-40s %-16s' "$name" "skipped ($(left) s left)")")
    return
  fi
  # Each binary runs with the kernel sources it was built with.
  GLATRAIN_KERNEL_DIR=$(dirname "$bin")/kernels timeout "$limit" "$bin" --config "$config" --set data.train=embedded --set data.valid=embedded \
    --set data.tokenizer=byte --set train.eval_every=0 --set train.eval_batches=1 \
    --set train.checkpoint_every=0 --set logging.log_every=5 --set logging.progress=lines \
    --set train.warmup_steps=5 --set run.out_dir="$RUNS" --set run.name="$name" "$@" \
    >"$out/$name.log" 2>&1 || status="FAILED (exit $?)"
  summary+=("$(printf '%-40s %-16s %4d s' "$name" "$status" $((SECONDS - start)))")
  tail -n 4 "$out/$name.log"
  # The checkpoints are not needed once the metrics are read; they fill a RAM disk fast.
  rm -rf "$RUNS/$name/checkpoints"
}

# Short runs at the shipped micro-batch (8 x 2048): 4 micro-batches per step, a window logged
# every 2 steps; run-summary.py times the windows after step 4 that miss the profiled steps.
SHORT=(--set train.batch_tokens=65536 --set logging.log_every=2)
LONG=(--set train.micro_batch_size=1 --set train.max_steps=8 --set logging.log_every=2)

# Tokens/s, MFU and peak memory of the shipped GPU configs (and of $BEFORE, an earlier build, on
# the same runs), in order of importance, so that a deadline cuts the least useful runs.
speed_runs() {
  local new=$DIR/glatrain steps=("${SHORT[@]}" --set train.max_steps=16 --set logging.profile_steps=[13,14])
  train_run "$new" gla-340m configs/gla-340m.toml "${steps[@]}"
  if [[ -n ${BEFORE:-} ]]; then
    train_run "$BEFORE" gla-340m-before configs/gla-340m.toml "${steps[@]}"
  fi
  train_run "$new" transformer-340m configs/transformer-340m.toml "${steps[@]}"
  if [[ -n ${BEFORE:-} ]]; then
    train_run "$BEFORE" transformer-340m-before configs/transformer-340m.toml "${steps[@]}"
  fi
  train_run "$new" mamba-370m configs/mamba-370m.toml "${SHORT[@]}" --set train.max_steps=10 \
    --set logging.profile_steps=[9,10]
  train_run "$new" gla-1.3b configs/gla-1.3b.toml "${SHORT[@]}" --set train.max_steps=8
  train_run "$new" gla-340m-t32768 configs/gla-340m.toml --set data.seq_len=32768 \
    --set train.batch_tokens=32768 "${LONG[@]}"
}

# Mamba-370M as shipped, and beside $BEFORE when given.
mamba_runs() {
  local steps=("${SHORT[@]}" --set train.max_steps=10 --set logging.profile_steps=[9,10])
  train_run "$DIR/glatrain" mamba-370m configs/mamba-370m.toml "${steps[@]}"
  if [[ -n ${BEFORE:-} ]]; then
    train_run "$BEFORE" mamba-370m-before configs/mamba-370m.toml "${steps[@]}"
  fi
}

# Document boundaries: GLA-340M and Transformer++-340M as in speed_runs with
# data.document_boundaries (their cost against the speed runs), and the long-context configs as
# shipped.
document_runs() {
  local new=$DIR/glatrain steps=("${SHORT[@]}" --set train.max_steps=16 --set data.document_boundaries=true)
  train_run "$new" gla-340m-documents configs/gla-340m.toml "${steps[@]}"
  train_run "$new" transformer-340m-documents configs/transformer-340m.toml "${steps[@]}"
  train_run "$new" gla-340m-64k configs/gla-340m-64k.toml --set train.max_steps=6 --set logging.log_every=2
  train_run "$new" gla-340m-128k configs/gla-340m-128k.toml --set train.max_steps=4 --set logging.log_every=1
}

# Long context: GLA at 64K and 128K tokens (checkpointed to fit), Transformer++ at 32K.
long_runs() {
  local new=$DIR/glatrain
  train_run "$new" gla-340m-t65536-selective configs/gla-340m.toml --set data.seq_len=65536 \
    --set train.batch_tokens=65536 --set train.activation_checkpointing=selective "${LONG[@]}"
  train_run "$new" gla-340m-t131072-full configs/gla-340m.toml --set data.seq_len=131072 \
    --set train.batch_tokens=131072 --set train.activation_checkpointing=full "${LONG[@]}"
  train_run "$new" transformer-340m-t32768 configs/transformer-340m.toml --set data.seq_len=32768 \
    --set train.batch_tokens=32768 "${LONG[@]}"
}

# Variations of micro-batch, precision and checkpointing that check the memory estimate against
# the measured peak.
memory_runs() {
  local new=$DIR/glatrain few=("${SHORT[@]}" --set train.max_steps=4 --set train.warmup_steps=1)
  train_run "$new" gla-340m-selective configs/gla-340m.toml "${few[@]}" \
    --set train.activation_checkpointing=selective
  train_run "$new" gla-340m-full configs/gla-340m.toml "${few[@]}" --set train.activation_checkpointing=full
  train_run "$new" gla-340m-mb4 configs/gla-340m.toml "${few[@]}" --set train.micro_batch_size=4
  train_run "$new" transformer-340m-selective configs/transformer-340m.toml "${few[@]}" \
    --set train.activation_checkpointing=selective
  train_run "$new" mamba-370m-full configs/mamba-370m.toml "${few[@]}" \
    --set train.activation_checkpointing=full
  train_run "$new" gla-340m-fp16 configs/gla-340m.toml "${few[@]}" --set train.precision=fp16
  train_run "$new" gla-340m-fp32 configs/gla-340m.toml "${few[@]}" --set train.precision=fp32
}

# 200 steps of one micro-batch each, this build and $BEFORE on the same data, for the losses'
# agreement; and one rank through NCCL (`--nproc-per-node 1`) against the plain process.
loss_runs() {
  local new=$DIR/glatrain run=(--set train.batch_tokens=16384 --set train.max_steps=200
    --set logging.log_every=10)
  for model in gla-340m transformer-340m; do
    train_run "$new" "$model-200" "configs/$model.toml" "${run[@]}"
    if [[ -n ${BEFORE:-} ]]; then
      train_run "$BEFORE" "$model-200-before" "configs/$model.toml" "${run[@]}"
    fi
    if [[ -n ${ALTERNATIVE:-} ]]; then
      train_run "$ALTERNATIVE" "$model-200-alternative" "configs/$model.toml" "${run[@]}"
    fi
  done
  local few=("${SHORT[@]}" --set train.max_steps=6 --set train.warmup_steps=1)
  train_run "$new" gla-340m-one-process configs/gla-340m.toml "${few[@]}"
  train_run "$new" gla-340m-nccl-rank configs/gla-340m.toml "${few[@]}" --nproc-per-node 1
}

# The runs' table (run-summary.py), their step profiles and the list of what ran.
summarise_runs() {
  python3 "$ROOT/scripts/run-summary.py" --warmup-steps 4 --out "$out/runs.json" "$RUNS"/*/ |
    tee "$out/runs.log"
  for profile in "$RUNS"/*/profile/summary.txt; do
    [[ -f $profile ]] && { echo "== $profile"; cat "$profile"; } >>"$out/profiles.txt"
  done
  echo "== summary =="
  printf '%s\n' "${summary[@]}" | tee "$out/measure.txt"
}

measure() {
  out=${1:-$ROOT/.device/out}
  mkdir -p "$out"
  device_env
  RUNS=${RUNS:-/dev/shm/glatrain-runs}
  mkdir -p "$RUNS"
  summary=()
  speed_runs
  long_runs
  memory_runs
  summarise_runs
}

# `glatrain bench` with the arguments after $1 into $out/$1.json and $1.log, within
# $LIMIT_BENCH seconds (default 150) and the deadline; fails when the benchmark does.
bench() {
  local name=$1 limit=${LIMIT_BENCH:-150}
  shift
  ((limit > $(left) - 10)) && limit=$(($(left) - 10))
  if ((limit < 30)); then
    summary+=("$(printf '%-40s %-16s' "$name" "skipped ($(left) s left)")")
    return
  fi
  local start=$SECONDS status=ok
  timeout "$limit" "$DIR/glatrain" bench "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1 ||
    status="FAILED (exit $?)"
  summary+=("$(printf '%-40s %-16s %4d s' "$name" "$status" $((SECONDS - start)))")
  tail -n 40 "$out/$name.log"
  [[ $status == ok ]]
}

# The GPU tests of the CLI's test binaries (names with "gpu": data parallel on two GPUs, an
# out-of-memory step), one binary after another, on the CLI built beside them; a line each in
# $out/tests.txt; fails when one does.
cli_tests() {
  local out=$1 limit=$2 failed=0
  for t in "$DIR"/cli-tests/*; do
    [[ -x $t ]] || continue
    local name start=$SECONDS status=ok
    name=$(basename "$t")
    GLATRAIN_BIN=$DIR/glatrain timeout "$limit" "$t" gpu --test-threads=1 >"$out/test-$name.log" 2>&1 ||
      { status="FAILED (exit $?)"; failed=1; }
    printf '%-48s %-16s %4d s  %s\n' "$name (gpu)" "$status" $((SECONDS - start)) \
      "$(grep -E '^test result' "$out/test-$name.log" | tail -n 1)" >>"$out/tests.txt"
  done
  return $failed
}

# The test binaries side by side (each at both tiers where it tests kernels), bounded by the
# deadline; a line per binary in $out/tests.txt.
parallel_tests() {
  local out=$1 limit
  limit=$(( $(left) < 300 ? $(left) : 300 ))
  for t in "$DIR"/tests/${TESTS:-*}; do
    local name tiers
    name=$(basename "$t")
    tiers=$(tiers_of "$name")
    for tier in $tiers; do
      (
        local log="$out/test-$name-$tier.log" start=$SECONDS status=ok
        GLATRAIN_KERNEL_TIER=${tier/default/} timeout "$limit" "$t" --test-threads=2 >"$log" 2>&1 ||
          status="FAILED (exit $?)"
        printf '%-48s %-16s %4d s  %s\n' "$name ($tier)" "$status" $((SECONDS - start)) \
          "$(grep -E '^test result' "$log" | tail -n 1)" >>"$out/tests.txt"
      ) &
    done
  done
  cli_tests "$out" "$limit" || true &
  wait
  cat "$out/tests.txt"
  grep -h -B2 -A12 'panicked' "$out"/test-*.log | head -n 80 || true
}

session() {
  local final=${1:-$ROOT/.device/out}
  DEADLINE=${DEADLINE:-560} LIMIT=${LIMIT:-60}
  # Everything goes to one archive at the end (a device call brings back only a few files).
  out=$(mktemp -d)
  device_env
  RUNS=${RUNS:-/dev/shm/glatrain-runs}
  mkdir -p "$RUNS" "$final"
  summary=()
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  for phase in ${PHASES:-tests speed bench long memory article}; do
    case $phase in
      tests) parallel_tests "$out" ;;
      speed) speed_runs ;;
      mamba) mamba_runs ;;
      documents) document_runs ;;
      bench) bench bench || true ;;
      long) long_runs ;;
      memory) memory_runs ;;
      losses) loss_runs ;;
      article) LIMIT_BENCH=$(($(left) - 25)) bench bench-article --preset article || true ;;
      *) echo "unknown phase $phase" >&2 ;;
    esac
    echo "$phase done at $((SECONDS - START)) s"
  done
  summarise_runs
  for run in "$RUNS"/*/; do
    [[ -d $run ]] || continue
    mkdir -p "$out/runs/$(basename "$run")"
    cp "$run"/{preflight.json,summary.json,metrics.jsonl,config.toml} "$out/runs/$(basename "$run")/" 2>/dev/null || true
    cp "$run"/profile/summary.txt "$out/runs/$(basename "$run")/profile.txt" 2>/dev/null || true
  done
  tar -czf "$final/session.tar.gz" -C "$out" .
  cp "$out/tests.txt" "$out/measure.txt" "$final/" 2>/dev/null || true
  echo "session done at $((SECONDS - START)) s"
}

case $cmd in
  build) build ;;
  run) run "${3:-}" ;;
  measure) measure "${3:-}" ;;
  session) session "${3:-}" ;;
  all) build && run ;;
  *) echo "usage: $0 [build [DIR] | run [DIR] [OUT] | measure [DIR] [OUT] | session [DIR] [OUT]]" >&2; exit 2 ;;
esac
