"""Backend "cuda": the CUDA C++ kernels of csrc/cuda (see native.py for the ops, _ext.py for the build)."""

from __future__ import annotations

import torch

from .. import _ext, _inputs
from . import native
from .native import backward, scale_  # noqa: F401

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


def forward(x3: torch.Tensor, target: torch.Tensor, hp: _inputs.Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """backends.Backend.forward; the targets are checked on the device (torch ops, no host sync)."""
    _inputs.check_targets_torch(target, x3.shape[-1], hp)
    return native.forward(x3, target, hp)


def forward_reduced(x3: torch.Tensor, target: torch.Tensor, hp: _inputs.Hyper, mean: bool, with_grad: bool):
    """See backends.Backend: the target check and the count in torch ops, then one kernel."""
    count = _inputs.check_targets_torch(target, x3.shape[-1], hp)
    return native.forward_reduced(x3, target, hp, mean, with_grad, count)
