#!/usr/bin/env bash
# The whole test suite: bootstrap (venv with torch==2.11.0 if missing), formatting and lint checks,
# then every crate's tests in release mode (dependencies are built once, in release). On a machine
# without a GPU the CUDA tests report "skipped: no CUDA device", but every kernel is still compiled
# with NVRTC, and the selective-scan and fused kernels' sources run on the CPU (subsets of
# scripts/selective-scan-emu/run.py and scripts/kernel-emu/fused.py, with g++ and the venv's
# torch).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$GLATRAIN_ROOT"
cargo fmt --all --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
cargo test --release --locked --workspace "$@"
python scripts/selective-scan-emu/run.py --quick
python scripts/kernel-emu/fused.py --quick
