"""The one torch.autograd.Function behind fused_drainage_loss, for every backend."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backends
from ._inputs import Hyper, as_rows, check_targets_torch, from_rows


class DrainageFunction(torch.autograd.Function):
    """Per-row losses from the backend, reduced here in PyTorch (the kernels never reduce).

    Two pass structures:
      * recompute (any reduction): the forward saves three fp32 terms per row; the backward reads
        the logits again and writes the gradient: 2 reads + 1 write of the logits.
      * fused (mean / sum, eager, backend.FUSED_GRAD): the forward writes the gradient of the
        reduced loss while the row is in registers; the backward scales it by the upstream scalar
        on the device (nothing to do when that is 1): 1 read + 1 write. The buffer is handed out
        once; a second backward through the same graph (retain_graph=True) recomputes.
    """

    @staticmethod
    def forward(ctx, logits, target, hp: Hyper, reduction: str, backend_name: str, fuse_grad: bool):
        backend = backends.load(backend_name)
        x3 = as_rows(logits).view
        target = target.reshape(-1)
        K = x3.shape[-1]
        if logits.device.type == "cpu" and not torch.compiler.is_compiling():
            # Targets were checked on the host at the API boundary.
            count = (target != hp.ignore_index).sum() if reduction == "mean" else None
        else:
            check = getattr(backend, "check_targets", check_targets_torch)
            count = check(target, K, hp)
            count = count if reduction == "mean" else None
        if fuse_grad:
            loss, stats, grad3 = backend.forward_with_grad(x3, target, hp, count)
            ctx.fused_grad = from_rows(grad3, logits.shape)
        else:
            loss, stats = backend.forward(x3, target, hp)
            ctx.fused_grad = None
        ctx.save_for_backward(x3, target, stats, count)
        ctx.hp, ctx.reduction, ctx.backend, ctx.shape = hp, reduction, backend, logits.shape
        if reduction == "none":
            return loss.reshape(logits.shape[:1] + logits.shape[2:])
        total = loss.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.fused_grad is not None:
            grad, ctx.fused_grad = ctx.fused_grad, None
            return ctx.backend.scale_(grad, grad_out), None, None, None, None, None
        x3, target, stats, count = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_rows = grad_out.reshape(-1)
        else:
            scalar = grad_out / count if ctx.reduction == "mean" else grad_out
            grad_rows = scalar.reshape(1).expand(target.numel())  # stride 0: no (R,) buffer
        grad3 = ctx.backend.backward(x3, target, stats, grad_rows, ctx.hp)
        return from_rows(grad3, ctx.shape), None, None, None, None, None
