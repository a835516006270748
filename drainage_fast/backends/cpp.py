"""Backend "cpp": the C++ CPU kernels of csrc/ (see native.py for the ops, _ext.py for the build)."""

from __future__ import annotations

import torch

from .. import _inputs
from . import native
from .native import LOAD_ERROR, backward, reduced_loss  # noqa: F401

NAME = "cpp"
# Writing the gradient in the forward, while the row is in L1 and its exponentials are at hand,
# measured 1.28x faster than recomputing it in the backward: fp32 (4096, 1001) mean, fwd + bwd on 2
# threads, 2.174 ms against 2.791 (medians 2.980 against 3.816); 1.55x in bf16 (one conversion of the
# row, not two); benchmarks/results/cpu_cpp_vs_reference.md.
FUSED_GRAD = True


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    if device is not None and device.type != "cpu":
        return False, f"the C++ kernels take CPU tensors (got {device.type}); on CUDA use 'cuda'"
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    return True, "C++ CPU kernels (csrc/cpu), at::parallel_for over rows"


def forward(
    x3: torch.Tensor, target: torch.Tensor, hp: _inputs.Hyper, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See backends.Backend (eager CPU calls had their targets checked on the host by the API)."""
    _inputs.check_targets_unless_checked(target, x3.shape[-1], hp, weight)
    return native.forward(x3, target, hp, weight)


def forward_grad_(
    x3: torch.Tensor, target: torch.Tensor, hp: _inputs.Hyper, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """See backends.Backend: one pass; x3 becomes the gradient of the summed row losses."""
    _inputs.check_targets_unless_checked(target, x3.shape[-1], hp, weight)
    return native.forward_grad_(x3, target, hp, weight)


def forward_reduced(
    x3: torch.Tensor,
    target: torch.Tensor,
    hp: _inputs.Hyper,
    mean: bool,
    with_grad: bool,
    weight: torch.Tensor | None = None,
):
    """See backends.Backend: one op (csrc/cpu), which checks the targets and weights (the API leaves
    this path's check to it), makes the divisor (count or weight sum), applies its inverse in the pass
    and reduces; nothing is pending."""
    out, inv_count, grad = torch.ops.drainage_fast.forward_reduced.default(
        x3, target, mean, with_grad, *hp, weight
    )
    return out, inv_count, grad, None


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """See backends.Backend. A CPU scalar is read for free: loss.backward() (grad_out == 1) costs
    no op at all."""
    if pending is None and grad_out.numel() == 1 and grad_out.item() == 1.0:
        return grad
    return native.scale_(grad, grad_out, pending)
