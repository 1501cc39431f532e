# Sourced by the other scripts: the project-local venv that provides libtorch, and the variables
# tch's build needs to use it. Creates the venv with torch==2.11.0 when it is missing.
# shellcheck shell=bash

GLATRAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GLATRAIN_VENV=${GLATRAIN_VENV:-$GLATRAIN_ROOT/.venv}
GLATRAIN_TORCH_VERSION=2.11.0

glatrain_venv_ok() {
  [ -x "$GLATRAIN_VENV/bin/python" ] &&
    "$GLATRAIN_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$GLATRAIN_TORCH_VERSION')" 2>/dev/null
}

if ! glatrain_venv_ok; then
  echo "[glatrain] creating $GLATRAIN_VENV with torch==$GLATRAIN_TORCH_VERSION (about 2 minutes, 4.6 GB)" >&2
  python3 -m venv "$GLATRAIN_VENV" || return 1 2>/dev/null || exit 1
  "$GLATRAIN_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$GLATRAIN_TORCH_VERSION" ||
    { echo "[glatrain] pip install torch==$GLATRAIN_TORCH_VERSION failed" >&2; return 1 2>/dev/null || exit 1; }
fi

export VIRTUAL_ENV=$GLATRAIN_VENV
export PATH=$GLATRAIN_VENV/bin:$PATH
export LIBTORCH_USE_PYTORCH=1
unset LIBTORCH LIBTORCH_INCLUDE LIBTORCH_LIB
