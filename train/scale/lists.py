"""Image lists of the large real-noise datasets, parsed from their distributed formats
(docs/design.md, "Datasets and noise").

    mini-WebVision   info/train_filelist_google.txt ("google/qNNNN/x.jpg label"): keep label < 50 over
                     the whole file (the list is not sorted by label); info/val_filelist.txt, images
                     under val_images_256/.
    ILSVRC12 val     the same 50 classes: devkit ILSVRC2012_ID (1-based, meta.mat order, NOT sorted) ->
                     wnid -> index among the sorted 1000 wnids; keep index < 50. Flat val/ files with
                     the devkit ground truth, or val/<wnid>/ folders (all 1000).
    Clothing1M       {noisy,clean}_label_kv.txt ("images/... label") and key lists noisy_train,
                     clean_val, clean_test; each split takes its labels from its own kv file.

Every parser raises FileNotFoundError / ValueError naming the file (and line) it could not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MINI_WEBVISION_CLASSES = 50
CLOTHING1M_CLASSES = 14
DEVKIT_DIRS = ("ILSVRC2012_devkit_t12/data", ".")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
ID_WNID_TEXT = "ilsvrc2012_id_wnid.txt"  # plain-text alternative to meta.mat: "ILSVRC2012_ID wnid" per line


@dataclass
class ImageList:
    """Image files (paths relative to root) with int64 labels."""

    name: str
    root: Path
    paths: list[str]
    labels: np.ndarray
    num_classes: int
    notes: dict = field(default_factory=dict)  # counts found while parsing (e.g. unlabelled keys)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute_paths(self) -> list[str]:
        return [str(self.root / p) for p in self.paths]

    def subset(self, keep: np.ndarray) -> ImageList:
        """The entries where the boolean mask (or index array) `keep` selects."""
        index = np.flatnonzero(keep) if keep.dtype == bool else keep
        return ImageList(
            self.name,
            self.root,
            [self.paths[i] for i in index],
            self.labels[index],
            self.num_classes,
            dict(self.notes),
        )


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_path_label_file(path: Path) -> tuple[list[str], np.ndarray]:
    """Lines "relative/path label" (the path may contain spaces: the label is the last field)."""
    paths, labels = [], []
    for n, line in enumerate(_require(path, "list file").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'path label', got {line!r}")
        paths.append(rel.strip())
        labels.append(int(label))
    return paths, np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------------------------ mini-WebVision
def webvision_train(root: str | Path, num_classes: int = MINI_WEBVISION_CLASSES) -> ImageList:
    """The Google training list filtered to labels < num_classes (every line is looked at)."""
    root = Path(root)
    paths, labels = read_path_label_file(root / "info" / "train_filelist_google.txt")
    keep = labels < num_classes
    return ImageList("webvision_train", root, paths, labels, num_classes).subset(keep)


def webvision_val(root: str | Path, num_classes: int = MINI_WEBVISION_CLASSES) -> ImageList:
    root = Path(root)
    paths, labels = read_path_label_file(root / "info" / "val_filelist.txt")
    keep = labels < num_classes
    return ImageList("webvision_val", root / "val_images_256", paths, labels, num_classes).subset(keep)


def webvision_synsets(root: str | Path) -> list[str] | None:
    """info/synsets.txt: line k is the wnid of WebVision class k (None when the file is absent)."""
    path = Path(root) / "info" / "synsets.txt"
    return (
        [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else None
    )


# ------------------------------------------------------------------------------------ ILSVRC12 val
def read_ilsvrc_synsets(path: str | Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the 1000 classes, from the devkit's meta.mat (needs scipy) or from a
    plain-text file of "ILSVRC2012_ID wnid" lines."""
    path = _require(Path(path), "ILSVRC12 synset table")
    if path.suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError as exc:
            raise ImportError(
                f"reading {path} needs scipy (pip install scipy), or give a text file "
                f"{ID_WNID_TEXT} with 'ILSVRC2012_ID wnid' lines"
            ) from exc
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1].startswith("n"):
            raise ValueError(f"{path}:{n}: expected 'ILSVRC2012_ID wnid', got {line!r}")
        table[int(parts[0])] = parts[1]
    return table


def _find_devkit_file(root: Path, names: tuple[str, ...]) -> Path:
    candidates = [root / d / name for name in names for d in DEVKIT_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"none of {[str(c) for c in candidates]} exists")


def ilsvrc12_val(root: str | Path, num_classes: int = MINI_WEBVISION_CLASSES) -> ImageList:
    """ILSVRC12 validation images of the first num_classes sorted wnids, labelled by sorted-wnid index.

    root holds val/: either 1000 wnid folders, or the flat ILSVRC2012_val_*.JPEG files with the devkit
    ground truth and synset table (meta.mat or ilsvrc2012_id_wnid.txt) under
    root/ILSVRC2012_devkit_t12/data/ or root/.
    """
    root = Path(root)
    val = root / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"ILSVRC12 val folder not found: {val}")
    folders = sorted(p.name for p in val.iterdir() if p.is_dir() and p.name.startswith("n"))
    if folders:
        if len(folders) != 1000:
            raise ValueError(
                f"{val} has {len(folders)} wnid folders; the sorted-index mapping needs all 1000"
            )
        paths, labels = [], []
        for index, wnid in enumerate(folders[:num_classes]):
            files = sorted(f.name for f in (val / wnid).iterdir() if f.is_file())
            paths += [f"{wnid}/{f}" for f in files]
            labels += [index] * len(files)
        return ImageList("ilsvrc12_val", val, paths, np.asarray(labels, dtype=np.int64), num_classes)
    truth = _find_devkit_file(root, (GROUND_TRUTH,))
    id_to_wnid = read_ilsvrc_synsets(_find_devkit_file(root, ("meta.mat", ID_WNID_TEXT)))
    if len(id_to_wnid) != 1000:
        raise ValueError(f"ILSVRC12 synset table has {len(id_to_wnid)} leaf classes, expected 1000")
    sorted_index = {wnid: k for k, wnid in enumerate(sorted(id_to_wnid.values()))}
    ids = [int(t) for t in truth.read_text().split()]
    try:
        labels = np.asarray([sorted_index[id_to_wnid[i]] for i in ids], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"{truth}: ILSVRC2012_ID {exc.args[0]} is not in the synset table") from exc
    paths = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(ids) + 1)]
    return ImageList("ilsvrc12_val", val, paths, labels, num_classes).subset(labels < num_classes)


def check_webvision_matches_ilsvrc(synsets: list[str] | None, num_classes: int) -> None:
    """WebVision class k must be the k-th sorted ILSVRC wnid, or ILSVRC accuracy is meaningless."""
    if synsets is not None and synsets[:num_classes] != sorted(synsets)[:num_classes]:
        raise ValueError(
            "info/synsets.txt: the first WebVision classes are not the first sorted wnids; "
            "ILSVRC12 labels would not match WebVision labels"
        )


# ------------------------------------------------------------------------------------ Clothing1M
CLOTHING1M_SPLITS = {  # split -> (key list, label file)
    "train": ("noisy_train_key_list.txt", "noisy_label_kv.txt"),
    "val": ("clean_val_key_list.txt", "clean_label_kv.txt"),
    "test": ("clean_test_key_list.txt", "clean_label_kv.txt"),
}


def _clothing1m_annotations(root: Path) -> Path:
    for folder in (root, root / "annotations"):
        if (folder / "noisy_label_kv.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"Clothing1M label files (noisy_label_kv.txt, ...) not found in {root} or {root / 'annotations'}"
    )


def clothing1m(root: str | Path, split: str) -> ImageList:
    """One Clothing1M split; keys ("images/...") are paths relative to root. Keys without a label in
    the split's kv file are dropped and counted in notes["unlabelled"]."""
    if split not in CLOTHING1M_SPLITS:
        raise ValueError(f"Clothing1M split must be one of {sorted(CLOTHING1M_SPLITS)}, got {split!r}")
    root = Path(root)
    annotations = _clothing1m_annotations(root)
    key_file, kv_file = CLOTHING1M_SPLITS[split]
    kv_paths, kv_labels = read_path_label_file(annotations / kv_file)
    label_of = dict(zip(kv_paths, kv_labels.tolist()))
    keys = [
        k.strip() for k in _require(annotations / key_file, "key list").read_text().splitlines() if k.strip()
    ]
    labelled = [k for k in keys if k in label_of]
    labels = np.asarray([label_of[k] for k in labelled], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= CLOTHING1M_CLASSES):
        raise ValueError(
            f"{annotations / kv_file}: labels must be in [0, {CLOTHING1M_CLASSES}), got "
            f"[{labels.min()}, {labels.max()}]"
        )
    return ImageList(
        f"clothing1m_{split}",
        root,
        labelled,
        labels,
        CLOTHING1M_CLASSES,
        {"unlabelled": len(keys) - len(labelled)},
    )


def class_balanced_subset(
    labels: np.ndarray, num_samples: int, num_classes: int, seed: int, epoch: int
) -> np.ndarray:
    """Sorted indices of a class-balanced draw (the usual Clothing1M practice, as in DivideMix): the
    list shuffled with a (seed, epoch) generator, then up to num_samples // num_classes per class.
    The same on every rank and after a resume: it depends only on (seed, epoch)."""
    order = np.random.default_rng((seed, epoch)).permutation(len(labels))
    per_class = num_samples // num_classes
    taken = np.zeros(num_classes, dtype=np.int64)
    keep = []
    for i in order:
        c = labels[i]
        if taken[c] < per_class:
            taken[c] += 1
            keep.append(i)
    return np.sort(np.asarray(keep, dtype=np.int64))


# ------------------------------------------------------------------------------------ dataset specs
LAYOUTS = {  # what a root must hold, for messages about a wrong one
    "webvision": "info/train_filelist_google.txt, info/val_filelist.txt and val_images_256/ (mini-WebVision)",
    "clothing1m": "noisy_label_kv.txt, clean_label_kv.txt and "
    "{noisy_train,clean_val,clean_test}_key_list.txt, "
    "in the root or annotations/",
    "imagenet": "val/ (1000 wnid folders, or flat ILSVRC2012_val_*.JPEG with the devkit's ground truth and "
    "meta.mat or ilsvrc2012_id_wnid.txt)",
}


@dataclass
class DatasetSpec:
    """A training list and the evaluation lists; `select` names the split that picks the best epoch,
    `report` the split whose last-epoch top-1 is the result (the official metric; None: `select`)."""

    name: str
    num_classes: int
    train: ImageList
    evals: dict[str, ImageList]
    select: str
    report: str | None = None


def build_dataset(name: str, root: str | Path, num_classes: int = MINI_WEBVISION_CLASSES) -> DatasetSpec:
    """The lists under root. webvision: train + webvision_val (the caller adds ilsvrc12_val from its own
    root); clothing1m: train + clothing1m_val (selection) + clothing1m_test (reported at the last
    epoch, as the official code, and at the selected one)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if name == "webvision":
        check_webvision_matches_ilsvrc(webvision_synsets(root), num_classes)
        evals = {"webvision_val": webvision_val(root, num_classes)}
        return DatasetSpec(name, num_classes, webvision_train(root, num_classes), evals, "webvision_val")
    if name == "clothing1m":
        evals = {f"clothing1m_{s}": clothing1m(root, s) for s in ("val", "test")}
        return DatasetSpec(
            name,
            CLOTHING1M_CLASSES,
            clothing1m(root, "train"),
            evals,
            "clothing1m_val",
            report="clothing1m_test",
        )
    raise ValueError(f"dataset must be 'webvision' or 'clothing1m' for imagenet_scale, got {name!r}")
