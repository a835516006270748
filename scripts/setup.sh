#!/usr/bin/env bash
# Creates .venv (if missing) and installs drainage_fast in it, editable, with the extras given as
# the first argument (default "test"; e.g. "train", "test,bench").
#
# torch goes in first: on a machine without an NVIDIA GPU the CPU build (a bare `torch` requirement
# would pull a multi-GB CUDA build there); with a GPU, the default CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --quiet)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.6"
  else
    "${pip[@]}" install "torch==${TORCH_VERSION:-2.13.0}+cpu" \
      --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20
  fi
fi
"${pip[@]}" install -e ".[${extras}]"
.venv/bin/python -c "import torch, drainage_fast; print('torch', torch.__version__, '| drainage_fast backends:', drainage_fast.available_backends())"
