"""Backend "cuda": the CUDA C++ kernels of csrc/cuda (see native.py for the ops, _ext.py for the build).

forward / backward / forward_with_grad / forward_grad_ are the shared ops of native.py. The mean /
sum path of the backend contract (backends.Backend) is CUDA-only: forward_reduced is two launches (the
forward kernel with the device-side target check and per-block partials, then a one-block finalize)
and scale_ one launch, with no host sync.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._inputs import Hyper
from . import native
from .native import backward, forward_grad_, forward_with_grad, reduced_loss  # noqa: F401

NAME = "cuda"
FUSED_GRAD = True  # forward_reduced(with_grad=True): the gradient is written in the forward pass


def forward(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """backends.Backend.forward: one launch; its kernel checks the targets and weights (a device-side
    assert, once per block, no host sync), as forward_reduced's finalize does."""
    return native.forward(x3, target, hp, weight)


def forward_reduced(
    x3: torch.Tensor,
    target: torch.Tensor,
    hp: Hyper,
    mean: bool,
    with_grad: bool,
    weight: torch.Tensor | None = None,
):
    """-> (out, inv_count, grad, pending): out the sum of the row losses or their mean over the kept
    rows (0-dim, loss dtype; nan for a mean with no kept row), inv_count (1,) = 1 / count for a mean
    (else None), grad the gradient of the SUM of the row losses when with_grad (else None), pending
    the factor the backward still owes grad: inv_count for a mean, None for a sum. Targets are
    checked by a device-side assert; nothing waits for the GPU.

    The count is known only when the pass ends, so a mean's gradient leaves 1 / count pending: the
    backward's scale then reads and writes the gradient once more (the Triton backend counts the
    targets in a first small kernel and applies 1 / count in the pass instead)."""
    out, inv_count, grad = torch.ops.drainage_fast.forward_reduced.default(
        x3, target, mean, with_grad, *hp, weight
    )
    return out, inv_count, grad, inv_count


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None = None) -> torch.Tensor:
    """grad *= grad_out * pending (None: 1) in place, the factor in the loss dtype; one launch, which
    returns at once on the device when the factor is exactly 1."""
    torch.ops.drainage_fast.scale_by_.default(grad, grad_out, pending)
    return grad


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    if device is not None and device.type != "cuda":
        return False, f"the CUDA kernels take CUDA tensors (got {device.type})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    error = _ext.load_cuda()
    if error is not None:
        return False, error
    return True, "CUDA C++ kernels (csrc/cuda)"
