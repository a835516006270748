"""The torch DataLoader path: PIL decoding and train/scale/transforms.py in worker processes, used when
DALI is not installed (or asked for with --loader torch). No torchvision.

Batches are planned globally: the epoch's order is a permutation drawn from (seed, epoch); global batch
k is entries [k*G, (k+1)*G) of it, and rank r takes the r-th slice of G / world_size. So 2 ranks with
batch B/2 see exactly the global batches 1 rank sees with batch B, and an image's augmentation is drawn
from a generator seeded by (seed, epoch, index), whatever the worker, rank or world size. This is what
makes the DDP weights equal a single-process run's (tests/scale/test_ddp_resume.py) and a resumed run
equal an uninterrupted one.

Workers return uint8 (H, W, 3) tensors (a quarter of float32's bytes through shared memory); the loop
normalises on the device (train/scale/data.py).

A file that passed the list check but cannot be decoded now (changed since, or a storage error) does
not stop the run: in training it is replaced by another file of the list drawn from the sample's own
generator (every rank keeps its batch size, which DDP and torch.compile rely on), in evaluation it is
left out (the counts are sums over what was evaluated). Either way it is counted and named in the log
(`bad_files` of each epoch's batches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .lists import ImageList
from .validate import DataFileError

# Replacement draws for an undecodable training file before the run stops: that many bad files in a
# row is a storage failure, not a damaged file.
MAX_REPLACEMENTS = 8


class ImageListDataset(Dataset):
    """Indexed by (epoch, index): -> ((H, W, 3) uint8 tensor or None, label, bad) with bad the index of an
    undecodable file (-1 when there was none). replace=True (training) returns another file of the list
    instead of the bad one; replace=False (evaluation) returns None for it."""

    def __init__(self, images: ImageList, transform, seed: int, replace: bool = True):
        self.paths, self.labels = images.absolute_paths(), images.labels
        self.transform, self.seed, self.replace = transform, seed, replace

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int, rng: np.random.Generator) -> torch.Tensor | None:
        try:
            with Image.open(self.paths[index]) as image:
                pixels = self.transform(image.convert("RGB"), rng)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
        return torch.from_numpy(np.require(pixels, requirements=["C", "W"]))

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        pixels = self._load(index, rng)
        if pixels is not None:
            return pixels, int(self.labels[index]), -1
        for _ in range(MAX_REPLACEMENTS if self.replace else 0):
            other = int(rng.integers(len(self.paths)))
            pixels = self._load(other, rng)
            if pixels is not None:
                return pixels, int(self.labels[other]), index
        return None, int(self.labels[index]), index


def collate(samples: list) -> tuple[torch.Tensor | None, torch.Tensor, list[int], int]:
    """(images (B, H, W, 3) of the decodable samples or None, their labels, indices of bad files, number
    of samples without an image). default_collate stacks into shared memory inside a worker, which
    saves a copy of every batch on its way to the main process."""
    good = [(pixels, label) for pixels, label, _ in samples if pixels is not None]
    bad = [index for _, _, index in samples if index >= 0]
    images, labels = default_collate(good) if good else (None, torch.zeros(0, dtype=torch.int64))
    return images, labels, bad, len(samples) - len(good)


class Batches:
    """A DataLoader over an ImageListDataset as a sized iterable of (images, labels) that collects the
    bad files it met in `bad_files` (list indices). Evaluation skips a batch left empty; training stops
    with a DataFileError when a sample has no image at all (a shorter batch on one rank would desync DDP)."""

    def __init__(self, dataset: ImageListDataset, batches: list, workers: int, pin_memory: bool):
        self.dataset, self.bad_files = dataset, []
        self.loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=pin_memory,
            collate_fn=collate,
            prefetch_factor=4 if workers else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.bad_files = []
        for images, labels, bad, missing in self.loader:
            self.bad_files += bad
            if missing and self.dataset.replace:
                path = self.dataset.paths[bad[-1]]
                raise DataFileError(
                    f"{path} and {MAX_REPLACEMENTS} files drawn to replace it could not be decoded: "
                    f"is the storage under {Path(path).parent} still readable?"
                )
            if images is not None:
                yield images, labels


def train_batches(
    indices: np.ndarray, epoch: int, seed: int, global_batch: int, rank: int, world_size: int
) -> list[list[tuple[int, int]]]:
    """This rank's batches of (epoch, index): a (seed, epoch) permutation of `indices`, cut into whole
    global batches (the incomplete last one is dropped), rank r taking slice r of each."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    order = indices[np.random.default_rng((seed, epoch)).permutation(len(indices))]
    return [
        [(epoch, int(i)) for i in order[start + rank * per_rank : start + (rank + 1) * per_rank]]
        for start in range(0, len(order) - global_batch + 1, global_batch)
    ]


def eval_batches(num_samples: int, batch: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's evaluation batches: every world_size-th image from `rank`, each image on one rank."""
    mine = list(range(rank, num_samples, world_size))
    return [[(0, i) for i in mine[s : s + batch]] for s in range(0, len(mine), batch)]


class TorchTrainLoader:
    """Per-epoch training batches for this rank, same interface as DaliTrainLoader."""

    def __init__(
        self,
        images: ImageList,
        transform,
        global_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        pin_memory: bool,
    ):
        self.dataset = ImageListDataset(images, transform, seed)
        self.global_batch, self.seed, self.rank, self.world_size = global_batch, seed, rank, world_size
        self.workers, self.pin_memory = workers, pin_memory

    def epoch(self, epoch: int, indices: np.ndarray) -> Batches:
        batches = train_batches(indices, epoch, self.seed, self.global_batch, self.rank, self.world_size)
        return Batches(self.dataset, batches, self.workers, self.pin_memory)


class TorchEvalLoader(Batches):
    """Evaluation batches of one list for this rank (a sized iterable of (images, labels))."""

    def __init__(
        self,
        images: ImageList,
        transform,
        batch: int,
        rank: int,
        world_size: int,
        workers: int,
        pin_memory: bool,
    ):
        dataset = ImageListDataset(images, transform, seed=0, replace=False)
        super().__init__(dataset, eval_batches(len(dataset), batch, rank, world_size), workers, pin_memory)
