"""Backend "reference": the two backend functions in plain PyTorch, with the closed-form gradient.

Same contract as the Triton kernels (see backends/__init__.py); runs on any device and in float64,
so it doubles as an executable statement of the backward formula:

    u = log(alpha) - z_t - l,   v = log(beta) - z_d - l,   w = logaddexp(u, v)
    dl/dz_j = exp(z_j + w)                          for j in J   (both exponents <= 0 apart, <= log 2)
    dl/dz_t = -exp(a - l)
    dl/dz_d = exp(z_d + u) - exp(b - l)
"""

from __future__ import annotations

import torch

from .._inputs import Hyper, loss_dtype
from ..reference import loss_terms

NAME = "reference"
FUSED_GRAD = False  # no gradient-in-forward path: backward recomputes from the saved row terms


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    return True, "pure PyTorch, every device"


def forward(x3: torch.Tensor, target: torch.Tensor, hp: Hyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, K) logits view, (R,) targets -> per-row loss (R,) and row terms (3, R) = [w, g_t, g_d]."""
    N, S, K = x3.shape
    d = hp.drainage_idx
    z = x3.to(loss_dtype(x3))
    t = target.reshape(N, S)
    ignored = t == hp.ignore_index
    bad = ~ignored & ((t < 0) | (t >= K) | (t == d))
    t_safe = torch.where(ignored | bad, (d + 1) % K, t)
    loss, a, b, z_t, z_d = loss_terms(z, t_safe, d, hp.log_alpha, hp.log_beta)
    u = hp.log_alpha - z_t - loss
    v = hp.log_beta - z_d - loss
    stats = torch.stack([torch.logaddexp(u, v), -torch.exp(a - loss), torch.exp(z_d + u) - torch.exp(b - loss)])

    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(bad, nan, torch.where(ignored, torch.zeros_like(loss), loss))
    stats = torch.where(bad, nan, stats)
    return loss.reshape(-1), stats.reshape(3, -1)


def backward(
    x3: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, grad_rows: torch.Tensor, hp: Hyper
) -> torch.Tensor:
    """Gradient of sum_r grad_rows[r] * loss[r] with respect to the (N, S, K) view, in x3's dtype."""
    N, S, K = x3.shape
    z = x3.to(stats.dtype)
    t = target.reshape(N, S)
    w, g_t, g_d = (s.reshape(N, S, 1) for s in stats)
    grad = torch.exp(z + w)
    grad[..., hp.drainage_idx] = g_d[..., 0]
    valid = t != hp.ignore_index
    # Valid rows have 0 <= t < K (checked at the API); ignored rows are zeroed below.
    grad.scatter_(-1, torch.where(valid, t, 0).long().unsqueeze(-1), g_t)
    grad = grad * grad_rows.reshape(N, S, 1).to(stats.dtype)
    return torch.where(valid.unsqueeze(-1), grad, 0.0).to(x3.dtype)
