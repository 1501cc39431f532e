#!/usr/bin/env bash
# GPU check: every test binary of the crates with GPU tests (the CUDA kernel tests against the f64
# reference, at both kernel compile tiers; the tiers against each other; the shim and the models
# under bf16 autocast), then the benchmark (`glatrain bench`), with a summary.
#
#   scripts/gpu-check.sh                 build here, then run (a machine with cargo, a GPU, torch)
#   scripts/gpu-check.sh build [DIR]     build the test binaries and the glatrain CLI into DIR
#                                        (default .device/ops), with the kernel sources
#   scripts/gpu-check.sh run [DIR] [OUT] run what `build` left in DIR on a GPU machine with
#                                        PyTorch 2.11 (no Rust needed); logs and JSON go to OUT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-all}
DIR=${2:-$ROOT/.device/ops}

build() {
  # shellcheck source=env.sh
  source "$ROOT/scripts/env.sh"
  cd "$ROOT"
  rm -rf "$DIR" && mkdir -p "$DIR/tests" "$DIR/kernels"
  cargo build --release -p glatrain
  cargo test --release -p glatrain-cuda -p glatrain-shim -p glatrain-ops -p glatrain-models \
    --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])' |
    while read -r exe; do cp "$exe" "$DIR/tests/"; done
  cp target/release/glatrain "$DIR/"
  cp kernels/*.cu kernels/*.cuh "$DIR/kernels/"
  strip --strip-debug "$DIR"/tests/* "$DIR/glatrain"
  du -sh "$DIR"
}

run() {
  local out=${1:-$ROOT/.device/out}
  mkdir -p "$out"
  local torch_dir
  torch_dir=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
  # libtorch, and the wheel's libnvrtc for run-time kernel compilation.
  export LD_LIBRARY_PATH="$torch_dir/lib:$torch_dir/../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
  export GLATRAIN_KERNEL_DIR="$DIR/kernels"
  export GLATRAIN_CACHE_DIR=${GLATRAIN_CACHE_DIR:-/tmp/glatrain-kernel-cache}
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  local summary=() failed=0
  for t in "$DIR"/tests/*; do
    local name tiers tier log label start status
    name=$(basename "$t")
    # The kernel tests run at each compile tier (crates/cuda/src/compile.rs): the quick code
    # serves first calls, so it must be as correct as the optimised code.
    tiers=default
    [[ $name == cuda_gla-* || $name == cuda_scan-* || $name == cuda_fused-* ]] && tiers="full quick"
    for tier in $tiers; do
      start=$SECONDS
      log="$out/test-$name.log" label=$name
      [[ $tier == default ]] || log="$out/test-$name-$tier.log" label="$name ($tier)"
      if GLATRAIN_KERNEL_TIER=${tier/default/} timeout 300 "$t" --test-threads=1 --nocapture >"$log" 2>&1; then status=ok; else status=FAILED; failed=1; fi
      summary+=("$(printf '%-48s %-7s %4d s' "$label" "$status" $((SECONDS - start)))")
      tail -n 25 "$log"
    done
  done
  local bench_status=ok
  timeout 300 "$DIR/glatrain" bench --json "$out/bench.json" 2>&1 | tee "$out/bench.log" || { bench_status=FAILED; failed=1; }
  echo "== summary =="
  printf '%s\n' "${summary[@]}"
  echo "glatrain bench: $bench_status ($out/bench.json)"
  return $failed
}

case $cmd in
  build) build ;;
  run) run "${3:-}" ;;
  all) build && run ;;
  *) echo "usage: $0 [build [DIR] | run [DIR] [OUT]]" >&2; exit 2 ;;
esac
