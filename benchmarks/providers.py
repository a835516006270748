"""Benchmark providers: every way of computing the loss (and its gradient) that we compare.

A provider is a function loss(logits, target, reduction) -> Tensor; `make_step` turns it into one
timed unit of work for a mode. Baselines: the oracle in eager mode and compiled, the loss a user
writes today (naive_loss.py), F.cross_entropy on the same logits (the price users already pay for
CE), and Liger-Kernel's fused cross-entropy when it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from naive_loss import naive_drainage_loss

from drainage_fast import backends, drainage_loss_reference, fused_drainage_loss

ALPHA = 0.1  # the paper's CIFAR-100 / WebVision value; any alpha costs the same


def _fused(backend: str, fused_grad: bool = True):
    def loss(x, t, reduction):
        return fused_drainage_loss(
            x, t, alpha=ALPHA, reduction=reduction, backend=backend, _fuse_grad=fused_grad
        )

    return loss


def _reference(x, t, reduction):
    return drainage_loss_reference(x, t, alpha=ALPHA, reduction=reduction)


_COMPILED: dict[str, Callable] = {}


def _compiled_reference(x, t, reduction):
    if "ref" not in _COMPILED:
        torch._dynamo.config.cache_size_limit = 256  # one graph per shape and mode; never fall back to eager
        _COMPILED["ref"] = torch.compile(drainage_loss_reference, dynamic=False)
    return _COMPILED["ref"](x, t, alpha=ALPHA, reduction=reduction)


def _naive(x, t, reduction):
    return naive_drainage_loss(x, t, alpha=ALPHA, reduction=reduction)


def _cross_entropy(x, t, reduction):
    return F.cross_entropy(x, t, reduction=reduction)


def _liger(x, t, reduction):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy(x, t, reduction=reduction)


OURS = "drainage_fast["


def all_providers() -> dict[str, Callable]:
    """Every provider, name -> loss function, whether or not it can run here (see `unavailable`)."""
    out = {}
    for name in backends.NAMES:
        out[f"{OURS}{name}]"] = _fused(name)
        out[f"{OURS}{name},recompute]"] = _fused(name, fused_grad=False)
    out["reference-eager"] = _reference
    out["reference-compiled"] = _compiled_reference
    out["naive"] = _naive
    out["F.cross_entropy"] = _cross_entropy
    out["liger-cross_entropy"] = _liger
    return out


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device`, or None when it can. Asking about "cuda" builds the
    CUDA extension on first use (drainage_fast/_ext.py)."""
    if provider.startswith(OURS):
        backend, _, variant = provider.removeprefix(OURS).removesuffix("]").partition(",")
        ok, reason = backends.availability(backend, device)
        if not ok:
            return reason
        if backend == "triton" and device.type == "cpu":
            return "Triton runs on the CPU only in its interpreter (a test tool, not a benchmark)"
        if variant == "recompute" and not getattr(backends.load(backend), "FUSED_GRAD", False):
            return f"backend {backend!r} has one pass structure (no fused gradient to switch off)"
        return None
    if provider == "liger-cross_entropy":
        if device.type != "cuda":
            return "Liger's kernels need CUDA"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
    return None


def providers_for(device: torch.device) -> dict[str, Callable]:
    """Provider name -> loss function, for the providers that can run on `device`."""
    return {name: fn for name, fn in all_providers().items() if unavailable(name, device) is None}


def make_step(loss: Callable, mode: str) -> Callable:
    """One unit of work: the forward (no autograd graph), or forward + backward through autograd.grad
    (no accumulation into .grad, so each call does the same work)."""
    if mode == "fwd":

        def step(x, t, up):
            with torch.no_grad():
                return loss(x, t, "mean")
    elif mode == "fwd+bwd":

        def step(x, t, up):
            return torch.autograd.grad(loss(x, t, "mean"), x)
    elif mode == "fwd+bwd-none":

        def step(x, t, up):
            return torch.autograd.grad(loss(x, t, "none"), x, grad_outputs=up)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step
