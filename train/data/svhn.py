"""SVHN (cropped house-number digits, 3 x 32 x 32) from the original MATLAB files under <root>/svhn:
train_32x32.mat and test_32x32.mat (73,257 / 26,032 images; torchvision's file names and md5s).

Each file holds X, uint8 (32, 32, 3, N), and y, (N, 1) labels 1..10 where 10 is the digit 0. MATLAB v5
files are read with scipy.io.loadmat; scipy comes with scikit-learn (the `train` extra), and without it
loading raises an ImportError that says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..run_dirs import UserError
from .core import RawDataset
from .download import ensure, fetch

URL = "http://ufldl.stanford.edu/housenumbers/"
FILES = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}
MEAN, STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)  # the values in common use (train set)


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64 in 0..9) from one SVHN .mat file."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError(
            "reading SVHN's .mat files needs scipy: pip install scipy (or the train extra)"
        ) from exc
    mat = loadmat(path)
    x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or x.dtype != np.uint8:
        raise UserError(
            f"{path}: expected X uint8 (32, 32, 3, N) and y (N, 1), got X {x.dtype} {x.shape}, "
            f"y {mat['y'].shape}"
        )
    if y.min() < 1 or y.max() > 10:
        raise UserError(f"{path}: labels must be 1..10 (10 = digit 0), got {y.min()}..{y.max()}")
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), y


def load_svhn(root: str | Path, download: bool = True) -> RawDataset:
    where = Path(root) / "svhn"

    def download_all():
        for name, md5 in FILES.items():
            fetch(URL + name, where / name, md5)

    ensure(
        all((where / n).exists() for n in FILES),
        where,
        list(FILES),
        download_all,
        download,
        f"Get them from {URL} into {where}.",
    )
    train_x, train_y = read_svhn_mat(where / "train_32x32.mat")
    test_x, test_y = read_svhn_mat(where / "test_32x32.mat")
    # no augmentation: a horizontal flip changes what a digit is, and the authors ship no SVHN recipe
    return RawDataset(
        name="svhn",
        num_classes=10,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        pixel_scale=255.0,
        mean=MEAN,
        std=STD,
    )
