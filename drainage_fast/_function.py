"""The one torch.autograd.Function behind fused_drainage_loss, for every backend.

(The eager mean / sum of the cpp and cuda backends skips it: the op reduced_loss has the same
semantics in a C++ autograd node, csrc/reduced_loss.cpp, because at small batches this Python layer
cost more than the kernels.)
"""

from __future__ import annotations

import functools

import torch

from . import backends
from ._inputs import Hyper, as_rows, from_rows, kept_total, loss_dtype

HIGHER_ORDER_MESSAGE = (
    "fused_drainage_loss has a hand-written first-order backward only: it cannot be differentiated "
    "twice (create_graph=True, gradgradcheck, Hessians) nor run under torch.func transforms (grad, vmap, "
    "jacrev, ...). Use drainage_fast.drainage_loss_reference (or the member's *_loss_reference), the "
    "pure-PyTorch loss, for those."
)


class _NoSecondOrder(torch.autograd.Function):
    """Identity on the gradient, tied to the logits; differentiating through it raises."""

    @staticmethod
    def forward(ctx, grad, logits):
        return grad

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(HIGHER_ORDER_MESSAGE)


def first_order_only(backward):
    """Like torch.autograd.function.once_differentiable, with an error that says what to use instead.

    The backward runs without a graph. When create_graph=True asks for one, the gradient is routed
    through a node tied to the logits whose backward raises: only a use that really differentiates
    through the loss's gradient fails; a penalty on another term of the same graph still works.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # create_graph=False: the usual case
            return grads
        logits = ctx.saved_tensors[0]  # a saved input keeps its place in the graph
        return (_NoSecondOrder.apply(grads[0], logits), *grads[1:])

    return wrapper


class DrainageFunction(torch.autograd.Function):
    """The loss for every member of the family and every backend; the backend's kernels do the
    reduction too (see backends.Backend).

    Pass structures:
      * fused (mean / sum with a gradient, eager, backend.FUSED_GRAD): the forward writes the
        gradient of the reduced loss while the row is in registers; the backward scales it by the
        upstream scalar on the device (nothing to do when that is 1): 1 read + 1 write of the
        logits. The buffer is handed out once; a second backward through the same graph
        (retain_graph=True) recomputes the row terms and the gradient.
      * reduced without a gradient (eval): the forward alone, no row terms written.
      * recompute (reduction "none", torch.compile, or fuse_grad=False): the forward saves four
        terms per row; the backward reads the logits again and writes the gradient: 2 reads + 1
        write.
    """

    @staticmethod
    def reduces_in_backend(reduction: str, fuse_grad: bool, needs_grad: bool) -> bool:
        """Whether forward takes backend.forward_reduced (else forward + torch reductions)."""
        return reduction != "none" and not torch.compiler.is_compiling() and (fuse_grad or not needs_grad)

    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        weight,
        hp: Hyper,
        reduction: str,
        backend_name: str,
        fuse_grad: bool,
        needs_grad: bool,
    ):
        """weight: None or per-target sample weights (no gradient: the API weighs the rows in torch
        ops when they require one)."""
        backend = backends.load(backend_name)
        x3 = as_rows(logits)
        target = target.reshape(-1)
        weight = None if weight is None else weight.reshape(-1)
        ctx.hp, ctx.reduction, ctx.backend, ctx.shape = hp, reduction, backend, logits.shape
        ctx.fused_grad = ctx.pending = None
        # needs_grad comes from the caller: inside forward, grad mode is always off.
        if DrainageFunction.reduces_in_backend(reduction, fuse_grad, needs_grad):
            out, inv_count, grad3, ctx.pending = backend.forward_reduced(
                x3, target, hp, reduction == "mean", fuse_grad, weight
            )
            if grad3 is not None:
                ctx.fused_grad = from_rows(grad3, logits.shape)
            # No row terms: a second backward recomputes them (see backward).
            ctx.save_for_backward(logits, target, weight, None, inv_count)  # logits: see first_order_only
            return out
        loss, stats = backend.forward(x3, target, hp, weight)
        inv_count = None
        if reduction == "mean":
            # The backend checked the targets; under torch.compile this sum is fused by Inductor.
            divisor = kept_total(target, hp, weight, loss_dtype(x3))
            # The gradient of a mean is scaled by 1 / divisor: the same tensor in the forward's
            # result and in the backward.
            inv_count = torch.reciprocal(divisor).reshape(1)
        ctx.save_for_backward(logits, target, weight, stats, inv_count)
        if reduction == "none":
            return loss.reshape(logits.shape[:1] + logits.shape[2:])
        total = loss.sum()
        return total / divisor if reduction == "mean" else total

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):
        nones = (None,) * 7  # target, weight, hp, reduction, backend, fuse_grad, needs_grad
        if ctx.fused_grad is not None:
            grad, ctx.fused_grad = ctx.fused_grad, None
            return ctx.backend.scale_(grad, grad_out, ctx.pending), *nones
        logits, target, weight, stats, inv_count = ctx.saved_tensors
        x3 = as_rows(logits)
        if stats is None:
            _, stats = ctx.backend.forward(x3, target, ctx.hp, weight)
        if ctx.reduction == "none":
            grad_rows = grad_out.reshape(-1)
        else:
            scalar = grad_out * inv_count if ctx.reduction == "mean" else grad_out
            grad_rows = scalar.reshape(1).expand(target.numel())  # stride 0: no (R,) buffer
        grad3 = ctx.backend.backward(x3, target, stats, grad_rows, ctx.hp)
        return from_rows(grad3, ctx.shape), *nones
