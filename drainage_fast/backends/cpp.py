"""Backend "cpp": the C++ CPU kernels of csrc/ (see native.py for the ops, _ext.py for the build)."""

from __future__ import annotations

import torch

from .native import LOAD_ERROR, backward, forward, forward_with_grad, scale_  # noqa: F401

NAME = "cpp"
# Writing the gradient in the forward, while the row is in L1 and its exponentials are at hand,
# measured 1.5x faster than recomputing it in the backward (min times; 1.07x in the medians, with other
# jobs on the machine): fp32 (4096, 1001) mean, fwd + bwd on 2 threads, 4.857 ms against 7.076
# (medians 6.957 against 7.460), benchmarks/results/cpu_cpp_vs_reference.md.
FUSED_GRAD = True


def availability(device: torch.device | None = None) -> tuple[bool, str]:
    if device is not None and device.type != "cpu":
        return False, f"the C++ kernels take CPU tensors (got {device.type}); on CUDA use 'cuda'"
    if LOAD_ERROR is not None:
        return False, LOAD_ERROR
    return True, "C++ CPU kernels (csrc/cpu), at::parallel_for over rows"
