"""Open-set data: a RawDataset cut by an OpenSetSplit into what the Trainer sees (known classes,
relabelled 0..k-1) and the unknown-class images it must reject at evaluation.

    unknown_train="drop"     open-set recognition: unknown-class training images are removed.
    unknown_train="relabel"  the systematic-mislabel demonstration: every training image of an unknown
                             class keeps its place in the training set with a known label drawn
                             uniformly at random (seeded); its "clean" label is -1 (no known label is
                             right), so the Trainer's flipped mask marks exactly these images.

Evaluation: the test set (known-class images score closed-set accuracy, unknown-class ones are to be
rejected), or with tuning=True the clean held-out 20% of the training set (train/data/core.py
tuning_split), so hyper-parameters are chosen without touching the test set. As in build_data, the labels
are drawn before the tuning split, so a tuning run sees the same labels as a full run with its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import NoisyDataset, RawDataset, as_long, tuning_split
from ..noise import NoiseRecord, apply_noise, transition_counts
from ..run_dirs import UserError
from .splits import OpenSetSplit

UNKNOWN_TRAIN = ("drop", "relabel")
NO_KNOWN_LABEL = -1


@dataclass
class OpenSetData:
    data: NoisyDataset  # known classes 0..k-1; eval_x / eval_y: known-class evaluation images
    known_eval_index: np.ndarray  # positions of data.eval_x in the test set (training set when tuning)
    known_eval_label: np.ndarray  # their original class ids
    unknown_x: torch.Tensor  # unknown-class evaluation images, raw pixels
    unknown_eval_index: np.ndarray
    unknown_eval_label: np.ndarray  # original class ids
    split: OpenSetSplit
    unknown_train: str


def known_index(split: OpenSetSplit) -> np.ndarray:
    """(num_classes,) int64: original class id -> its index among the known classes, or NO_KNOWN_LABEL."""
    to_known = np.full(split.num_classes, NO_KNOWN_LABEL, dtype=np.int64)
    to_known[list(split.known)] = np.arange(len(split.known))
    return to_known


def open_set_labels(
    labels: np.ndarray, split: OpenSetSplit, unknown_train: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training labels, clean labels) in the known-class space 0..k-1 for every training image.

    Unknown-class images get NO_KNOWN_LABEL as their clean label, and as their training label when
    dropped; when relabelled, a known label uniformly at random from numpy.random.default_rng(seed).
    """
    if unknown_train not in UNKNOWN_TRAIN:
        raise ValueError(f"unknown_train must be one of {UNKNOWN_TRAIN}, got {unknown_train!r}")
    clean = known_index(split)[labels]
    given = clean.copy()
    if unknown_train == "relabel":
        unknown = clean == NO_KNOWN_LABEL
        given[unknown] = np.random.default_rng(seed).integers(0, len(split.known), int(unknown.sum()))
    return given, clean


def _record(
    labels: np.ndarray, given: np.ndarray, split: OpenSetSplit, unknown_train: str, seed: int
) -> NoiseRecord:
    if unknown_train == "drop":
        return apply_noise(
            "none", 0.0, given[given >= 0], len(split.known), dataset=split.dataset, seed=seed
        )[1]
    relabelled = np.isin(labels, split.unknown)
    # rows: original classes, columns: the known labels given (column j = known class split.known[j])
    counts = transition_counts(labels, given, split.num_classes)[:, : len(split.known)]
    return NoiseRecord(
        "open_set_relabel",
        float(relabelled.mean()),
        seed,
        len(labels),
        float(relabelled.mean()),
        counts.tolist(),
        f"every training image of classes {list(split.unknown)} relabelled "
        f"uniformly at random to one of the known classes {list(split.known)}",
    )


def check_split_fits(raw: RawDataset, split: OpenSetSplit) -> None:
    """Raises UserError when split is for a dataset with another number of classes than raw."""
    if raw.num_classes != split.num_classes:
        raise UserError(
            f"split {split.tag} has {split.num_classes} classes, dataset {raw.name} has {raw.num_classes}"
        )


def build_open_set_data(
    raw: RawDataset, split: OpenSetSplit, *, seed: int, tuning: bool = False, unknown_train: str = "drop"
) -> OpenSetData:
    """Cuts raw by split (see the module docstring). seed draws the relabelling (unknown_train="relabel")."""
    check_split_fits(raw, split)
    given, clean = open_set_labels(raw.train_y, split, unknown_train, seed)
    if tuning:
        pool, eval_index = tuning_split(len(raw.train_y))
        eval_x, eval_labels, eval_split = raw.train_x, raw.train_y, "val"
    else:
        pool, eval_index = np.arange(len(raw.train_y)), np.arange(len(raw.test_y))
        eval_x, eval_labels, eval_split = raw.test_x, raw.test_y, "test"
    train_index = pool[given[pool] != NO_KNOWN_LABEL]
    is_known = np.isin(eval_labels[eval_index], split.known)
    known_eval, unknown_eval = eval_index[is_known], eval_index[~is_known]
    data = NoisyDataset(
        name=raw.name,
        num_classes=len(split.known),
        train_x=raw.train_x[torch.from_numpy(train_index)],
        train_y=as_long(given[train_index]),
        train_y_clean=as_long(clean[train_index]),
        train_index=as_long(train_index),
        eval_x=eval_x[torch.from_numpy(known_eval)],
        eval_y=as_long(known_index(split)[eval_labels[known_eval]]),
        eval_split=eval_split,
        pixel_scale=raw.pixel_scale,
        mean=raw.mean,
        std=raw.std,
        augment=raw.augment,
        noise=_record(raw.train_y, given, split, unknown_train, seed),
    )
    return OpenSetData(
        data,
        known_eval,
        eval_labels[known_eval],
        eval_x[torch.from_numpy(unknown_eval)],
        unknown_eval,
        eval_labels[unknown_eval],
        split,
        unknown_train,
    )
