"""Benchmark cases: shapes, the byte count of each mode, and rotating inputs.

Bytes are the minimum a design must move ("explicit byte count"), the same for every provider so
GB/s compares speed on one scale:
  fwd         read the logits once, the targets, write one fp32 loss per row
  fwd+bwd     (mean reduction) 1 read + 1 write of the logits: the fused design's floor
  fwd+bwd-none (random upstream gradient per row) 2 reads + 1 write: the forward cannot know the
              upstream gradient, so the backward must read the logits again
A row is one (sample, pixel) pair: per-pixel logits (N, K, H, W) have N * H * W rows of K outputs.
"""

from __future__ import annotations

import itertools
import math
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
    spatial: tuple[int, ...] = ()  # (H, W) of per-pixel logits (N, K, H, W)
    channels_last: bool = False  # per-pixel logits stored N, H, W, K in memory (torch.channels_last)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.N, self.K, *self.spatial)

    @property
    def rows(self) -> int:
        return self.N * math.prod(self.spatial)

    @property
    def group(self) -> str:
        pixels = "".join(f"x{s}" for s in self.spatial) + ("-channels_last" if self.channels_last else "")
        return f"{self.mode}-{str(self.dtype).removeprefix('torch.')}-N{self.N}-K{self.K}{pixels}"

    def bytes(self) -> int:
        logits = self.rows * self.K * torch.finfo(self.dtype).bits // 8
        target = 8 * self.rows
        if self.mode == "fwd":
            return logits + target + 4 * self.rows
        if self.mode == "fwd+bwd":
            return 2 * logits + target
        return 3 * logits + 2 * target + 4 * self.rows


class RotatingInputs:
    """Enough independent copies of (logits, target, upstream) that consecutive calls never reuse
    an input still in the cache; `next()` cycles through them, `items` holds them all. Drawn on the
    device itself (seed 0): drawing on the CPU takes ~2 s per GiB (measured, 2 cores), seconds of
    the GPU check's budget for its 2 GiB cases."""

    def __init__(self, case: Case, device: torch.device, requires_grad: bool):
        one = case.rows * case.K * torch.finfo(case.dtype).bits // 8
        copies = max(1, min(64, ROTATION_BYTES // max(one, 1))) if device.type == "cuda" else 1
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        gen = torch.Generator(device=device).manual_seed(0)
        self.items = []
        for _ in range(copies):
            logits = torch.randn(case.shape, generator=gen, device=device) * 2
            logits = logits.to(case.dtype, memory_format=fmt)
            target_shape = (case.N, *case.spatial)
            # never the last output (the drainage node)
            target = torch.randint(0, case.K - 1, target_shape, generator=gen, device=device)
            upstream = torch.rand(target_shape, generator=gen, device=device)
            self.items.append((logits.requires_grad_(requires_grad), target, upstream))
        self._cycle = itertools.cycle(self.items)

    def next(self):
        return next(self._cycle)
