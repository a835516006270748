"""Backend registry. Each backend is a module with the same functions:

    availability(device) -> (bool, reason)
    forward(x3, target, hp) -> (loss (R,), row terms (4, R))
    backward(x3, target, row_terms, grad_rows, hp) -> grad (N, S, K)
and, where FUSED_GRAD is true, forward_with_grad(x3, target, hp, scale) -> (loss, row terms, grad)
and scale_(grad, scale). forward_with_grad's gradient must have the same bits as backward's with
grad_rows = scale: gradcheck calls the backward twice and compares them exactly.

x3 is the (N, S, K) row view of the logits (see _inputs.as_rows), target the (R,) flat targets.
Modules are imported lazily, only when asked for, so a missing optional dependency (triton) or a
native extension that cannot be built (cpp, cuda) never breaks `import drainage_fast`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module, fastest first on a GPU. "auto" takes triton, else cuda, else reference for CUDA
# tensors, and cpp, else reference on the CPU (where Triton runs only in its interpreter, for tests).
_MODULES = {
    "triton": "drainage_fast.backends.triton_launch",
    "cuda": "drainage_fast.backends.cuda",
    "cpp": "drainage_fast.backends.cpp",
    "reference": "drainage_fast.backends.reference",
}
NAMES = tuple(_MODULES)


_LOADED: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name])
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
    return resolve(name, torch.device(device_type)).NAME


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for `name` on `device`. "auto" picks the fastest; others never fall back."""
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
