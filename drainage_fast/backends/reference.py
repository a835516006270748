"""Backend "reference": the two backend functions in plain PyTorch, with the closed-form gradient.

Same contract and the same formulas as the Triton kernels (backends/triton_kernels.py); runs on any
device and in float64, so it doubles as an executable statement of each member's row function: from
z_t, z_d and J's max m and sum s (lse_J = m + log s), the loss and four row terms (shift, c, g_t, g_d):

    dl/dz_t = g_t,   dl/dz_d = g_d,   dl/dz_j = exp(z_j - shift) * c   (j in J; c = (dl/d lse_J) / s)

Every exponent below is a difference of nearby values (never a sum of two large ones) and every
factor is at most 1, so the terms keep their precision at any logit scale.

The oracle (drainage_fast.reference, differentiated by autograd) stays independent of this module:
the tests hold both this backend and the kernels against it.
"""

from __future__ import annotations

import torch

from .._inputs import Hyper, check_targets_unless_checked, kept_total, loss_dtype
from .._members import Member

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


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), exact for large x and of full relative precision for very negative x."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-x.abs()))


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0 / (1.0 + torch.exp(-x)), torch.exp(x) / (1.0 + torch.exp(x)))


def _softplus2(a: torch.Tensor, b: torch.Tensor):
    """(l, log pi_a, log pi_b) of l = logsumexp(0, a, b), (pi_a, pi_b) = exp((a, b) - l).

    l = mx + log1p(the two smaller terms): exact for the largest term, and a confident row (mx = 0)
    keeps the full relative precision of its tiny loss. a = b = +inf leaves the split undefined: nan.
    """
    mx = torch.maximum(torch.maximum(a, b), torch.zeros_like(a))  # propagates nan, as the kernels
    da, db = _sub(a, mx), _sub(b, mx)
    ea, eb, e0 = torch.exp(da), torch.exp(db), torch.exp(-mx)
    log_z = torch.log1p(torch.where(a == mx, e0 + eb, torch.where(b == mx, e0 + ea, ea + eb)))
    undefined = (a == float("inf")) & (b == float("inf"))
    log_pa = torch.where(undefined, float("nan"), da - log_z)
    log_pb = torch.where(undefined, float("nan"), db - log_z)
    return mx + log_z, log_pa, log_pb


def row_terms(member: int, z_t, z_d, m, s, h1: float, h2: float):
    """(loss, shift, c, g_t, g_d) of rows of the given member with z_t, z_d and J's max m and sum s
    (s = 0: J is empty or all -inf)."""
    J_empty = s == 0
    shift = torch.where(m == _NEG_INF, 0.0, m)
    log_s = torch.log(torch.where(J_empty, 1.0, s))
    lse_J = torch.where(J_empty, _NEG_INF, shift + log_s)
    if member == Member.DRAINAGE:  # h1, h2 = log alpha, log beta
        L = torch.logaddexp(z_d, lse_J)
        loss, log_pa, log_pb = _softplus2(h1 + L - z_t, h2 + lse_J - z_d)
        g_t = -torch.exp(log_pa)
        g_d = torch.exp(log_pa + _sub(z_d, L)) - torch.exp(log_pb)
        c = torch.exp(torch.logaddexp(log_pa + _sub(m, L), log_pb - log_s))
    elif member == Member.GAMBLERS:
        # l = -log(p_t + p_d / o) = log1p((p_d (1 - 1/o) + p_J) / (p_t + p_d / o)): softplus2 of
        # a = log(1 - 1/o) + z_d - A and b = lse_J - A, A = logaddexp(z_t, z_d - log o).
        A = torch.logaddexp(z_t, z_d - h1)
        loss, log_pa, log_pb = _softplus2(h2 + _sub(z_d, A), _sub(lse_J, A))
        kept_mass = -torch.expm1(-loss)  # pi_a + pi_b = 1 - exp(-l), precise for tiny losses
        g_t = -kept_mass * _exp_sub(z_t, A)
        g_d = torch.exp(log_pa) - kept_mass * torch.exp(_sub(z_d - h1, A))
        c = torch.exp(log_pb - log_s)
    elif member == Member.DAC:
        # l = q CE_C + alpha sp, B = logaddexp(z_t, lse_J) (the C classes), CE_C = B - z_t,
        # sp = -log(1 - p_d) = softplus(z_d - B), q = 1 - p_d; with r = alpha - q CE_C:
        # dl/dz_d = p_d r, dl/dz_t = -p_d r e^(z_t - B) - q e^(lse_J - B),
        # dl/dlse_J = e^(lse_J - B) (q - p_d r).
        B = torch.logaddexp(z_t, lse_J)
        ce = _softplus(_sub(lse_J, z_t))
        sp = _softplus(_sub(z_d, B))
        p_d, q = _sigmoid(_sub(z_d, B)), torch.exp(-sp)
        r = h1 - q * ce
        loss = q * ce + h1 * sp
        g_d = p_d * r
        g_t = -p_d * r * _exp_sub(z_t, B) - q * torch.exp(_sub(lse_J, B))
        c = torch.exp(_sub(m, B)) * (q - p_d * r)
    elif member == Member.CE_ALL:
        L = torch.logaddexp(z_d, lse_J)
        D = _sub(L, z_t)
        loss, sigma = _softplus(D), _sigmoid(D)  # sigma = 1 - p_t
        g_t = -sigma
        g_d = sigma * torch.exp(_sub(z_d, L))
        c = sigma * torch.exp(_sub(m, L))
    else:  # CE_CLASSES
        D = _sub(lse_J, z_t)
        loss, sigma = _softplus(D), _sigmoid(D)
        g_t = -sigma
        g_d = torch.zeros_like(sigma)
        c = torch.exp(_sub(m, torch.logaddexp(z_t, lse_J)))
    return loss, shift, torch.where(J_empty, 0.0, c), g_t, g_d


def forward(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets, (R,) sample weights or None -> per-row weighted loss (R,)
    and row terms (4, R) of the weighted loss."""
    N, S, K = x3.shape
    check_targets_unless_checked(target, K, hp, weight)
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
    loss, shift, *scaled = row_terms(hp.member, z_t, z[..., d], m, s, hp.h1, hp.h2)
    if weight is not None:  # the weighted loss w_r l_r: its terms scale by w_r
        w = weight.reshape(N, S).to(loss.dtype)
        loss = loss * w
        scaled = [term * w for term in scaled]

    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(bad, nan, torch.where(ignored, torch.zeros_like(loss), loss))
    stats = torch.stack([shift, *scaled])
    stats[1:] = torch.where(bad, nan, stats[1:])
    return loss.reshape(-1), stats.reshape(len(stats), -1)


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


def forward_reduced(
    x3: torch.Tensor,
    target: torch.Tensor,
    hp: Hyper,
    mean: bool,
    with_grad: bool,
    weight: torch.Tensor | None = None,
):
    """See backends.Backend: forward, then torch reductions; with_grad runs the backward at once."""
    loss, stats = forward(x3, target, hp, weight)
    total = loss.sum()
    divisor = kept_total(target, hp, weight, loss.dtype)
    inv_count = torch.reciprocal(divisor).reshape(1) if mean else None
    grad = None
    if with_grad:
        scalar = inv_count if mean else torch.ones(1, dtype=loss.dtype, device=loss.device)
        grad = backward(x3, target, stats, scalar.expand(target.numel()), hp)
    return (total / divisor if mean else total), inv_count, grad, None


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    factor = grad_out if pending is None else grad_out * pending
    return grad.mul_(factor.to(loss_dtype(grad)).reshape(()))
