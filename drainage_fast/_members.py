"""The abstention family: losses with an extra softmax column (the drainage output) that one kernel serves.

Every member depends on a row only through u = z_t, v = z_d and w = lse_J (J: every output but the
target t and the drainage output d), so one pass over the row and one elementwise gradient serve them
all (docs/design.md, "The abstention family"):

    dl/dz_t = l_u        dl/dz_d = l_v        dl/dz_j = l_w exp(z_j - w)   (j in J)

A member is its row function, written once per backend (backends/reference.py states them in plain
PyTorch), and two runtime hyper-parameters h1, h2: changing them never recompiles a kernel.

    member       loss (p = softmax over all K outputs)                 h1            h2
    DRAINAGE     log(1 + alpha (p_d + p_J) / p_t + beta p_J / p_d)     log alpha     log beta
    GAMBLERS     -log(p_t + p_d / reward)                              log reward    log(1 - 1 / reward)
    DAC          (1 - p_d) CE_C - alpha log(1 - p_d)                    alpha         0
    CE_ALL       -log p_t (cross-entropy over all K outputs)          0             0
    CE_CLASSES   -log(p_t / (1 - p_d)) = CE_C (over the C classes)    0             0
"""

from __future__ import annotations

import math
from enum import IntEnum
from numbers import Real


class Member(IntEnum):
    """The kernels' member codes (a constexpr in Triton, an int in the C++ ops)."""

    DRAINAGE = 0
    GAMBLERS = 1
    DAC = 2
    CE_ALL = 3
    CE_CLASSES = 4


# What `over=` of fused_cross_entropy_loss names.
CE_OVER = {"all": Member.CE_ALL, "classes": Member.CE_CLASSES}


def real(name: str, value, low: float, *, strict: bool) -> float:
    """value as a float, finite and > low (>= low unless strict); else a ValueError naming it."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    ok = low < value < math.inf if strict else low <= value < math.inf  # false for nan too
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def drainage_params(alpha, beta) -> tuple[float, float]:
    """(h1, h2) = (log alpha, log beta); beta defaults to 1 / alpha, as in the authors' code."""
    alpha = real("alpha", alpha, 0.0, strict=True)
    beta = 1.0 / alpha if beta is None else real("beta", beta, 0.0, strict=True)
    return math.log(alpha), math.log(beta)


def gamblers_params(reward) -> tuple[float, float]:
    """(h1, h2) = (log o, log(1 - 1 / o)) for the reward o > 1 (o = 1 makes abstaining as good as being
    right: the loss no longer needs the target)."""
    reward = real("reward", reward, 1.0, strict=True)
    return math.log(reward), math.log1p(-1.0 / reward)


def dac_params(alpha) -> tuple[float, float]:
    """(h1, h2) = (alpha, 0); alpha >= 0 (the harness ramps it from EWMA / 64 to 1 over training)."""
    return real("alpha", alpha, 0.0, strict=False), 0.0


def ce_member(over) -> Member:
    if over not in CE_OVER:
        raise ValueError(f"over must be one of {tuple(CE_OVER)}, got {over!r}")
    return CE_OVER[over]
