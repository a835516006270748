"""Backend "reference": the two backend functions in plain PyTorch, with the closed-form gradient.

Same contract and the same formulas as the Triton kernels (backends/triton_kernels.py explains
them); runs on any device and in float64, so it doubles as an executable statement of the backward:

    dl/dz_t = -pi_a,   dl/dz_d = pi_a exp(z_d - L) - pi_b,   dl/dz_j = exp(z_j - shift) * c  (j in J)

The oracle (drainage_fast.reference, differentiated by autograd) stays independent of this module:
the tests hold both this backend and the kernels against it.
"""

from __future__ import annotations

import torch

from .._inputs import Hyper, check_targets_unless_checked, loss_dtype

NAME = "reference"
FUSED_GRAD = False  # no gradient-in-forward path: backward recomputes from the saved row terms

_NEG_INF = float("-inf")


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    return True, "pure PyTorch, every device"


def _sub(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x - y, and 0 where x == y (also for two equal infinities, where x - y is nan)."""
    return torch.where(x == y, 0.0, x - y)


def _exp_sub(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(x == y, 1.0, torch.exp(x - y))


def row_terms(z_t, z_d, m, s, log_alpha: float, log_beta: float):
    """(loss, shift, c, g_t, g_d) of rows with the given z_t, z_d and J's max m and sum s."""
    J_empty = s == 0
    shift = torch.where(m == _NEG_INF, 0.0, m)
    log_s = torch.log(torch.where(J_empty, 1.0, s))
    lse_J = torch.where(J_empty, _NEG_INF, shift + log_s)
    L = torch.logaddexp(z_d, lse_J)
    a = log_alpha + L - z_t
    b = log_beta + lse_J - z_d
    mx = torch.maximum(torch.maximum(a, b), torch.zeros_like(a))  # propagates nan, as the kernels
    da, db = _sub(a, mx), _sub(b, mx)
    ea, eb, e0 = torch.exp(da), torch.exp(db), torch.exp(-mx)
    log_z = torch.log1p(torch.where(a == mx, e0 + eb, torch.where(b == mx, e0 + ea, ea + eb)))
    loss = mx + log_z
    undefined = (a == float("inf")) & (b == float("inf"))
    log_pa = torch.where(undefined, float("nan"), da - log_z)
    log_pb = torch.where(undefined, float("nan"), db - log_z)
    g_t = -torch.exp(log_pa)
    g_d = torch.exp(log_pa + _sub(z_d, L)) - torch.exp(log_pb)
    c = torch.exp(torch.logaddexp(log_pa + _sub(m, L), log_pb - log_s))
    return loss, shift, torch.where(J_empty, 0.0, c), g_t, g_d


def forward(x3: torch.Tensor, target: torch.Tensor, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets -> per-row loss (R,) and row terms (4, R)."""
    N, S, K = x3.shape
    check_targets_unless_checked(target, K, hp)
    d = hp.drainage_idx
    z = x3.to(loss_dtype(x3))
    t = target.reshape(N, S)
    ignored = t == hp.ignore_index
    bad = ~ignored & ((t < 0) | (t >= K) | (t == d))
    t_safe = torch.where(ignored | bad, (d + 1) % K, t).long()
    outside_J = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, t_safe.unsqueeze(-1), True)
    outside_J[..., d] = True
    z_J = z.masked_fill(outside_J, _NEG_INF)
    m = z_J.amax(-1)
    s = _exp_sub(z_J, torch.where(m == _NEG_INF, 0.0, m).unsqueeze(-1)).sum(-1)
    z_t = z.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
    loss, *terms = row_terms(z_t, z[..., d], m, s, hp.log_alpha, hp.log_beta)

    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(bad, nan, torch.where(ignored, torch.zeros_like(loss), loss))
    stats = torch.stack(terms)
    stats[1:] = torch.where(bad, nan, stats[1:])
    return loss.reshape(-1), stats.reshape(len(terms), -1)


def backward(
    x3: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, grad_rows: torch.Tensor, hp: Hyper
) -> torch.Tensor:
    """Gradient of sum_r grad_rows[r] * loss[r] with respect to the (N, S, K) view, in x3's dtype."""
    N, S, _ = x3.shape
    z = x3.to(stats.dtype)
    t = target.reshape(N, S)
    shift, c, g_t, g_d = (term.reshape(N, S, 1) for term in stats)
    grad = _exp_sub(z, shift) * c
    grad[..., hp.drainage_idx] = g_d[..., 0]
    kept = t != hp.ignore_index
    # Kept rows have 0 <= t < K (checked at the API); ignored rows are zeroed below.
    grad.scatter_(-1, torch.where(kept, t, 0).long().unsqueeze(-1), g_t)
    grad = grad * grad_rows.reshape(N, S, 1).to(stats.dtype)
    return torch.where(kept.unsqueeze(-1), grad, 0.0).to(x3.dtype)


def forward_reduced(x3: torch.Tensor, target: torch.Tensor, hp: Hyper, mean: bool, with_grad: bool):
    """See backends.Backend: forward, then torch reductions; with_grad runs the backward at once."""
    loss, stats = forward(x3, target, hp)
    count = (target != hp.ignore_index).sum()
    total = loss.sum()
    inv_count = torch.reciprocal(count.to(loss.dtype)).reshape(1) if mean else None
    grad = None
    if with_grad:
        scalar = inv_count if mean else torch.ones(1, dtype=loss.dtype, device=loss.device)
        grad = backward(x3, target, stats, scalar.expand(target.numel()), hp)
    return (total / count if mean else total), inv_count, grad, None


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    factor = grad_out if pending is None else grad_out * pending
    return grad.mul_(factor.to(loss_dtype(grad)).reshape(()))
