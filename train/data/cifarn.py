"""CIFAR-10N / CIFAR-100N human labels (Wei et al. 2022): CIFAR-10_human.pt / CIFAR-100_human.pt.

Each file is a torch archive of one dict of numpy int64 arrays (and, in CIFAR-100N, Python lists) with
50,000 labels in torchvision's CIFAR training order. It is read with torch.load(weights_only=True),
allowing only the numpy globals an int64 array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..run_dirs import UserError
from .cifar import _numpy_internal
from .download import ensure, fetch

FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
DEFAULT_KEY = {"cifar10": "worse_label", "cifar100": "noisy_label"}  # the papers' 40.2% settings
# the CIFAR-N repository's CLI names -> keys in the files
KEY_ALIASES = {
    "worst": "worse_label",
    "aggre": "aggre_label",
    "rand1": "random_label1",
    "rand2": "random_label2",
    "rand3": "random_label3",
    "noisy100": "noisy_label",
}
URL = "https://raw.githubusercontent.com/UCSC-REAL/cifar-10-100n/main/data/"


def _safe_numpy_globals() -> list:
    reconstruct = _numpy_internal("multiarray", "_reconstruct")
    # The released files were pickled by numpy 1.x, which names numpy.core.multiarray._reconstruct;
    # numpy 2 names it numpy._core.multiarray._reconstruct. Allow the function under both names.
    # numpy >= 1.25 builds an int64 dtype as an instance of its own class, numpy.dtypes.Int64DType
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.int64)),
    ]


def read_human_labels(path: str | Path) -> dict:
    """The dict stored in a CIFAR-N .pt file, numpy arrays and lists as stored."""
    with torch.serialization.safe_globals(_safe_numpy_globals()):
        return torch.load(path, weights_only=True)


def load_human_labels(
    dataset: str,
    root: str | Path,
    clean_train_labels: np.ndarray,
    key: str | None = None,
    download: bool = True,
) -> tuple[np.ndarray, str]:
    """(noisy labels (50000,) int64, description) for cifar10 / cifar100.

    Raises UserError when the file's clean_label does not equal the CIFAR training labels element by
    element (a wrong file, or a CIFAR copy in another order), or when the key is missing.
    """
    if dataset not in FILES:
        raise UserError(f"human noise exists for {sorted(FILES)}, not {dataset!r}")
    path = Path(root) / FILES[dataset]
    ensure(
        path.exists(),
        path.parent,
        [FILES[dataset]],
        lambda: fetch(URL + FILES[dataset], path),
        download,
        f"Get it from https://github.com/UCSC-REAL/cifar-10-100n (data/{FILES[dataset]}) into {path.parent}.",
    )
    stored = read_human_labels(path)
    key = KEY_ALIASES.get(key, key) if key else DEFAULT_KEY[dataset]
    if key not in stored:
        raise UserError(f"{path} has keys {sorted(stored)}, not {key!r}")
    clean = np.asarray(stored["clean_label"], dtype=np.int64)
    if clean.shape != clean_train_labels.shape or not np.array_equal(clean, clean_train_labels):
        raise UserError(
            f"{path}: clean_label does not match the {dataset} training labels element by element"
        )
    return np.asarray(stored[key], dtype=np.int64), f"{FILES[dataset]}[{key}]"
