"""Fused linear + loss for large output layers: the (N, K) logits are never held, only a chunk of them.

For K in the tens or hundreds of thousands (an LLM vocabulary with an [IDK] token, ImageNet-21k) the
logits, not the model, fill the memory: 8,192 tokens x 128,257 outputs are 4.2 GB in fp32, and their
gradient as much again. Here the rows go in chunks through one reused buffer:

    logits_c = hidden_c @ weight.T (+ bias)                         (the chunk's logits, in the buffer)
    the family's fused forward-with-gradient kernel overwrites the buffer with g_c = d loss / d logits_c
    grad_hidden_c = g_c @ weight,  grad_weight += g_c.T @ hidden_c,  grad_bias += g_c.sum(0)

all in the forward (for "mean" / "sum"), so the backward only scales by the upstream gradient (not even
that when it is 1). Rows whose target is ignore_index are dropped before the matmul (finding them is
one host synchronisation on a GPU). For reduction="none" the forward computes the losses alone and the
backward runs the chunks again, each row's gradient weighted by its upstream gradient. bf16 / fp16
inputs accumulate grad_weight and grad_bias in fp32 (each chunk's product in the input dtype, as
cuBLAS gives it, then added in fp32).

Anchors: Liger's FusedLinearCrossEntropy, Apple's Cut Cross-Entropy, QuACK's chunked linear
cross-entropy (research/kernel_anchors.md); none takes an abstain column, which is every member here.
"""

from __future__ import annotations

import torch

from . import backends
from ._inputs import (
    REDUCTIONS,
    Hyper,
    check_options,
    check_sample_weight,
    check_sample_weight_values,
    loss_dtype,
)
from ._members import Member, ce_member, dac_params, drainage_params, gamblers_params

# Bytes of chunk logits by default. 64 MB is ~260 rows at K = 128,257 in bf16, the chunk Liger's rule
# (BT / ceil(V / H) rows) gives at H = 4,096: the grad_weight product's inner dimension stays >= 256,
# so the chunk GEMMs keep their speed, and the buffer is small beside the weight's own gradient.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def chunk_rows_for(rows: int, K: int, dtype: torch.dtype, chunk_rows: int | None) -> int:
    """Rows per chunk: chunk_rows, else what fits DEFAULT_CHUNK_BYTES of logits (at least 1)."""
    if chunk_rows is not None:
        return chunk_rows
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(rows, DEFAULT_CHUNK_BYTES // max(1, K * itemsize)))


def _check(hidden, weight, target, bias, sample_weight, chunk_rows, reduction, ignore_index, drainage_idx):
    """The fused linear path's own arguments (the loss's are _inputs')."""
    check_options(reduction, ignore_index)
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if hidden.dtype not in floats:
        raise ValueError(f"hidden must have a floating dtype in {floats}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden, {hidden.dtype}, got {weight.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (N, H) or (B, T, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (K, H) with H = {hidden.shape[-1]} (hidden's last dim), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have K >= 2 rows (C classes + drainage), got K={weight.shape[0]}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"target must have dtype torch.int64 or torch.int32, got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} for hidden of shape {tuple(hidden.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if bias is not None:
        if (
            not isinstance(bias, torch.Tensor)
            or bias.shape != (weight.shape[0],)
            or bias.dtype != hidden.dtype
        ):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(
                f"bias must be None or a ({weight.shape[0]},) tensor of {hidden.dtype}, got {shape}"
            )
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
    if sample_weight is not None:
        check_sample_weight(sample_weight, target)
    if chunk_rows is not None and (type(chunk_rows) is not int or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")
    K = weight.shape[0]
    if type(drainage_idx) is not int:
        raise ValueError(f"drainage_idx must be an int, got {drainage_idx!r}")
    if not -K <= drainage_idx < K:
        raise IndexError(f"drainage_idx={drainage_idx} is out of range for K={K} outputs (rows of weight)")


class _FusedLinearLoss(torch.autograd.Function):
    """hidden (N, H), weight (K, H), bias (K,) or None -> the reduced loss, or (N,) losses.

    mean / sum: every gradient is made in the forward; the backward scales them by grad_out.
    none: the forward makes the losses; the backward runs the chunks again with per-row weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, sample_weight, hp: Hyper, reduction, backend_name, chunk):
        backend = backends.load(backend_name)
        N = hidden.shape[0]
        kept = target != hp.ignore_index
        rows = kept.nonzero().squeeze(1)  # one host sync on a GPU: the kept rows' count sizes the work
        needs = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ]
        dtype = loss_dtype(hidden)
        losses = hidden.new_zeros(N, dtype=dtype)
        if sample_weight is not None:
            divisor = torch.where(kept, sample_weight.to(dtype), 0.0).sum()
        else:
            divisor = kept.sum().to(dtype)
        ctx.reduction, ctx.backend, ctx.hp, ctx.chunk, ctx.divisor = reduction, backend, hp, chunk, divisor
        grads = None
        if reduction == "none" or not any(needs):
            _run_chunks(backend, hidden, weight, bias, target, sample_weight, rows, hp, chunk, losses, None)
        else:
            grads = _new_grads(hidden, weight, bias, needs)
            _run_chunks(backend, hidden, weight, bias, target, sample_weight, rows, hp, chunk, losses, grads)
            if reduction == "mean":  # the gradients of the sum, by linearity scaled once here
                inv = torch.reciprocal(divisor)
                for g in grads:
                    if g is not None:
                        g.mul_(inv.to(g.dtype))
        ctx.grads = grads
        ctx.save_for_backward(hidden, weight, bias, target, sample_weight, rows)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / divisor if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, target, sample_weight, rows = ctx.saved_tensors
        if ctx.reduction == "none":
            needs = [
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2],
            ]
            grads = _new_grads(hidden, weight, bias, needs)
            row_weight = grad_out.to(loss_dtype(hidden))
            if sample_weight is not None:
                row_weight = row_weight * sample_weight.to(row_weight.dtype)
            losses = hidden.new_empty(hidden.shape[0], dtype=loss_dtype(hidden))
            _run_chunks(
                ctx.backend, hidden, weight, bias, target, row_weight, rows, ctx.hp, ctx.chunk, losses, grads
            )
        else:
            grads, ctx.grads = ctx.grads, None
            factor = grad_out
            if grads is None:  # handed out to a first backward already (retain_graph): run them again
                needs = [
                    ctx.needs_input_grad[0],
                    ctx.needs_input_grad[1],
                    bias is not None and ctx.needs_input_grad[2],
                ]
                grads = _new_grads(hidden, weight, bias, needs)
                losses = hidden.new_empty(hidden.shape[0], dtype=loss_dtype(hidden))
                _run_chunks(
                    ctx.backend,
                    hidden,
                    weight,
                    bias,
                    target,
                    sample_weight,
                    rows,
                    ctx.hp,
                    ctx.chunk,
                    losses,
                    grads,
                )
                factor = grad_out / ctx.divisor if ctx.reduction == "mean" else grad_out
            for g in grads:
                if g is not None:
                    g.mul_(factor.to(g.dtype))
        grad_hidden, grad_weight, grad_bias = grads
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *(None,) * 6,
        )


def _new_grads(hidden, weight, bias, needs):
    """Zeroed gradients: hidden's in its dtype (each row written once), weight's and bias's in fp32
    (accumulated over the chunks)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return [
        torch.zeros_like(hidden) if needs[0] else None,
        torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None,
        torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs[2] else None,
    ]


def _run_chunks(backend, hidden, weight, bias, target, sample_weight, rows, hp, chunk, losses, grads):
    """Each chunk of the kept rows: logits into one buffer, the loss rows into `losses`; with grads,
    the kernel overwrites the buffer with the gradient of the chunk's summed (weighted) loss, which
    goes into the gradients of hidden, weight and bias."""
    K = weight.shape[0]
    buffer = hidden.new_empty(min(chunk, rows.numel()), K) if rows.numel() else None
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        n = index.numel()
        h = hidden.index_select(0, index)
        logits = buffer[:n]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        t = target.index_select(0, index)
        w = None if sample_weight is None else sample_weight.index_select(0, index)
        x3 = logits.unsqueeze(1)
        if grads is None:
            row_loss, _ = backend.forward(x3, t, hp, w)
        else:
            row_loss = backend.forward_grad_(x3, t, hp, w)  # the logits now hold their gradient
            grad_hidden, grad_weight, grad_bias = grads
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, torch.mm(logits, weight))
            if grad_weight is not None:
                grad_weight.add_(torch.mm(logits.t(), h))
            if grad_bias is not None:
                grad_bias.add_(logits.sum(0, dtype=grad_bias.dtype))
        losses.index_copy_(0, index, row_loss.to(losses.dtype))


def fused_linear_loss(
    member: int,
    params: tuple[float, float],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Any member of the family on hidden @ weight.T (+ bias), without the logits: the body of the
    public fused_linear_* losses."""
    _check(hidden, weight, target, bias, sample_weight, chunk_rows, reduction, ignore_index, drainage_idx)
    K = weight.shape[0]
    out_shape = hidden.shape[:-1]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    target1 = target.reshape(-1)
    weight1 = None if sample_weight is None else sample_weight.reshape(-1)
    if sample_weight is not None and sample_weight.requires_grad:
        raise ValueError(
            "sample_weight requires grad: the fused linear losses take constant weights; weigh "
            "reduction='none' losses in torch for a weight's gradient"
        )
    hp = Hyper(float(params[0]), float(params[1]), drainage_idx % K, int(ignore_index), int(member))
    if target1.device.type == "cpu":
        from ._inputs import check_target_values

        check_target_values(target1, K, hp.drainage_idx, hp.ignore_index)
        check_sample_weight_values(weight1)
    impl = backends.load(backends.resolve_name(backend, hidden.device.type))
    chunk = chunk_rows_for(hidden2.shape[0], K, hidden.dtype, chunk_rows)
    if torch.compiler.is_compiling():  # the chunk loop has data-dependent trips: an opaque op
        out = torch.ops.drainage_fast.fused_linear_loss(
            hidden2, weight, bias, target1, weight1, *hp, reduction, impl.NAME, chunk
        )[0]
    else:
        out = _FusedLinearLoss.apply(hidden2, weight, bias, target1, weight1, hp, reduction, impl.NAME, chunk)
    return out.reshape(out_shape) if reduction == "none" else out


# Under torch.compile the same work runs behind custom ops (Dynamo cannot trace the chunk loop): the
# forward returns the loss and, for mean / sum, the gradients (of hidden, weight, bias: empty when not
# wanted); the backward scales them, or for reduction "none" runs the chunks again.
@torch.library.custom_op("drainage_fast::fused_linear_loss", mutates_args=())
def _linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    sample_weight: torch.Tensor | None,
    h1: float,
    h2: float,
    drainage_idx: int,
    ignore_index: int,
    member: int,
    reduction: str,
    backend: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hp = Hyper(h1, h2, drainage_idx, ignore_index, member)
    args = (hidden, weight, bias, target, sample_weight, hp, reduction, backend, chunk)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        out = _FusedLinearLoss.apply(*leaves, *args[3:])
    if reduction == "none":
        return out.detach(), *_empty_grads(hidden, weight, bias)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None])
    grads = list(grads) + [None] * (3 - len(grads))
    return out.detach(), *(
        g if g is not None else e for g, e in zip(grads, _empty_grads(hidden, weight, bias))
    )


def _empty_grads(hidden, weight, bias):
    return hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)


@_linear_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    sample_weight,
    h1,
    h2,
    drainage_idx,
    ignore_index,
    member,
    reduction,
    backend,
    chunk,
):
    out = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=loss_dtype(hidden))
    if reduction == "none":
        return out, *_empty_grads(hidden, weight, bias)
    grad_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return out, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


@torch.library.custom_op("drainage_fast::fused_linear_loss_backward", mutates_args=())
def _linear_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    sample_weight: torch.Tensor | None,
    grad_out: torch.Tensor,
    h1: float,
    h2: float,
    drainage_idx: int,
    ignore_index: int,
    member: int,
    backend: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction "none": the chunks again, each row weighted by grad_out (and its sample weight)."""
    hp = Hyper(h1, h2, drainage_idx, ignore_index, member)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
        out = _FusedLinearLoss.apply(*leaves, target, sample_weight, hp, "none", backend, chunk)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    grads = list(grads) + [None] * (3 - len(grads))
    return tuple(g if g is not None else e for g, e in zip(grads, _empty_grads(hidden, weight, bias)))


@_linear_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    sample_weight,
    grad_out,
    h1,
    h2,
    drainage_idx,
    ignore_index,
    member,
    backend,
    chunk,
):
    grad_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, sample_weight, *rest = inputs
    ctx.rest, ctx.has_bias = rest, bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, sample_weight, *output[1:])


def _linear_backward(ctx, grad_out, *_):
    hidden, weight, bias, target, sample_weight, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    h1, h2, drainage_idx, ignore_index, member, reduction, backend, chunk = ctx.rest
    if reduction == "none":
        grad_hidden, grad_weight, grad_bias = _linear_backward_op(
            hidden, weight, bias, target, sample_weight, grad_out, h1, h2, drainage_idx, ignore_index, member,
            backend, chunk,
        )  # fmt: skip
    else:
        grad_hidden, grad_weight, grad_bias = (g * grad_out for g in (grad_hidden, grad_weight, grad_bias))
    return grad_hidden, grad_weight, grad_bias if ctx.has_bias else None, *(None,) * 10


_linear_op.register_autograd(_linear_backward, setup_context=_setup_context)


_LINEAR_DOC = """
    Args:
        hidden: (N, H) or (B, T, H) features (a causal LM's last hidden states, say); float16 /
            bfloat16 / float32 / float64.
        weight: (K, H) output layer of hidden's dtype; K = C classes + 1 drainage (abstain) output,
            which may be any row (an [IDK] token's id): drainage_idx.
        target: (N,) or (B, T) class indices in [0, K), never drainage_idx; ignore_index skips a row
            (dropped before the matmul).
        bias: None or (K,).
        reduction, ignore_index, sample_weight: as the logits losses (sample weights constant here).
        chunk_rows: rows per chunk (default: what fits 64 MB of chunk logits).
        backend: as the logits losses.

    Returns the reduced loss, or the (N,) / (B, T) losses for reduction="none". Gradients flow to
    hidden, weight and bias (grad_weight / grad_bias accumulated in fp32 for 16-bit inputs).

    Raises:
        ValueError: a bad shape, dtype, device or argument, naming it and the value.
        IndexError: drainage_idx out of range, or a bad target (on a GPU a device-side assert).
"""


def fused_linear_drainage_loss(
    hidden,
    weight,
    target,
    *,
    bias=None,
    alpha=1.0,
    beta=None,
    drainage_idx=-1,
    reduction="mean",
    ignore_index=-100,
    sample_weight=None,
    chunk_rows=None,
    backend="auto",
) -> torch.Tensor:
    """The Drainage loss of hidden @ weight.T + bias, without the (N, K) logits (module docstring)."""
    return fused_linear_loss(
        Member.DRAINAGE, drainage_params(alpha, beta), hidden, weight, target, bias=bias,
        drainage_idx=drainage_idx, reduction=reduction, ignore_index=ignore_index,
        sample_weight=sample_weight, chunk_rows=chunk_rows, backend=backend,
    )  # fmt: skip


def fused_linear_gamblers_loss(
    hidden,
    weight,
    target,
    *,
    reward,
    bias=None,
    drainage_idx=-1,
    reduction="mean",
    ignore_index=-100,
    sample_weight=None,
    chunk_rows=None,
    backend="auto",
) -> torch.Tensor:
    """The Deep Gamblers loss of hidden @ weight.T + bias, without the logits."""
    return fused_linear_loss(
        Member.GAMBLERS, gamblers_params(reward), hidden, weight, target, bias=bias,
        drainage_idx=drainage_idx, reduction=reduction, ignore_index=ignore_index,
        sample_weight=sample_weight, chunk_rows=chunk_rows, backend=backend,
    )  # fmt: skip


def fused_linear_dac_loss(
    hidden,
    weight,
    target,
    *,
    alpha,
    bias=None,
    drainage_idx=-1,
    reduction="mean",
    ignore_index=-100,
    sample_weight=None,
    chunk_rows=None,
    backend="auto",
) -> torch.Tensor:
    """The DAC loss of hidden @ weight.T + bias, without the logits."""
    return fused_linear_loss(
        Member.DAC, dac_params(alpha), hidden, weight, target, bias=bias,
        drainage_idx=drainage_idx, reduction=reduction, ignore_index=ignore_index,
        sample_weight=sample_weight, chunk_rows=chunk_rows, backend=backend,
    )  # fmt: skip


def fused_linear_cross_entropy_loss(
    hidden,
    weight,
    target,
    *,
    over="all",
    bias=None,
    drainage_idx=-1,
    reduction="mean",
    ignore_index=-100,
    sample_weight=None,
    chunk_rows=None,
    backend="auto",
) -> torch.Tensor:
    """Cross-entropy over all K outputs (or the C "classes") of hidden @ weight.T + bias, without the
    logits: a warm-up, or the plain language-model loss, through the same path."""
    return fused_linear_loss(
        ce_member(over), (0.0, 0.0), hidden, weight, target, bias=bias,
        drainage_idx=drainage_idx, reduction=reduction, ignore_index=ignore_index,
        sample_weight=sample_weight, chunk_rows=chunk_rows, backend=backend,
    )  # fmt: skip


for _loss in (
    fused_linear_drainage_loss,
    fused_linear_gamblers_loss,
    fused_linear_dac_loss,
    fused_linear_cross_entropy_loss,
):
    _loss.__doc__ += _LINEAR_DOC


class FusedLinearLoss(torch.nn.Module):
    """Module form: FusedLinearLoss("drainage", alpha=0.1)(hidden, lm_head.weight, target, bias=None).

    `loss` names the member ("drainage", "gamblers", "dac", "cross_entropy"), the keywords its
    hyper-parameters and the shared options (drainage_idx, reduction, ignore_index, chunk_rows,
    backend), checked when the module is built."""

    _LOSSES = {
        "drainage": fused_linear_drainage_loss,
        "gamblers": fused_linear_gamblers_loss,
        "dac": fused_linear_dac_loss,
        "cross_entropy": fused_linear_cross_entropy_loss,
    }
    _PARAMS = {
        "drainage": drainage_params,
        "gamblers": gamblers_params,
        "dac": dac_params,
        "cross_entropy": ce_member,
    }

    def __init__(self, loss: str = "drainage", **kwargs):
        super().__init__()
        if loss not in self._LOSSES:
            raise ValueError(f"loss must be one of {tuple(self._LOSSES)}, got {loss!r}")
        shared = {"drainage_idx", "reduction", "ignore_index", "chunk_rows", "backend"}
        params = {k: v for k, v in kwargs.items() if k not in shared}
        if loss == "drainage":
            drainage_params(params.get("alpha", 1.0), params.get("beta"))
        elif loss == "cross_entropy":
            ce_member(params.get("over", "all"))
        else:
            self._PARAMS[loss](**params)
        if kwargs.get("reduction", "mean") not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {kwargs['reduction']!r}")
        self.loss, self.kwargs = loss, kwargs

    def forward(self, hidden, weight, target, bias=None, sample_weight=None):
        return self._LOSSES[self.loss](
            hidden, weight, target, bias=bias, sample_weight=sample_weight, **self.kwargs
        )

    def extra_repr(self) -> str:
        return f"{self.loss!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


__all__ = [
    "FusedLinearLoss",
    "fused_linear_cross_entropy_loss",
    "fused_linear_dac_loss",
    "fused_linear_drainage_loss",
    "fused_linear_gamblers_loss",
]
