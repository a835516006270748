"""Backend registry: each backend is a module that implements the Backend protocol below.

Modules are imported lazily, only when asked for, so a missing optional dependency (triton) or a
native extension that cannot be built (cpp, cuda) never breaks `import drainage_fast`.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

import torch

from .._inputs import Hyper


class Backend(Protocol):
    """What DrainageFunction needs from a backend module.

    x3 is the (N, S, K) row view of the logits (see _inputs.as_rows), target the (R,) flat targets
    (R = N * S), hp the checked hyper-parameters (the member and its h1, h2 among them), weight None
    or the (R,) sample weights. Losses and row terms are float32 (float64 for float64 logits), those
    of the weighted loss w_r l_r when there are weights; gradients have the dtype of the logits and
    the layout of torch.empty_like(x3).
    """

    NAME: str
    # forward_reduced(with_grad=True) writes the gradient in the forward pass (1 read + 1 write of
    # the logits for a mean / sum); False: the backward recomputes it from the row terms.
    FUSED_GRAD: bool

    def availability(self, device: torch.device | None = None) -> tuple[bool, str]:
        """Whether the backend can run on `device` (None: on this machine), and why (not)."""

    def forward(
        self, x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row losses (R,) and row terms (4, R) = [shift, c, g_t, g_d] for the backward. On a
        GPU the targets (and weights) are checked on the device (an assert, no host sync)."""

    def backward(
        self, x3: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, grad_rows: torch.Tensor, hp: Hyper
    ) -> torch.Tensor:
        """The gradient of sum_r grad_rows[r] * loss[r] from the row terms `stats` of forward;
        grad_rows may have any stride, 0 too. Per element (exp(z - shift) * c) * grad_rows[r], in
        that order (see forward_reduced)."""

    def forward_reduced(
        self,
        x3: torch.Tensor,
        target: torch.Tensor,
        hp: Hyper,
        mean: bool,
        with_grad: bool,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(out, inv_count, grad, pending), eager mode only.

        out: the 0-dim sum of the (weighted) row losses, or their mean over the kept rows (nan if
        none): divided by the count, or by the sum of the kept rows' weights.
        inv_count: (1,) 1 / count (or 1 / that sum) for a mean, else None. grad (with_grad): the
        gradient of out times 1 / pending; pending: the factor the backward must still apply
        besides the upstream gradient (None when the pass applied everything). For float32 /
        float64 logits the grad with scale_(grad, 1, pending) has the same bits as
        backward(..., grad_rows = inv_count or 1): gradcheck's second backward recomputes and
        compares exactly.
        """

    def forward_grad_(
        self, x3: torch.Tensor, target: torch.Tensor, hp: Hyper, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-row (weighted) losses (R,), and x3 overwritten in place with the gradient of their
        sum (the fused linear path's chunk buffer, drainage_fast/linear.py)."""

    def scale_(
        self, grad: torch.Tensor, grad_out: torch.Tensor, pending: torch.Tensor | None
    ) -> torch.Tensor:
        """grad *= grad_out * pending (None: 1) in place; nothing to do on the device when it is 1."""


# name -> module, in the order "auto" tries them on a GPU: it takes triton, else cuda, else reference for CUDA
# tensors, and cpp, else reference on the CPU (where Triton runs only in its interpreter, for tests).
_MODULES = {
    "triton": "drainage_fast.backends.triton_launch",
    "cuda": "drainage_fast.backends.cuda",
    "cpp": "drainage_fast.backends.cpp",
    "reference": "drainage_fast.backends.reference",
}
NAMES = tuple(_MODULES)


_LOADED: dict[str, Backend] = {}


def load(name: str) -> Backend:
    if name not in _LOADED:
        _LOADED[name] = cast(Backend, importlib.import_module(_MODULES[name]))
    return _LOADED[name]


_AVAILABILITY: dict[tuple[str, str | None], tuple[bool, str]] = {}


def availability(name: str, device: torch.device | None = None) -> tuple[bool, str]:
    """Whether backend `name` can run on `device` (None: on this machine), and why (not)."""
    key = (name, None if device is None else device.type)
    if key not in _AVAILABILITY:  # a plain dict, not lru_cache: Dynamo traces dict lookups
        try:
            _AVAILABILITY[key] = load(name).availability(device)
        except ImportError as err:
            _AVAILABILITY[key] = (False, f"cannot import it: {err}")
    return _AVAILABILITY[key]


@torch.compiler.assume_constant_result
def resolve_name(name: str, device_type: str) -> str:
    """resolve(name, device).NAME, importing (and building) the backend on its first use.

    torch.compile calls this at trace time and keeps the returned name as a constant, so the first
    call of a process may be a compiled one: Dynamo cannot trace an import, but it never traces this.
    """
    key = (name, device_type)
    if key not in _RESOLVED:  # availability is fixed for the process: so is the answer
        _RESOLVED[key] = resolve(name, torch.device(device_type)).NAME
    return _RESOLVED[key]


_RESOLVED: dict[tuple[str, str], str] = {}


def resolve(name: str, device: torch.device) -> Backend:
    """The backend module for `name` on `device`. "auto" picks the first available; others never fall back."""
    if name == "auto":
        candidates = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
        for candidate in candidates:
            if availability(candidate, device)[0]:
                return load(candidate)
        return load("reference")
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}")
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    return load(name)
