"""The Python face of the csrc/ ops (torch.ops.drainage_fast.forward / backward / forward_with_grad /
forward_grad_ / scale_), shared by the "cpp" and "cuda" backends: the dispatcher picks the CPU or
CUDA kernel from the tensors' device.

Importing this module loads the extension (see _ext.py) and registers what torch.compile needs
beside the C++ kernels: a fake kernel per op (shapes and dtypes only). The kernel ops carry no
autograd formula of their own: DrainageFunction is their autograd, as for the Triton ops. (A Python
torch.library.register_autograd put a Python layer on every call, measured +120 us per call at
(512, 51) on 2 CPU threads, more than the kernel itself.) reduced_loss, the eager mean / sum, has
its autograd in C++ (csrc/reduced_loss.cpp). The C++ library names this module
(set_python_module), so torch imports it when it meets the ops without their fakes. The import never
fails: LOAD_ERROR says why the ops are absent.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._inputs import ROW_TERMS, Hyper, loss_dtype

LOAD_ERROR = _ext.load_cpu()


def _register_python_parts() -> None:
    @torch.library.register_fake("drainage_fast::forward")
    def _(x3, target, h1, h2, drainage_idx, ignore_index, member, weight):
        R = x3.shape[0] * x3.shape[1]
        return x3.new_empty(R, dtype=loss_dtype(x3)), x3.new_empty((ROW_TERMS, R), dtype=loss_dtype(x3))

    @torch.library.register_fake("drainage_fast::backward")
    def _(x3, target, stats, grad_rows, drainage_idx, ignore_index):
        return torch.empty_like(x3)

    @torch.library.register_fake("drainage_fast::forward_with_grad")
    def _(x3, target, scale, h1, h2, drainage_idx, ignore_index, member, weight):
        R = x3.shape[0] * x3.shape[1]
        loss = x3.new_empty(R, dtype=loss_dtype(x3))
        return loss, x3.new_empty((ROW_TERMS, R), dtype=loss_dtype(x3)), torch.empty_like(x3)

    @torch.library.register_fake("drainage_fast::forward_grad_")
    def _(x3, target, h1, h2, drainage_idx, ignore_index, member, weight):
        return x3.new_empty(x3.shape[0] * x3.shape[1], dtype=loss_dtype(x3))

    @torch.library.register_fake("drainage_fast::scale_")
    def _(grad, scale):
        return None

    # The mean / sum path of the backend contract.
    @torch.library.register_fake("drainage_fast::forward_reduced")
    def _(x3, target, mean, with_grad, h1, h2, drainage_idx, ignore_index, member, weight):
        out = x3.new_empty((), dtype=loss_dtype(x3))
        inv_count = x3.new_empty((1,), dtype=loss_dtype(x3)) if mean else None
        return out, inv_count, torch.empty_like(x3) if with_grad else None

    @torch.library.register_fake("drainage_fast::scale_by_")
    def _(grad, grad_out, pending):
        return None

    # The eager mean / sum of the native backends, with its own C++ autograd node (csrc/reduced_loss.cpp).
    @torch.library.register_fake("drainage_fast::reduced_loss")
    def _(logits, target, mean, h1, h2, drainage_idx, ignore_index, member, weight):
        return logits.new_empty((), dtype=loss_dtype(logits))


if LOAD_ERROR is None:
    _register_python_parts()


def forward(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets, (R,) sample weights or None -> per-row (weighted) loss
    (R,) and row terms (4, R). hp is (h1, h2, drainage_idx, ignore_index, member), as the ops take
    them."""
    return torch.ops.drainage_fast.forward.default(x3, target, *hp, weight)


def backward(x3, target, stats, grad_rows, hp: Hyper) -> torch.Tensor:
    """Gradient (N, S, K) of sum_r grad_rows[r] * loss[r]; grad_rows may have any stride, 0 too."""
    return torch.ops.drainage_fast.backward.default(
        x3, target, stats, grad_rows, hp.drainage_idx, hp.ignore_index
    )


def forward_with_grad(x3, target, hp: Hyper, scale: torch.Tensor | None, weight: torch.Tensor | None = None):
    """Forward that also writes the gradient of the summed loss times `scale` (one element of the
    loss dtype, 1 / count for a mean; None: 1) while each row is still in cache: one read and one
    write of the logits in all."""
    return torch.ops.drainage_fast.forward_with_grad.default(x3, target, scale, *hp, weight)


def forward_grad_(x3, target, hp: Hyper, weight: torch.Tensor | None = None) -> torch.Tensor:
    """backends.Backend.forward_grad_: the per-row (weighted) losses (R,), and x3 overwritten with the
    gradient of their sum, in one pass (the fused linear path's chunk buffer)."""
    return torch.ops.drainage_fast.forward_grad_.default(x3, target, *hp, weight)


def reduced_loss(
    logits: torch.Tensor, target: torch.Tensor, hp: Hyper, mean: bool, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The eager mean / sum loss of the user's (N, K, d1..dk) logits as one op with a C++ autograd
    node (csrc/reduced_loss.cpp) over forward_reduced and scale_by_: DrainageFunction's fused path
    with no Python in the step, which at (512, 51) on the CPU cost more than the kernels. The
    kernels check the targets (CPU: IndexError; CUDA: a device-side assert) and the sample weights
    (shaped like the target, no gradient). Eager only."""
    return _REDUCED_LOSS(logits, target, mean, *hp, weight)


_REDUCED_LOSS = torch.ops.drainage_fast.reduced_loss.default if LOAD_ERROR is None else None


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """grad *= grad_out * pending (None: 1) in place; skipped when that is 1, on the device."""
    factor = grad_out if pending is None else grad_out * pending
    torch.ops.drainage_fast.scale_.default(grad, factor.to(loss_dtype(grad)).reshape(1))
    return grad
