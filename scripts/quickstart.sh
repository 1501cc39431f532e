#!/usr/bin/env bash
# The main job on the embedded default: bootstrap (venv with torch==2.11.0 if missing), build, then
# train the tiny GLA model on the embedded corpus on CPU; the trainer prints the validation
# perplexity at the end. Extra arguments go to glatrain (e.g. --set train.max_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
exec target/release/glatrain --config configs/gla-tiny.toml "$@"
