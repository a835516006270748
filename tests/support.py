"""Shared test helpers: the device, the backends to test, and tolerances derived from precision."""

from __future__ import annotations

import math
import os

import torch

from drainage_fast import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every backend that runs on DEVICE, in backends.NAMES order (CPU: triton in its interpreter, cpp,
# reference; GPU: triton, cuda, reference).
BACKENDS = [b for b in backends.NAMES if backends.availability(b, DEVICE)[0]]

# Unit roundoff 2^-p of each storage dtype: the error of one rounding to it.
UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    # fp64 inputs: Triton receives log(alpha), log(beta) as fp32 hi + lo pairs (~48 bits).
    torch.float64: 2.0**-46,
}
# Triton's interpreter converts fp32 -> bf16 by truncation (measured: relative error up to 2^-7,
# even with fp_downcast_rounding="rtne"); GPUs and torch round to nearest (2^-8). fp16 is exact RNE.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def rounding_error(dtype: torch.dtype) -> float:
    """Relative error of one rounding of a result to `dtype`."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return 2 * UNIT_ROUNDOFF[dtype]
    return UNIT_ROUNDOFF[dtype]


# Bound on the number of roundings along the longest chain of the row terms (logaddexp, log1p,
# the online sum over K terms contributes log2(K) more via the pairwise tree).
OPS = 16


def compute_roundoff(dtype: torch.dtype) -> float:
    """Every backend computes in fp32, or fp64 for fp64 input."""
    return UNIT_ROUNDOFF[torch.float64] if dtype == torch.float64 else UNIT_ROUNDOFF[torch.float32]


def exponent_scale(logits: torch.Tensor, alpha: float, beta: float) -> float:
    """Magnitude of the exponents the kernels form: an absolute error of u * E in an exponent is a
    relative error of u * E in exp() of it, and an absolute error of u * E in the loss."""
    finite = logits[torch.isfinite(logits)].double()
    m = finite.abs().max().item() if finite.numel() else 0.0
    return m + math.log(logits.shape[1]) + abs(math.log(alpha)) + abs(math.log(beta)) + 1.0


def assert_loss_close(loss, ref, logits, alpha, beta, factor=1.0):
    """|loss - ref| <= factor * OPS * u_compute * (E + |ref|), losses being fp32 (fp64 for fp64
    input); factor: how much a member's hyper-parameters scale its terms (DAC: 1 + alpha)."""
    u = compute_roundoff(logits.dtype)
    E = exponent_scale(logits, alpha, beta)
    loss, ref = loss.double(), ref.double()
    bound = factor * OPS * u * (E + ref.abs())
    _assert_within(loss, ref, bound, "loss")


def assert_grad_close(grad, ref, logits, alpha, beta, roundings=1, factor=1.0):
    """Gradient in the input dtype: `roundings` roundings to it (1, or 2 when the forward-written
    gradient is scaled again in the backward by an upstream gradient != 1) plus the compute error,
    which is relative to the largest entry of the row because g_d is a difference of two terms."""
    u_in = rounding_error(grad.dtype)
    u = compute_roundoff(logits.dtype)
    E = exponent_scale(logits, alpha, beta)
    info = torch.finfo(grad.dtype)
    grad, ref = grad.double(), ref.double()
    row_scale = ref.abs().amax(dim=1, keepdim=True) if ref.dim() > 1 else ref.abs()
    # Below the smallest normal number (fp16: 6.1e-5) a rounding errs by up to half the subnormal
    # spacing, an absolute amount.
    subnormal = 0.5 * info.tiny * info.eps
    bound = roundings * (u_in * ref.abs() + subnormal) + factor * OPS * u * E * row_scale
    _assert_within(grad, ref, bound, "gradient")


def _assert_within(value, ref, bound, what):
    assert value.shape == ref.shape, f"{what}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
    same_nan = torch.isnan(value) == torch.isnan(ref)
    assert same_nan.all(), f"{what}: nan at different places ({(~same_nan).sum().item()} entries)"
    finite = ~torch.isnan(ref)
    err = (value - ref).abs()[finite]
    excess = err - bound.expand_as(ref)[finite]
    if excess.numel() and excess.max() > 0:
        i = excess.argmax()
        raise AssertionError(
            f"{what}: {(excess > 0).sum().item()} entries exceed the derived bound; worst error "
            f"{err[i].item():.3e} vs bound {bound.expand_as(ref)[finite][i].item():.3e}"
        )


def random_targets(N, K, drainage_idx, *shape, device=DEVICE, dtype=torch.int64):
    """Class targets in [0, K) that are never the drainage output."""
    d = drainage_idx % K
    t = torch.randint(0, K - 1, (N, *shape), device=device)
    return (t + (t >= d).long()).to(dtype)


class Member:
    """One member of the abstention family as the tests run it: its fused loss and its oracle with
    the same hyper-parameters, and what those add to the error bounds."""

    def __init__(self, name, fused, reference, **params):
        self.name, self.fused, self.reference, self.params = name, fused, reference, params

    def __repr__(self):
        return self.name

    def loss(self, logits, target, **kw):
        return self.fused(logits, target, **self.params, **kw)

    def oracle(self, logits, target, **kw):
        return self.reference(logits, target, **self.params, **kw)

    def bounds(self) -> dict:
        """The keyword arguments of assert_loss_close / assert_grad_close for this member: alpha and
        beta whose logs are the constants its exponents add (log alpha, log beta; log o and
        log(1 - 1/o)), and the factor its hyper-parameters put on its terms (DAC's loss is
        q CE + alpha sp: 1 + alpha)."""
        if self.name == "drainage":
            alpha = self.params["alpha"]
            return dict(alpha=alpha, beta=1 / alpha)
        if self.name == "gamblers":
            o = self.params["reward"]
            return dict(alpha=o, beta=1 / (1 - 1 / o))
        if self.name == "dac":
            return dict(alpha=1.0, beta=1.0, factor=1 + self.params["alpha"])
        return dict(alpha=1.0, beta=1.0)


def members():
    from drainage_fast import (
        cross_entropy_loss_reference,
        dac_loss_reference,
        drainage_loss_reference,
        fused_cross_entropy_loss,
        fused_dac_loss,
        fused_drainage_loss,
        fused_gamblers_loss,
        gamblers_loss_reference,
    )

    return [
        Member("drainage", fused_drainage_loss, drainage_loss_reference, alpha=0.3),
        Member("gamblers", fused_gamblers_loss, gamblers_loss_reference, reward=2.2),
        Member("dac", fused_dac_loss, dac_loss_reference, alpha=0.7),
        Member("ce_all", fused_cross_entropy_loss, cross_entropy_loss_reference, over="all"),
        Member("ce_classes", fused_cross_entropy_loss, cross_entropy_loss_reference, over="classes"),
    ]


MEMBERS = members()
