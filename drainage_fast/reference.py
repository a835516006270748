"""The pure-PyTorch oracles of the abstention family, differentiated by autograd.

With p = softmax(z) over all K outputs, target t, drainage index d and J = {0..K-1} \\ {t, d}:

    Drainage       l = log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d)
    Deep Gamblers  l = -log(p_t + p_d / reward)
    DAC            l = (1 - p_d) * CE_C - alpha * log(1 - p_d),   CE_C = -log(p_t / (1 - p_d))
    CE over all    l = -log p_t
    CE over C      l = CE_C

Each is written here the plain way, from log-sum-exps of the logits, each row shifted by its max first
(they are all shift-invariant). Drainage's (the softmax normaliser cancels from its ratios):

    lse_J = logsumexp(z_J)                              (-inf when J is empty, K = 2)
    a     = log(alpha) + logaddexp(z_d, lse_J) - z_t
    b     = log(beta)  + lse_J - z_d
    l     = logaddexp(0, logaddexp(a, b))

The "reference" backend reuses loss_terms for its forward, but nothing here touches a hand-written
gradient: the tests hold every backend's gradient against autograd of this module, and this module
against the probability formulas above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._inputs import check_inputs, check_targets_torch, loss_dtype
from ._members import Member, ce_member, dac_params, drainage_params, gamblers_params


class LossTerms(NamedTuple):
    loss: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    z_t: torch.Tensor
    z_d: torch.Tensor


def lse_of_J(z: torch.Tensor, t: torch.Tensor, d: int) -> torch.Tensor:
    """logsumexp over J of (..., K) logits, t (..., 1) class indices; -inf when J is empty (K = 2: a
    constant, as logsumexp over all -inf has a nan gradient)."""
    if z.shape[-1] == 2:
        return torch.full_like(z[..., 0], float("-inf"))
    outside_J = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, t, True)
    outside_J[..., d] = True
    return z.masked_fill(outside_J, float("-inf")).logsumexp(-1)


def loss_terms(z: torch.Tensor, t: torch.Tensor, d: int, log_alpha: float, log_beta: float) -> LossTerms:
    """The Drainage log-sum-exp form on (..., K) logits z and (...) class indices t (none equal to d)."""
    t = t.long().unsqueeze(-1)
    z_t = z.gather(-1, t).squeeze(-1)
    z_d = z[..., d]
    lse_J = lse_of_J(z, t, d)
    a = log_alpha + torch.logaddexp(z_d, lse_J) - z_t
    b = log_beta + lse_J - z_d
    loss = torch.logaddexp(torch.zeros_like(a), torch.logaddexp(a, b))
    return LossTerms(loss, a, b, z_t, z_d)


def member_loss(z: torch.Tensor, t: torch.Tensor, d: int, member: int, h1: float, h2: float) -> torch.Tensor:
    """Per-row loss of any member on (..., K) logits z and (...) targets t (none equal to d)."""
    if member == Member.DRAINAGE:
        return loss_terms(z, t, d, h1, h2).loss
    t = t.long().unsqueeze(-1)
    z_t = z.gather(-1, t).squeeze(-1)
    z_d = z[..., d]
    lse_all = z.logsumexp(-1)
    if member == Member.GAMBLERS:  # h1 = log(reward)
        return lse_all - torch.logaddexp(z_t, z_d - h1)
    if member == Member.CE_ALL:
        return lse_all - z_t
    lse_C = torch.logaddexp(z_t, lse_of_J(z, t, d))  # the C class outputs
    ce_C = lse_C - z_t
    if member == Member.CE_CLASSES:
        return ce_C
    log_not_drained = lse_C - lse_all  # log(1 - p_d)
    return log_not_drained.exp() * ce_C - h1 * log_not_drained  # DAC, h1 = alpha


def family_loss_reference(
    logits, target, member, params, *, drainage_idx, reduction, ignore_index, sample_weight
) -> torch.Tensor:
    """Any member in plain PyTorch: the shared body of the public *_loss_reference functions."""
    hp = check_inputs(
        logits,
        target,
        params=params,
        member=member,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
    )
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        check_targets_torch(target, logits.shape[1], hp, sample_weight)  # on the device: no host sync
    z = logits.movedim(1, -1).to(loss_dtype(logits))  # (N, d1..dk, K)
    # Every member is invariant to adding a constant to a row: shift each row by its (constant) max,
    # so that no log-sum-exp of large magnitude is rounded (at |z| ~ 1e5 a float64 logsumexp of 1e5
    # errs by ~1e-11). A row with an infinity is left as it is.
    row_max = z.detach().amax(-1, keepdim=True)
    z = z - torch.where(torch.isfinite(row_max), row_max, 0.0)
    valid = target != hp.ignore_index
    # Ignored rows get a harmless stand-in class (any class but d) and are zeroed below.
    t = torch.where(valid, target, (hp.drainage_idx + 1) % z.shape[-1])
    loss = member_loss(z, t, hp.drainage_idx, member, hp.h1, hp.h2)
    weight = (
        valid.to(loss.dtype)
        if sample_weight is None
        else torch.where(valid, sample_weight.to(loss.dtype), 0.0)
    )
    if sample_weight is not None:
        loss = loss * weight
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weight.sum()


_COMMON_DOC = """
    Args:
        logits: (N, K) or (N, K, d1, ..., dk); K = C classes + 1 drainage output. Computed in
            float32 (float64 for float64 input).
        target: (N,) or (N, d1, ..., dk) int64/int32 class indices in [0, K), never drainage_idx;
            entries equal to ignore_index contribute 0 loss and 0 gradient.
        drainage_idx: index of the drainage output in dim 1 (negative counts from the end).
        reduction: "none" -> (N, d1, ..., dk) losses; "sum"; "mean" over the non-ignored targets,
            weighted: sum(w l) / sum(w) (nan when there is none, as F.cross_entropy).
        ignore_index: target value to skip.
        sample_weight: None, or a weight per target (shaped like it, finite, >= 0); may require grad.

    Raises:
        ValueError / IndexError: naming the bad argument (see _inputs.check_inputs).
"""


def drainage_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float | None = None,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drainage loss in plain PyTorch (the oracle); alpha, beta > 0, beta defaults to 1 / alpha."""
    return family_loss_reference(
        logits,
        target,
        Member.DRAINAGE,
        drainage_params(alpha, beta),
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
    )


def gamblers_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reward: float,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deep Gamblers loss -log(p_t + p_d / reward) in plain PyTorch (the oracle); reward > 1."""
    return family_loss_reference(
        logits,
        target,
        Member.GAMBLERS,
        gamblers_params(reward),
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
    )


def dac_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """DAC loss (1 - p_d) CE_C - alpha log(1 - p_d) in plain PyTorch (the oracle); alpha >= 0."""
    return family_loss_reference(
        logits,
        target,
        Member.DAC,
        dac_params(alpha),
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
    )


def cross_entropy_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    over: str = "all",
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy in plain PyTorch (the oracle): over="all" K outputs (F.cross_entropy), or over
    the C "classes" (the drainage output left out)."""
    return family_loss_reference(
        logits,
        target,
        ce_member(over),
        (0.0, 0.0),
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
        sample_weight=sample_weight,
    )


for _oracle in (
    drainage_loss_reference,
    gamblers_loss_reference,
    dac_loss_reference,
    cross_entropy_loss_reference,
):
    _oracle.__doc__ += _COMMON_DOC
