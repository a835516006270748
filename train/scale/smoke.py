"""Generated JPEG trees in the real on-disk layouts (docs/design.md, "Datasets and noise"), for the smoke
job, the tests and the loader benchmark:

    mini-WebVision   <root>/google/qNNNN/*.jpg, <root>/val_images_256/*.jpg,
                     <root>/info/{train_filelist_google.txt, val_filelist.txt, synsets.txt}
    ILSVRC12 val     <root>/val/ILSVRC2012_val_NNNNNNNN.JPEG (flat) and the devkit's
                     <root>/ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt,
                     ilsvrc2012_id_wnid.txt}  (devkit ILSVRC2012_IDs are a permutation, not sorted order)
    Clothing1M       <root>/images/D/DD/*.jpg, <root>/{noisy,clean}_label_kv.txt,
                     <root>/{noisy_train,clean_val,clean_test}_key_list.txt

Image content depends on the class (a hue per class, a gradient, a few shapes, mild noise), so a model
can learn something and JPEG entropy looks like a photo's rather than pure noise. Each tree can include
missing and corrupt files, which list validation must find before training starts.
"""

from __future__ import annotations

import colorsys
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# 1000 distinct synthetic WordNet ids, increasing, so "sorted wnid order" is the class order.
SYNTHETIC_WNIDS = [f"n{10_000_000 + 7919 * k:08d}" for k in range(1000)]
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"
ID_WNID_TEXT = "ilsvrc2012_id_wnid.txt"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
COMPLETE = ".complete"


def synthetic_image(
    label: int, num_classes: int, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """(height, width, 3) uint8: the class's hue, a random gradient, three random rectangles, noise."""
    r, g, b = colorsys.hsv_to_rgb(label / max(num_classes, 1), 0.8, 0.9)
    base = np.array([r, g, b], np.float32) * 255
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None]
    img = base * (0.7 + 0.3 * ramp) + rng.normal(0, 6, (height, width, 3))
    for _ in range(3):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(2, max(3, width // 3)), y0 + rng.integers(2, max(3, height // 3))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(
    path: Path, label: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator
) -> None:
    """A synthetic JPEG (quality 90) at path; size = (min side, max side), drawn per image."""
    width, height = (int(rng.integers(size[0], size[1] + 1)) for _ in range(2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_image(label, num_classes, width, height, rng)).save(path, quality=90)


def corrupt_file(path: Path, kind: str) -> None:
    """Makes path unreadable as an image: "truncated" keeps the first 40% of a valid JPEG's bytes,
    "garbage" replaces it with bytes that are no image at all."""
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
    else:
        path.write_bytes(b"this is not a JPEG" * 8)


def make_webvision_tree(
    root: str | Path,
    *,
    num_classes: int = 50,
    extra_classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (48, 64),
    missing: int = 1,
    corrupt: int = 2,
    seed: int = 0,
) -> dict:
    """A mini-WebVision tree. The train list has classes >= num_classes interleaved (as the real Google
    list does), so a filter that stops at the first larger label drops images. `missing` listed files
    are never written, `corrupt` are damaged (alternately truncated and garbage); both come from
    classes < num_classes. Returns the counts a correct parser and validator must find."""
    root, rng = Path(root), np.random.default_rng(seed)
    lines = []
    for label in range(num_classes + extra_classes):
        for i in range(train_per_class):
            query = 2 * label + i % 2 + 1  # two Google queries per class
            lines.append((f"google/q{query:04d}/{label}_{i}.jpg", label))
    lines = [lines[i] for i in rng.permutation(len(lines))]
    kept = [line for line in lines if line[1] < num_classes]
    bad = [rel for rel, _ in kept[: missing + corrupt]]
    for rel, label in lines:
        if rel not in bad[:missing]:
            write_jpeg(root / rel, label, num_classes, size, rng)
    for k, rel in enumerate(bad[missing:]):
        corrupt_file(root / rel, "truncated" if k % 2 == 0 else "garbage")
    val = [
        (f"val{n + 1:06d}.jpg", label)
        for n, label in enumerate(
            lab for lab in range(num_classes + extra_classes) for _ in range(val_per_class)
        )
    ]
    for name, label in val:
        write_jpeg(root / "val_images_256" / name, label, num_classes, size, rng)
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "train_filelist_google.txt").write_text("".join(f"{rel} {label}\n" for rel, label in lines))
    (info / "val_filelist.txt").write_text("".join(f"{name} {label}\n" for name, label in val))
    (info / "synsets.txt").write_text(
        "".join(f"{wnid} synthetic class {k}\n" for k, wnid in enumerate(SYNTHETIC_WNIDS))
    )
    return {
        "train_listed": len(kept),
        "train_missing": missing,
        "train_corrupt": corrupt,
        "val": num_classes * val_per_class,
        "num_classes": num_classes,
    }


def make_ilsvrc12_tree(
    root: str | Path,
    *,
    classes: int = 53,
    per_class: int = 2,
    size: tuple[int, int] = (48, 64),
    num_classes: int = 50,
    seed: int = 1,
) -> dict:
    """ILSVRC12 val as distributed: flat val/ILSVRC2012_val_*.JPEG, the devkit ground truth (one
    ILSVRC2012_ID per image, 1-based) and a plain-text "ID wnid" synset table whose ID order is a
    random permutation of the sorted wnids (like meta.mat's). Images are drawn for the first `classes`
    sorted classes, in shuffled file order. Returns {file name: sorted-wnid index} for the tests."""
    root, rng = Path(root), np.random.default_rng(seed)
    id_order = rng.permutation(1000)  # ILSVRC2012_ID k + 1 -> SYNTHETIC_WNIDS[id_order[k]]
    id_of_sorted_index = {int(s): k + 1 for k, s in enumerate(id_order)}
    labels = [c for c in range(classes) for _ in range(per_class)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    expected = {}
    for n, label in enumerate(labels, start=1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        write_jpeg(root / "val" / name, label, num_classes, size, rng)
        expected[name] = label
    data = root / DEVKIT_DATA
    data.mkdir(parents=True, exist_ok=True)
    (data / GROUND_TRUTH).write_text("".join(f"{id_of_sorted_index[label]}\n" for label in labels))
    (data / ID_WNID_TEXT).write_text(
        "".join(f"{k + 1} {SYNTHETIC_WNIDS[s]}\n" for k, s in enumerate(id_order))
    )
    return expected


CLOTHING1M_CLASSES = 14


def make_clothing1m_tree(
    root: str | Path,
    *,
    train_per_class: int = 6,
    clean_per_class: int = 2,
    size: tuple[int, int] = (48, 64),
    noise: float = 0.3,
    seed: int = 2,
) -> dict:
    """A Clothing1M tree: noisy training images (labels flipped with probability `noise`), clean val
    and test images, a few images with both a noisy and a clean label (different ones), and one
    training key that is absent from noisy_label_kv.txt. Returns expected counts."""
    root, rng = Path(root), np.random.default_rng(seed)
    C, counter = CLOTHING1M_CLASSES, iter(range(10**6))

    def new_image(label: int) -> str:
        k = next(counter)
        key = f"images/{k % 10}/{k % 100:02d}/{k:06d}{rng.integers(10**6):06d}.jpg"
        write_jpeg(root / key, label, C, size, rng)
        return key

    noisy_kv, clean_kv = {}, {}
    train = []
    for label in range(C):
        for _ in range(train_per_class):
            key = new_image(label)
            flip = rng.random() < noise
            noisy_kv[key] = int((label + rng.integers(1, C)) % C) if flip else label
            train.append(key)
    splits = {"val": [], "test": []}
    for keys in splits.values():
        for label in range(C):
            for _ in range(clean_per_class):
                key = new_image(label)
                clean_kv[key] = label
                keys.append(key)
    for key in train[:3]:  # in both label files, with different labels: each split reads its own
        clean_kv[key] = (noisy_kv[key] + 1) % C
    unlabelled = new_image(0)
    train.append(unlabelled)  # listed for training, but no noisy label: must be counted and dropped
    (root / "noisy_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in noisy_kv.items()))
    (root / "clean_label_kv.txt").write_text("".join(f"{k} {v}\n" for k, v in clean_kv.items()))
    (root / "noisy_train_key_list.txt").write_text("".join(f"{k}\n" for k in train))
    (root / "clean_val_key_list.txt").write_text("".join(f"{k}\n" for k in splits["val"]))
    (root / "clean_test_key_list.txt").write_text("".join(f"{k}\n" for k in splits["test"]))
    return {
        "train": C * train_per_class,
        "train_unlabelled": 1,
        "val": C * clean_per_class,
        "test": C * clean_per_class,
        "noisy_kv": noisy_kv,
        "clean_kv": clean_kv,
    }


def make_smoke_tree(root: str | Path, seed: int = 0) -> Path:
    """The smoke job's data: mini-WebVision (300 listed training images of 50 classes, one missing and
    two corrupt ones to show validation at work) with ILSVRC12 val under <root>/imagenet. Written once,
    into a temporary folder renamed to root when complete: smoke jobs started together never read a
    half-written tree (the first rename wins, the others use its tree)."""
    root = Path(root)
    if (root / COMPLETE).exists():
        return root
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_webvision_tree(tmp, train_per_class=6, val_per_class=2, size=(56, 88), seed=seed)
    make_ilsvrc12_tree(tmp / "imagenet", classes=52, per_class=2, size=(56, 88), seed=seed + 1)
    (tmp / COMPLETE).write_text("generated by train/scale/smoke.py\n")
    try:
        os.rename(tmp, root)
    except OSError:  # root exists: another job's tree, or an incomplete one of an older version
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / COMPLETE).exists():
            raise
    return root
