"""Validation of the public arguments and the row layout every backend works on.

Validation happens once, here, at the API boundary; kernels assume valid input. Every error names
the argument and the offending value.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import NamedTuple

import torch

REDUCTIONS = ("none", "sum", "mean")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class Hyper(NamedTuple):
    """Resolved hyper-parameters, as the kernels take them (_members.py says what h1, h2 are for each
    member: log alpha and log beta for Drainage)."""

    h1: float
    h2: float
    drainage_idx: int  # normalised to [0, K)
    ignore_index: int
    member: int = 0  # _members.Member


def _is_int(value) -> bool:
    # type() first: isinstance against the numbers ABCs costs about a microsecond a call.
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, Integral))


def check_options(reduction: str, ignore_index) -> None:
    """The tensor-independent arguments every member shares."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not _is_int(ignore_index):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def check_inputs(
    logits,
    target,
    *,
    params: tuple[float, float],
    member: int = 0,
    drainage_idx,
    reduction,
    ignore_index,
    sample_weight=None,
    check_targets: bool = True,
) -> Hyper:
    """Validates every argument of a loss of the family; returns the resolved hyper-parameters.
    `params` are the member's (h1, h2), already checked (_members.py).

    Raises:
        ValueError: bad dtype, shape, device, reduction, ignore_index or sample_weight.
        IndexError: drainage_idx out of range; target out of [0, K) or equal to drainage_idx
            (checked here for CPU tensors; on other devices the forward asserts on the device).
    """
    check_options(reduction, ignore_index)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must have a floating dtype in {FLOAT_DTYPES}, got {logits.dtype}")
    if target.dtype not in INDEX_DTYPES:
        raise ValueError(f"target must have dtype torch.int64 or torch.int32, got {target.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, K) or (N, K, d1, ..., dk), got {tuple(logits.shape)}")
    K = logits.shape[1]
    if K < 2:
        raise ValueError(f"logits must have K >= 2 outputs (C classes + drainage) in dim 1, got K={K}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if sample_weight is not None:
        check_sample_weight(sample_weight, target)
    if not _is_int(drainage_idx):
        raise ValueError(f"drainage_idx must be an int, got {drainage_idx!r}")
    if not -K <= drainage_idx < K:
        raise IndexError(f"drainage_idx={drainage_idx} is out of range for K={K} outputs")
    d = int(drainage_idx) % K
    if check_targets:  # False: the caller checks them later, or a kernel does (cpp's forward_reduced)
        check_target_values(target, K, d, int(ignore_index))
        check_sample_weight_values(sample_weight)
    return Hyper(float(params[0]), float(params[1]), d, int(ignore_index), int(member))


WEIGHT_MESSAGE = "drainage_fast: every sample_weight must be finite and >= 0"


def check_sample_weight(weight, target: torch.Tensor) -> None:
    """A tensor shaped like target, of a floating dtype, on its device (its values: below)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"sample_weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"sample_weight must have a floating dtype in {FLOAT_DTYPES}, got {weight.dtype}")
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(
            f"sample_weight must have the shape of target, {tuple(target.shape)}, got {tuple(weight.shape)}"
        )
    if weight.device != target.device:
        raise ValueError(f"sample_weight is on {weight.device} but target is on {target.device}")


def check_sample_weight_values(weight: torch.Tensor | None) -> None:
    """Host check that every weight is finite and >= 0, for CPU tensors in eager mode only, as
    check_target_values: elsewhere the kernels assert it on the device, and the host never waits."""
    if weight is None or weight.device.type != "cpu" or torch.compiler.is_compiling() or weight.numel() == 0:
        return
    w = weight.detach()
    bad = ~(torch.isfinite(w) & (w >= 0))
    if bad.any():
        value = w[bad].flatten()[0].item()
        raise ValueError(f"sample_weight must be finite and >= 0, got {value!r}")


# Device-side asserts carry a fixed message (the failing value is not known on the host; under
# torch.compile K may be symbolic and cannot be formatted in).
TARGET_MESSAGE = "drainage_fast: every target must be in [0, K) and != drainage_idx, or == ignore_index"
DRAINAGE_HINT = (
    " (a classifier for C classes needs K = C + 1 outputs: C class logits and the drainage output)"
)


def check_target_values(target: torch.Tensor, K: int, d: int, ignore_index: int) -> None:
    """Host check that every target is ignore_index or a class index in [0, K) other than d.

    Only for CPU tensors in eager mode: elsewhere the check runs on the device, in the forward
    (see backends.Backend.forward), so the host never waits for the GPU.
    """
    if target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0:
        return
    # Common case in two ops instead of seven (~40 us saved per call at N = 512): every target in
    # range, so only the drainage index can be wrong.
    lo, hi = (int(v) for v in torch.aminmax(target))
    if 0 <= lo and hi < K and (d == ignore_index or not bool((target == d).any())):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= K) | (target == d))
    if bad.any():
        value = int(target[bad].flatten()[0])
        what = "equals drainage_idx" if value == d else f"is out of range [0, {K})"
        # the usual cause: a model with C outputs, whose last class is then taken for the drainage output
        hint = DRAINAGE_HINT if value == d else ""
        raise IndexError(
            f"target value {value} {what}; targets must be class indices in [0, {K}) other "
            f"than drainage_idx={d}, or ignore_index={ignore_index}{hint}"
        )


def check_targets_torch(
    target: torch.Tensor, K: int, hp: "Hyper", weight: torch.Tensor | None = None
) -> None:
    """Device-side target (and sample weight) check in torch ops (asserts, no host sync)."""
    kept = target != hp.ignore_index
    bad = kept & ((target < 0) | (target >= K) | (target == hp.drainage_idx))
    torch._assert_async(~bad.any(), TARGET_MESSAGE)
    if weight is not None:
        torch._assert_async((torch.isfinite(weight) & (weight >= 0)).all(), WEIGHT_MESSAGE)


def check_targets_unless_checked(
    target: torch.Tensor, K: int, hp: "Hyper", weight: torch.Tensor | None = None
) -> None:
    """check_targets_torch where check_target_values did not run (GPU tensors, torch.compile), for
    the backends whose kernels do not check the targets themselves."""
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        check_targets_torch(target, K, hp, weight)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A (N, K, d1..dk) tensor seen as rows of K outputs: a (N, S, K) view, S = prod(d1..dk), row
    r = n * S + s, element (r, k) at n*stride_n + s*stride_s + k*stride_k. Copies only when d1..dk
    cannot share one stride."""
    N, K = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    # movedim is a view; reshape stays a view whenever the spatial strides are compatible,
    # which covers contiguous (NCHW) and channels_last (NHWC) layouts.
    view = x.movedim(1, -1).reshape(N, S, K) if x.dim() > 2 else x.unsqueeze(1)
    return view


def from_rows(t3: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of as_rows for a (N, S, K) tensor: back to `shape` = (N, K, d1, ..., dk), as a view."""
    if len(shape) == 2:
        return t3.squeeze(1)
    return t3.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


# Per-row terms a forward saves for the backward: (ROW_TERMS, R) = [shift, c, g_t, g_d], see
# backends/triton_kernels.py for the formulas.
ROW_TERMS = 4


def kept_total(
    target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The divisor of a mean: the kept rows' count, or the sum of their sample weights, in `dtype`."""
    kept = target != hp.ignore_index
    if weight is None:
        return kept.sum().to(dtype)
    return torch.where(kept, weight.to(dtype), 0.0).sum()


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-row losses are float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
