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
    (s = 0: J is empty or all -inf).

    Precision at any logit scale: every member is written in three differences of the inputs,
    z_t - z_d, m - z_t and m - z_d (each rounded once, relative to itself), and log s (at most log K).
    No constant is added to a number of the logits' magnitude, and no two such numbers are
    subtracted: at |z| ~ 1e4 that would put an fp32 error of ~1e-3 into every exponent.
    """
    J_empty = s == 0
    shift = torch.where(m == _NEG_INF, 0.0, m)
    log_s = torch.where(J_empty, _NEG_INF, torch.log(torch.where(J_empty, 1.0, s)))
    # Plain differences, so that an infinity meets an infinity as in the oracle (nan), but for two
    # -inf (no mass at t nor d: the row's loss is inf, as the oracle's).
    d_td = torch.where((z_t == _NEG_INF) & (z_d == _NEG_INF), 0.0, z_t - z_d)
    d_mt, d_md = shift - z_t, shift - z_d
    J_t = torch.where(J_empty, _NEG_INF, d_mt + log_s)  # lse_J - z_t
    J_d = torch.where(J_empty, _NEG_INF, d_md + log_s)  # lse_J - z_d
    m_L = -torch.logaddexp(-d_md, log_s)  # m - L, L = logaddexp(z_d, lse_J) (the mass off t)
    if member == Member.DRAINAGE:  # h1, h2 = log alpha, log beta
        loss, log_pa, log_pb = _softplus2(h1 + torch.logaddexp(-d_td, J_t), h2 + J_d)
        g_t = -torch.exp(log_pa)
        g_d = torch.exp(log_pa - torch.logaddexp(torch.zeros_like(J_d), J_d)) - torch.exp(log_pb)
        c = torch.exp(torch.logaddexp(log_pa + m_L, log_pb - log_s))
    elif member == Member.GAMBLERS:
        # l = -log(p_t + p_d / o) = log1p((p_d (1 - 1/o) + p_J) / (p_t + p_d / o)): softplus2 of
        # a = log(1 - 1/o) + z_d - A and b = lse_J - A, A = logaddexp(z_t, z_d - log o), each
        # formed against the larger term of A: A - z_t = softplus(z_d - log o - z_t) when z_t leads,
        # A - (z_d - log o) = softplus(z_t - z_d + log o) when z_d - log o does.
        t_leads = d_td + h1 >= 0
        A_t = _softplus(-d_td - h1)  # A - z_t
        A_v = _softplus(d_td + h1)  # A - (z_d - log o)
        z_d_A = torch.where(t_leads, -d_td - A_t, h1 - A_v)  # z_d - A
        lse_J_A = torch.where(t_leads, J_t - A_t, J_d + h1 - A_v)  # lse_J - A
        loss, log_pa, log_pb = _softplus2(h2 + z_d_A, lse_J_A)
        # d l / d(z_t, z_d) through A: sigma_u = e^(z_t - A), sigma_v = e^(z_d - log o - A), which add
        # to 1; pi_a + pi_b = 1 - exp(-l). dl/dz_d = pi_a - (pi_a + pi_b) sigma_v is written
        # pi_a sigma_u - pi_b sigma_v: no cancellation of two terms near pi_a when sigma_v ~ 1.
        sigma_u = torch.exp(torch.where(t_leads, -A_t, d_td + h1 - A_v))
        sigma_v = torch.exp(torch.where(t_leads, -d_td - h1 - A_t, -A_v))
        kept_mass = -torch.expm1(-loss)  # pi_a + pi_b, precise for tiny losses
        g_t = -kept_mass * sigma_u
        g_d = torch.exp(log_pa) * sigma_u - torch.exp(log_pb) * sigma_v
        c = torch.exp(log_pb - log_s)
    elif member == Member.DAC:
        # l = q CE_C + alpha sp, B = logaddexp(z_t, lse_J) (the C classes), CE_C = B - z_t =
        # softplus(lse_J - z_t), sp = -log(1 - p_d) = softplus(z_d - B), q = 1 - p_d; with
        # r = alpha - q CE_C: dl/dz_d = p_d r, dl/dz_t = -p_d r e^(z_t - B) - q e^(lse_J - B),
        # dl/dlse_J = e^(lse_J - B) (q - p_d r); e^(z_t - B) = sigmoid(z_t - lse_J).
        ce = _softplus(J_t)
        z_d_B = torch.where(J_t <= 0, -d_td - ce, -J_d - _softplus(-J_t))  # against B's larger term
        sp = _softplus(z_d_B)
        p_d, q = _sigmoid(z_d_B), torch.exp(-sp)
        r = h1 - q * ce
        loss = q * ce + h1 * sp
        g_d = p_d * r
        g_t = -p_d * r * _sigmoid(-J_t) - q * _sigmoid(J_t)
        c = torch.exp(-log_s) * _sigmoid(J_t) * (q - p_d * r)
    elif member == Member.CE_ALL:
        D = torch.logaddexp(-d_td, J_t)  # L - z_t
        loss, sigma = _softplus(D), _sigmoid(D)  # sigma = 1 - p_t
        g_t = -sigma
        g_d = sigma * torch.exp(-torch.logaddexp(torch.zeros_like(J_d), J_d))  # sigma e^(z_d - L)
        c = sigma * torch.exp(m_L)
    else:  # CE_CLASSES: softplus(lse_J - z_t)
        loss, sigma = _softplus(J_t), _sigmoid(J_t)
        g_t = -sigma
        g_d = torch.zeros_like(sigma)
        c = torch.exp(-log_s) * sigma  # e^(m - B)
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


def forward_grad_(
    x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """See backends.Backend: the row losses, and x3 overwritten with the gradient of their sum."""
    loss, stats = forward(x3, target, hp, weight)
    ones = torch.ones(1, dtype=loss.dtype, device=loss.device).expand(target.numel())
    x3.copy_(backward(x3, target, stats, ones, hp))
    return loss


def scale_(grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    factor = grad_out if pending is None else grad_out * pending
    return grad.mul_(factor.to(loss_dtype(grad)).reshape(()))
