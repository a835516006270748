"""CIFAR-10 / CIFAR-100 from the official python-version files (cifar-10-batches-py, cifar-100-python).

The batches are Python pickles of dicts holding a uint8 (N, 3072) array and label lists. They are read
with a restricted unpickler that can build numpy arrays and nothing else: a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from .core import RawDataset
from .download import ensure, extract_tar, fetch

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "augment": "crop_flip",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "augment": "crop_flip_rotate",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def _numpy_internal(module: str, name: str):
    """numpy's pickle helpers moved from numpy.core to numpy._core in numpy 2."""
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_internal("multiarray", "_reconstruct")
    frombuffer = _numpy_internal("numeric", "_frombuffer")
    import codecs

    return {
        # ndarray pickles of every numpy version: _reconstruct (protocol <= 4), _frombuffer (protocol 5)
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") in protocol 2 pickles
        ("_codecs", "encode"): codecs.encode,
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays and lists"
            ) from None


def read_batch(path: Path) -> dict:
    """One pickled CIFAR batch as a dict with str keys (the files were written by Python 2: latin1)."""
    with open(path, "rb") as f:
        return _ArrayOnlyUnpickler(f, encoding="latin1").load()


def _read_split(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = [], []
    for name in files:
        batch = read_batch(folder / name)
        images.append(np.asarray(batch["data"], dtype=np.uint8))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
    return x, np.concatenate(labels)


def load_cifar(name: str, root: str | Path, download: bool = True) -> RawDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) in torchvision's training order."""
    spec = CIFAR[name]
    root = Path(root)
    folder = root / spec["folder"]
    files = spec["train"] + spec["test"]

    def download_all():
        archive = fetch(spec["url"], root / spec["url"].rsplit("/", 1)[1], spec["md5"])
        extract_tar(archive, root)

    ensure(
        all((folder / f).exists() for f in files),
        folder,
        files,
        download_all,
        download,
        f"Get {spec['url']} and extract it into {root}.",
    )
    train_x, train_y = _read_split(folder, spec["train"], spec["label_key"])
    test_x, test_y = _read_split(folder, spec["test"], spec["label_key"])
    return RawDataset(
        name=name,
        num_classes=spec["num_classes"],
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        pixel_scale=255.0,
        mean=spec["mean"],
        std=spec["std"],
        augment=spec["augment"],
    )
