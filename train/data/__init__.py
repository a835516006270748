"""Datasets with label noise: build_data(cfg) -> NoisyDataset (tensors; clean labels kept alongside).

Loaders (each returns a RawDataset of raw uint8 pixels and clean labels):
    digits      scikit-learn's bundled 8x8 digits (no download)          train/data/digits.py
    mnist       idx files under <root>/MNIST/raw                          train/data/mnist.py
    cifar10     <root>/cifar-10-batches-py (python pickles)               train/data/cifar.py
    cifar100    <root>/cifar-100-python
    cifar10n    CIFAR-10 + <root>/CIFAR-10_human.pt (human noise)         train/data/cifarn.py
    cifar100n   CIFAR-100 + <root>/CIFAR-100_human.pt
    svhn        <root>/svhn/{train,test}_32x32.mat (needs scipy)         train/data/svhn.py
WebVision and Clothing1M are image-folder datasets trained by train/imagenet_scale.py (DALI + DDP).
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import apply_noise
from ..run_dirs import UserError
from .augment import prepare_batch
from .cifar import load_cifar
from .cifarn import load_human_labels
from .core import NoisyDataset, RawDataset, as_long, tuning_split
from .digits import load_digits_dataset
from .mnist import load_mnist
from .svhn import load_svhn

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "cifar10n", "cifar100n", "svhn")
LARGE_SCALE = ("webvision", "clothing1m")
HUMAN_NOISE_ALIASES = {"cifar10n": "cifar10", "cifar100n": "cifar100"}

__all__ = [
    "DATASETS",
    "NoisyDataset",
    "RawDataset",
    "as_long",
    "build_data",
    "load_labelled",
    "load_raw",
    "noise_type_of",
    "prepare_batch",
    "tuning_split",
]


def load_raw(name: str, root: str = "data", download: bool = True) -> RawDataset:
    """The clean dataset `name` (a human-noise alias loads its base CIFAR)."""
    name = HUMAN_NOISE_ALIASES.get(name, name)
    if name == "digits":
        return load_digits_dataset()
    if name == "mnist":
        return load_mnist(root, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download)
    if name == "svhn":
        return load_svhn(root, download)
    if name in LARGE_SCALE:
        raise UserError(
            f"dataset={name}: {name} is trained with train/imagenet_scale.py (DALI + torchrun "
            f"DDP), "
            "not `train run`"
        )
    raise UserError(f"dataset={name}: unknown dataset; choose from {DATASETS}")


def noise_type_of(cfg) -> str:
    """cfg.noise_type, except that CIFAR-10N / CIFAR-100N always train on their human labels."""
    return "human" if cfg.dataset in HUMAN_NOISE_ALIASES else cfg.noise_type


def load_labelled(cfg) -> tuple[RawDataset, np.ndarray | None, str]:
    """cfg's clean dataset, and for human noise the human labels and where they come from. Downloads
    missing files where allowed; a file that is still missing is a UserError (DatasetNotFound)."""
    raw = load_raw(cfg.dataset, cfg.data_root, cfg.download)
    if noise_type_of(cfg) != "human":
        return raw, None, ""
    return raw, *load_human_labels(raw.name, cfg.data_root, raw.train_y, cfg.human_label, cfg.download)


def build_data(cfg) -> NoisyDataset:
    """Loads cfg.dataset, corrupts the training labels (cfg.noise_type / noise_rate / seed) and, with
    cfg.tuning, holds out 20% of the training set as a clean-labelled validation split; with
    cfg.coverage, holds out the same 20% as the calibration split of the abstention rule and evaluates
    on the test set."""
    noise_type = noise_type_of(cfg)
    raw, human, source = load_labelled(cfg)
    noisy, record = apply_noise(
        noise_type,
        cfg.noise_rate,
        raw.train_y,
        raw.num_classes,
        dataset=raw.name,
        seed=cfg.seed,
        images=raw.train_x,
        pixel_scale=raw.pixel_scale,
        human_labels=human,
        human_source=source,
    )
    calib_x = calib_y = None
    if cfg.tuning or cfg.coverage is not None:
        train_idx, val_idx = tuning_split(len(raw.train_y))
        train_part = noisy[train_idx] != raw.train_y[train_idx]
        record.extra["tuning_train_realised_rate"] = float(train_part.mean())
    else:
        train_idx = np.arange(len(raw.train_y))
    if cfg.tuning:
        eval_x, eval_y, split = raw.train_x[torch.from_numpy(val_idx)], raw.train_y[val_idx], "val"
    else:
        eval_x, eval_y, split = raw.test_x, raw.test_y, "test"
    if cfg.coverage is not None:
        calib_x, calib_y = raw.train_x[torch.from_numpy(val_idx)], as_long(raw.train_y[val_idx])
    return NoisyDataset(
        name=raw.name,
        num_classes=raw.num_classes,
        train_x=raw.train_x[torch.from_numpy(train_idx)],
        train_y=as_long(noisy[train_idx]),
        train_y_clean=as_long(raw.train_y[train_idx]),
        train_index=as_long(train_idx),
        eval_x=eval_x,
        eval_y=as_long(eval_y),
        eval_split=split,
        pixel_scale=raw.pixel_scale,
        mean=raw.mean,
        std=raw.std,
        augment=raw.augment,
        noise=record,
        calib_x=calib_x,
        calib_y=calib_y,
    )
