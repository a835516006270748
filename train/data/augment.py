"""Batched, tensor-only augmentation and normalisation (no torchvision, no DataLoader workers).

Whole datasets live as uint8 tensors (on the GPU when there is one: the CIFAR training set is 150 MB);
each batch is augmented on its device. Random parameters are drawn from the trainer's CPU generator, so
a run is reproducible and a resumed run continues the same random stream.

    none              normalise only (MNIST, digits)
    crop_flip         RandomCrop(32, padding=4) + RandomHorizontalFlip (the authors' CIFAR-10 recipe)
    crop_flip_rotate  the same + RandomRotation(20) with nearest sampling (their CIFAR-100 recipe)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop_flip", "crop_flip_rotate")
CROP_PADDING = 4
ROTATION_DEGREES = 20.0


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> same shape: a random H x W window of the zero-padded image, per sample."""
    B, _, H, W = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, B), generator=gen).to(x.device)
    rows = offsets[0, :, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(W, device=x.device)  # (B, W)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H + 2p, W + 2p, C)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    angle = (torch.rand(x.shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def prepare_batch(
    raw: torch.Tensor,
    *,
    pixel_scale: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: str = "none",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Raw pixels (B, C, H, W) -> float32 network input: [0, 1], augmented (when gen is given), normalised."""
    x = raw.float() / pixel_scale
    if gen is not None and augment != "none":
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        x = random_flip(random_crop(x, CROP_PADDING, gen), gen)
        if augment == "crop_flip_rotate":
            x = random_rotation(x, ROTATION_DEGREES, gen)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
