"""Backend "cuda": the CUDA C++ kernels of csrc/cuda (see native.py for the ops, _ext.py for the build)."""

from __future__ import annotations

import torch

from .. import _ext
from .native import backward, forward, forward_with_grad, scale_  # noqa: F401

NAME = "cuda"
FUSED_GRAD = True  # forward_with_grad: 1 read + 1 write of the logits for mean / sum


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    if device is not None and device.type != "cuda":
        return False, f"the CUDA kernels take CUDA tensors (got {device.type})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    error = _ext.load_cuda()
    if error is not None:
        return False, error
    return True, "CUDA C++ kernels (csrc/cuda)"
