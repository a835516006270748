"""scikit-learn's bundled digits: 1,797 real 8x8 grey images of hand-written digits (0-16 grey levels), no
download. The embedded default dataset: big enough to show label-noise effects, small enough to train in
seconds on a laptop CPU."""

from __future__ import annotations

import numpy as np
import torch

from .core import RawDataset

TEST_FRACTION = 0.25
SPLIT_SEED = 0  # fixed: the test set is the same for every run
MEAN, STD = 0.3053, 0.3760  # of all 1,797 images on the [0, 1] scale


def load_digits_dataset() -> RawDataset:
    """Stratified 75/25 train / test split (1,347 / 450 images) with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (1797, 1, 8, 8), values 0-16
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[: round(TEST_FRACTION * (labels == c).sum())]
            for c in range(10)
        ]
    )
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return RawDataset(
        name="digits",
        num_classes=10,
        train_x=images[train_idx],
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        pixel_scale=16.0,
        mean=(MEAN,),
        std=(STD,),
    )
