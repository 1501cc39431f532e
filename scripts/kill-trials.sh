#!/usr/bin/env bash
# kill -9 trials: trains the three tiny models (configs/{gla,transformer,mamba}-tiny.toml, cut
# to a few dozen short steps with frequent checkpoints), kills each trial's run with SIGKILL up
# to twice, at a random time or the moment a checkpoint is being written, resumes until the run
# completes, and compares its metrics.jsonl (every step's train/loss and the last eval/loss, as
# written) with an uninterrupted run's. (A run killed after its final checkpoint evaluates again
# when resumed, so its log can hold two final evaluations.) Prints one line per trial and a summary; exits 1 if
# any trial did not resume exactly.
#
#   scripts/kill-trials.sh [TRIALS_PER_MODEL (default 7)] [WORK_DIR (default: a new temp dir)]
#
# Needs target/release/glatrain (or $GLATRAIN_BIN) and python3. Minutes on 2 cores: not part of
# the test suite.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${GLATRAIN_BIN:-$root/target/release/glatrain}
trials=${1:-7}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
[ -x "$bin" ] || { echo "no $bin: build it first (cargo build --release -p glatrain)" >&2; exit 2; }

common=(
  --set train.max_steps=24 --set train.warmup_steps=3 --set train.batch_size=4
  --set train.micro_batch_size=4 --set train.checkpoint_every=3 --set train.keep_checkpoints=2
  --set train.eval_batches=4 --set logging.log_every=1 --set logging.progress=lines
  --set logging.tensorboard=false --set run.cpu_threads=1 --set "run.out_dir=$work/runs"
)

# Every step's train/loss and the last eval/loss of a run, as written (their text is their
# bits); lines cut short by a kill are skipped.
losses() {
  python3 - "$1/metrics.jsonl" <<'EOF'
import json, os, sys
evals = []
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in v:
            print(v["step"], "train/loss", repr(v["train/loss"]))
        if "eval/loss" in v:
            evals.append((v["step"], repr(v["eval/loss"])))
if evals:
    print(evals[-1][0], "eval/loss", evals[-1][1])
EOF
}

# Waits up to $2 seconds for a checkpoint's temporary directory in run dir $1; 0 when seen.
wait_for_checkpoint_write() {
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    compgen -G "$1/checkpoints/.step-*.tmp-*" >/dev/null && return 0
  done
  return 1
}

exact=0 total=0 kills=0 mid_checkpoint=0
for model in gla transformer mamba; do
  config=$root/configs/$model-tiny.toml
  ref=$work/runs/$model-ref
  "$bin" --config "$config" "${common[@]}" --set "run.name=$model-ref" >"$work/$model-ref.log" 2>&1
  reference=$(losses "$ref")
  for trial in $(seq 1 "$trials"); do
    name=$model-$trial
    dir=$work/runs/$name
    log=$work/$name.log
    : >"$log"
    notes=()
    for attempt in 1 2 3; do
      args=(--config "$config" "${common[@]}" --set "run.name=$name")
      compgen -G "$dir/checkpoints/step-*" >/dev/null && args+=(--resume)
      "$bin" "${args[@]}" >>"$log" 2>&1 &
      pid=$!
      if ((attempt < 3)); then
        if (((trial + attempt) % 2 == 0)) && wait_for_checkpoint_write "$dir" 60; then
          how=checkpoint
        else
          sleep "$(python3 -c "import random; print(round(random.uniform(1.5, 8), 2))")"
          how=random
        fi
        kill -9 "$pid" 2>/dev/null || true
        status=0
        wait "$pid" 2>/dev/null || status=$?
        if ((status == 137)); then
          kills=$((kills + 1))
          left=$(compgen -G "$dir/checkpoints/.step-*.tmp-*" | head -1 || true)
          if [ -n "$left" ]; then
            mid_checkpoint=$((mid_checkpoint + 1))
            notes+=("killed ($how) writing ${left##*/}")
          else
            step=$(losses "$dir" | awk '$2 == "train/loss" { s = $1 } END { print s }')
            notes+=("killed ($how) after step ${step:-0}")
          fi
          continue
        fi
      else
        status=0
        wait "$pid" || status=$?
      fi
      notes+=("finished (exit $status)")
      break
    done
    total=$((total + 1))
    if [ "$(losses "$dir")" = "$reference" ]; then
      exact=$((exact + 1))
      verdict=exact
    else
      verdict=DIFFERENT
    fi
    echo "$name: $verdict: $(IFS=';'; echo "${notes[*]}")"
  done
done
echo "$exact of $total trials resumed exactly ($kills kills, $mid_checkpoint of them while a checkpoint was being written); runs in $work/runs"
[ "$exact" -eq "$total" ]
