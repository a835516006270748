"""Open-set splits: the classes a model is trained on (known) and the ones it must reject (unknown).

A seeded split is a function of (num_classes, num_known, seed) alone:

    known = sorted(numpy.random.default_rng(seed).permutation(num_classes)[:num_known])

and is written to a JSON file (<dataset>_<k>-<u>_seed<s>.json) so that every result names the exact
classes it was measured on: the digits ones are committed in train/openset/split_files/, a new one is
written next to the results of the command that made it (never into the package). A split file found on
disk is checked against its seed before use, so an edited file cannot pass for the seeded split. A file
without a seed is a hand-written split: the 7/8/9 demonstration, or a published split such as the CIFAR-10
six-class lists of Neal et al. (2018), which this rule does not reproduce.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..run_dirs import UserError

SPLIT_DIR = Path(__file__).parent / "split_files"
# the datasets an open-set job can split, and their number of classes
DATASET_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "svhn": 10, "cifar100": 100}
RULE = "known = sorted(numpy.random.default_rng(seed).permutation(num_classes)[:num_known])"


@dataclass(frozen=True)
class OpenSetSplit:
    dataset: str
    num_classes: int
    known: tuple[int, ...]
    unknown: tuple[int, ...]
    seed: int | None = None  # None: a hand-written split
    name: str = ""  # file stem; default <dataset>_<k>-<u>_seed<s>

    def __post_init__(self):
        object.__setattr__(self, "known", tuple(int(c) for c in self.known))
        object.__setattr__(self, "unknown", tuple(int(c) for c in self.unknown))
        if not self.known or not self.unknown:
            raise UserError(
                f"split {self.tag}: needs known and unknown classes, got {self.known} / {self.unknown}"
            )
        if sorted(self.known + self.unknown) != list(range(self.num_classes)):
            raise UserError(
                f"split {self.tag}: known {self.known} and unknown {self.unknown} must partition "
                f"the classes 0..{self.num_classes - 1}"
            )

    @property
    def tag(self) -> str:
        return self.name or f"{self.dataset}_{len(self.known)}-{len(self.unknown)}_seed{self.seed}"


def make_split(dataset: str, num_classes: int, num_known: int, seed: int) -> OpenSetSplit:
    """The seeded split (see RULE). Raises UserError unless 0 < num_known < num_classes."""
    if not 0 < num_known < num_classes:
        raise UserError(f"num_known must be in [1, {num_classes - 1}], got {num_known}")
    known = np.sort(np.random.default_rng(seed).permutation(num_classes)[:num_known])
    unknown = np.setdiff1d(np.arange(num_classes), known)
    return OpenSetSplit(dataset, num_classes, tuple(known), tuple(unknown), seed)


def save_split(split: OpenSetSplit, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in asdict(split).items() if k != "name"}
    if split.seed is not None:
        record["rule"] = RULE
    # one key per line, class lists on one line: readable in a diff
    items = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()]
    path.write_text("{\n" + ",\n".join(items) + "\n}\n")
    return path


def load_split(path: str | Path) -> OpenSetSplit:
    """A split file; a seeded one must equal what its seed generates. A missing, unreadable or
    inconsistent file is a UserError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        split = OpenSetSplit(
            raw["dataset"], raw["num_classes"], tuple(raw["known"]), tuple(raw["unknown"]), raw.get("seed")
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(
            f"split file {path}: not a readable split ({type(exc).__name__}: {exc}); it needs "
            "dataset, num_classes, known and unknown"
        ) from None
    if split.tag != path.stem:  # a hand-written or renamed split is named after its file
        split = replace(split, name=path.stem)
    if split.seed is not None:
        expected = make_split(split.dataset, split.num_classes, len(split.known), split.seed)
        if expected.known != split.known:
            raise UserError(
                f"{path}: seed {split.seed} gives known classes {list(expected.known)}, the file "
                f"says {list(split.known)}; remove the seed to keep a hand-written split"
            )
    return split


def seeded_split(
    dataset: str, num_classes: int, num_known: int, seed: int, split_dir: str | Path = SPLIT_DIR
) -> tuple[OpenSetSplit, bool]:
    """(the seeded split, whether split_dir holds its file): read from split_dir when the file exists (and
    checked), else made. Nothing is written: the caller saves a new split (save_split) beside its results."""
    split = make_split(dataset, num_classes, num_known, seed)
    path = Path(split_dir) / f"{split.tag}.json"
    if path.exists():
        return load_split(path), True
    return split, False


def seeded_splits(
    dataset: str, num_known: int, seeds: list[int], split_dir: str | Path | None = None
) -> tuple[list[OpenSetSplit], list[OpenSetSplit]]:
    """(the seeded splits of `dataset`, those of them without a file in split_dir yet: the caller saves
    them beside its results); split_dir None: the committed SPLIT_DIR."""
    found = [
        seeded_split(dataset, DATASET_CLASSES[dataset], num_known, s, split_dir or SPLIT_DIR) for s in seeds
    ]
    return [split for split, _ in found], [split for split, on_disk in found if not on_disk]
