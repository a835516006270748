"""Dataset containers shared by the loaders, and the tuning split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..noise import NoiseRecord

TUNING_TRAIN_FRACTION = 0.8
TUNING_SPLIT_SEED = 42  # the authors' split seed: the same 80/20 partition for every run seed


def as_long(a: np.ndarray) -> torch.Tensor:
    """A numpy array of labels or indices as an int64 tensor (a copy when `a` is not contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(a)).long()


@dataclass
class RawDataset:
    """A dataset as stored on disk: images (N, C, H, W) as raw pixels, clean int64 labels."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    pixel_scale: float  # raw value of a white pixel (255; 16 for digits)
    mean: tuple[float, ...]  # per-channel mean / std of [0, 1] pixels, for normalisation
    std: tuple[float, ...]
    augment: str = "none"  # see train/data/augment.py


@dataclass
class NoisyDataset:
    """What the trainer consumes: training images with noisy labels (clean ones kept alongside) and an
    evaluation split with clean labels: the test set, or the clean validation split under --tuning."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor  # (N,) noisy labels: what the loss sees
    train_y_clean: torch.Tensor  # (N,) clean labels: only for metrics (p_d on clean vs flipped)
    train_index: torch.Tensor  # (N,) positions in the original training set
    eval_x: torch.Tensor
    eval_y: torch.Tensor  # clean labels
    eval_split: str  # "test" or "val"
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    noise: NoiseRecord
    # held-out training images (the tuning split's 20%, clean labels) on which a run with a coverage
    # chooses its abstention threshold; None otherwise
    calib_x: torch.Tensor | None = None
    calib_y: torch.Tensor | None = None

    @property
    def flipped(self) -> torch.Tensor:
        """(N,) bool: training samples whose label was corrupted."""
        return self.train_y != self.train_y_clean

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def tuning_split(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a seeded 80/20 permutation split of the training set.

    Noise is applied to the whole training set before the split (as in the authors' code), so the
    training part of a tuning run sees the same noisy labels as a full run with the same seed; the
    validation part is evaluated against its clean labels. Works for every noise type.
    """
    order = np.random.default_rng(TUNING_SPLIT_SEED).permutation(num_samples)
    cut = int(num_samples * TUNING_TRAIN_FRACTION)
    return np.sort(order[:cut]), np.sort(order[cut:])
