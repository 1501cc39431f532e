# Sourced by the other scripts: the project-local venv that provides libtorch, and the variables
# tch's build needs to use it. Creates the venv with torch==2.11.0 when it is missing, and adds the
# CUDA header wheels the shim's NCCL process group compiles against (c10d's ProcessGroupNCCL.hpp
# includes cuda_runtime.h and cuda_fp16.h, which need crt/host_config.h and CCCL's nv/target; the
# torch wheel's nvidia packages ship neither) when a venv lacks them.
# shellcheck shell=bash

GLATRAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GLATRAIN_VENV=${GLATRAIN_VENV:-$GLATRAIN_ROOT/.venv}
GLATRAIN_TORCH_VERSION=2.11.0
GLATRAIN_CUDA_HEADER_WHEELS=(nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88)

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

glatrain_cuda_headers_ok() {
  "$GLATRAIN_VENV/bin/python" - "${GLATRAIN_CUDA_HEADER_WHEELS[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(name) != want for name, want in (w.split("==") for w in sys.argv[1:])))
PY
}

if ! glatrain_cuda_headers_ok; then
  echo "[glatrain] adding ${GLATRAIN_CUDA_HEADER_WHEELS[*]} to $GLATRAIN_VENV (CUDA headers, 18 MB)" >&2
  "$GLATRAIN_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${GLATRAIN_CUDA_HEADER_WHEELS[@]}" ||
    { echo "[glatrain] pip install ${GLATRAIN_CUDA_HEADER_WHEELS[*]} failed" >&2; return 1 2>/dev/null || exit 1; }
fi

export VIRTUAL_ENV=$GLATRAIN_VENV
export PATH=$GLATRAIN_VENV/bin:$PATH
export LIBTORCH_USE_PYTORCH=1
unset LIBTORCH LIBTORCH_INCLUDE LIBTORCH_LIB
