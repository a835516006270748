"""MNIST from the original idx files (gzipped or raw) under <root>/MNIST/raw, torchvision's layout."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..run_dirs import UserError
from .core import RawDataset
from .download import ensure, fetch

MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first mirror
FILES = {  # name -> md5 of the .gz
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension; images: 3 dimensions (N, rows, cols)
MEAN, STD = 0.1307, 0.3081


def read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian header: magic, then one uint32 per dimension; uint8 payload)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in IDX_MAGIC:
        raise UserError(f"{path}: not an MNIST idx file (magic {magic}, expected 2049 or 2051)")
    ndim = IDX_MAGIC[magic]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise UserError(f"{path}: header says {shape}, payload has {payload.size} bytes")
    return payload.reshape(shape)


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def load_mnist(root: str | Path, download: bool = True) -> RawDataset:
    raw = Path(root) / "MNIST" / "raw"

    def download_all():
        for name, md5 in FILES.items():
            fetch(MIRROR + name + ".gz", raw / f"{name}.gz", md5)

    present = all(_find(raw, name) is not None for name in FILES)
    ensure(
        present,
        raw,
        [f"{n}[.gz]" for n in FILES],
        download_all,
        download,
        f"Get them from {MIRROR} (or any MNIST mirror) into {raw}.",
    )
    arrays = {name: read_idx(_find(raw, name)) for name in FILES}

    def as_images(a):
        return torch.from_numpy(a.copy())[:, None]  # (N, 1, 28, 28)

    return RawDataset(
        name="mnist",
        num_classes=10,
        train_x=as_images(arrays["train-images-idx3-ubyte"]),
        train_y=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        test_x=as_images(arrays["t10k-images-idx3-ubyte"]),
        test_y=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
        pixel_scale=255.0,
        mean=(MEAN,),
        std=(STD,),
    )
