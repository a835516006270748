"""The pure-PyTorch oracle: the drainage loss in log-sum-exp form, differentiated by autograd.

With p = softmax(z) over all K outputs, target t, drainage index d and J = {0..K-1} \\ {t, d}:

    l = log(1 + alpha * (p_d + p_J) / p_t + beta * p_J / p_d)

Only ratios of probabilities appear, so the softmax normaliser cancels:

    lse_J = logsumexp(z_J)                              (-inf when J is empty, K = 2)
    a     = log(alpha) + logaddexp(z_d, lse_J) - z_t
    b     = log(beta)  + lse_J - z_d
    l     = logaddexp(0, logaddexp(a, b))

The "reference" backend reuses loss_terms for its forward, but nothing here touches a hand-written
gradient: the tests hold every backend's gradient against autograd of this module, and this module
against the probability formula above.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._inputs import check_inputs, check_targets_torch, loss_dtype


class LossTerms(NamedTuple):
    loss: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    z_t: torch.Tensor
    z_d: torch.Tensor


def loss_terms(z: torch.Tensor, t: torch.Tensor, d: int, log_alpha: float, log_beta: float) -> LossTerms:
    """The log-sum-exp form on (..., K) logits z and (...) class indices t (none equal to d)."""
    K = z.shape[-1]
    t = t.long().unsqueeze(-1)
    z_t = z.gather(-1, t).squeeze(-1)
    z_d = z[..., d]
    if K == 2:
        # J is empty: its log-sum-exp is -inf, a constant (logsumexp over all -inf has a nan gradient).
        lse_J = torch.full_like(z_d, float("-inf"))
    else:
        outside_J = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, t, True)
        outside_J[..., d] = True
        lse_J = z.masked_fill(outside_J, float("-inf")).logsumexp(-1)
    a = log_alpha + torch.logaddexp(z_d, lse_J) - z_t
    b = log_beta + lse_J - z_d
    loss = torch.logaddexp(torch.zeros_like(a), torch.logaddexp(a, b))
    return LossTerms(loss, a, b, z_t, z_d)


def drainage_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float | None = None,
    drainage_idx: int = -1,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Drainage loss in plain PyTorch (the oracle); differentiable by autograd, float64-capable.

    Args:
        logits: (N, K) or (N, K, d1, ..., dk); K = C classes + 1 drainage output. Computed in
            float32 (float64 for float64 input).
        target: (N,) or (N, d1, ..., dk) int64/int32 class indices in [0, K), never drainage_idx;
            entries equal to ignore_index contribute 0 loss and 0 gradient.
        alpha, beta: > 0; beta defaults to 1 / alpha.
        drainage_idx: index of the drainage output in dim 1 (negative counts from the end).
        reduction: "none" -> (N, d1, ..., dk) losses; "sum"; "mean" over non-ignored targets
            (nan when every target is ignored, as F.cross_entropy).
        ignore_index: target value to skip.

    Raises:
        ValueError / IndexError: naming the bad argument (see check_inputs).
    """
    hp = check_inputs(
        logits,
        target,
        alpha=alpha,
        beta=beta,
        drainage_idx=drainage_idx,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        check_targets_torch(target, logits.shape[1], hp)  # on the device: no host sync
    z = logits.movedim(1, -1).to(loss_dtype(logits))  # (N, d1..dk, K)
    valid = target != hp.ignore_index
    # Ignored rows get a harmless stand-in class (any class but d) and are zeroed below.
    t = torch.where(valid, target, (hp.drainage_idx + 1) % z.shape[-1])
    loss = loss_terms(z, t, hp.drainage_idx, hp.log_alpha, hp.log_beta).loss
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
