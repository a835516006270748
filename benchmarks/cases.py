"""Benchmark cases: shapes, the byte count of each mode, and rotating inputs.

Bytes are the minimum a design must move ("explicit byte count"), the same for every provider so
GB/s compares speed on one scale:
  fwd         read the logits once, the targets, write one fp32 loss per row
  fwd+bwd     (mean reduction) 1 read + 1 write of the logits: the fused design's floor
  fwd+bwd-none (random upstream gradient per row) 2 reads + 1 write: the forward cannot know the
              upstream gradient, so the backward must read the logits again
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

GPU_SHAPES = [(8192, 11), (512, 51), (256, 1001), (4096, 1001), (32768, 1001), (8192, 32001), (4096, 128257)]
CPU_SHAPES = [(8192, 11), (512, 51), (256, 1001), (4096, 1001)]
MODES = ["fwd", "fwd+bwd", "fwd+bwd-none"]
ROTATION_BYTES = 256 * 2**20  # > 5x the 50 MB L2 of an H100: no input is served from L2 twice


@dataclass(frozen=True)
class Case:
    N: int
    K: int
    dtype: torch.dtype
    mode: str

    @property
    def group(self) -> str:
        return f"{self.mode}-{str(self.dtype).removeprefix('torch.')}-N{self.N}-K{self.K}"

    def bytes(self) -> int:
        logits = self.N * self.K * torch.finfo(self.dtype).bits // 8
        target = 8 * self.N
        if self.mode == "fwd":
            return logits + target + 4 * self.N
        if self.mode == "fwd+bwd":
            return 2 * logits + target
        return 3 * logits + 2 * target + 4 * self.N


class RotatingInputs:
    """Enough independent copies of (logits, target, upstream) that consecutive calls never reuse
    an input still in the cache; `next()` cycles through them."""

    def __init__(self, case: Case, device: torch.device, requires_grad: bool):
        one = case.N * case.K * torch.finfo(case.dtype).bits // 8
        copies = max(1, min(64, ROTATION_BYTES // max(one, 1))) if device.type == "cuda" else 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.items = []
        for _ in range(copies):
            logits = (torch.randn(case.N, case.K, generator=gen) * 2).to(device, case.dtype)
            target = torch.randint(0, case.K - 1, (case.N,), generator=gen).to(device)  # never the last (drainage)
            upstream = torch.rand(case.N, generator=gen).to(device)
            self.items.append((logits.requires_grad_(requires_grad), target, upstream))
        self._cycle = itertools.cycle(self.items)

    def next(self):
        return next(self._cycle)
