#!/usr/bin/env bash
# Bootstraps (venv with torch==2.11.0 if missing) and builds the release binary
# target/release/glatrain. Cheap to re-run: both steps are skipped when nothing changed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$GLATRAIN_ROOT"
cargo build --release --locked -p glatrain "$@"
