"""The torch DataLoader path: PIL decoding and train/scale/transforms.py in worker processes, used when
DALI is not installed (or asked for with --loader torch). No torchvision.

Batches are planned globally: the epoch's order is a permutation drawn from (seed, epoch); global batch
k is entries [k*G, (k+1)*G) of it, and rank r takes the r-th slice of G / world_size. So 2 ranks with
batch B/2 see exactly the global batches 1 rank sees with batch B, and an image's augmentation is drawn
from a generator seeded by (seed, epoch, index), whatever the worker, rank or world size. This is what
makes the DDP weights equal a single-process run's (tests/train_scale/test_ddp.py) and a resumed run
equal an uninterrupted one.

Workers return uint8 (H, W, 3) tensors (a quarter of float32's bytes through shared memory); the loop
normalises on the device (train/scale/data.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .lists import ImageList


class ImageListDataset(Dataset):
    """Indexed by (epoch, index): -> ((H, W, 3) uint8 tensor, label)."""

    def __init__(self, images: ImageList, transform, seed: int):
        self.paths, self.labels = images.absolute_paths(), images.labels
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        try:
            with Image.open(self.paths[index]) as image:
                pixels = self.transform(image.convert("RGB"), rng)
        except OSError as exc:
            raise RuntimeError(f"cannot decode {self.paths[index]} ({exc}). --check decode (the default) drops "
                               f"such files before training; if it ran, the file changed since: delete "
                               f"<out_dir>/list_checks/ and restart") from exc
        return torch.from_numpy(np.require(pixels, requirements=["C", "W"])), int(self.labels[index])


def train_batches(indices: np.ndarray, epoch: int, seed: int, global_batch: int, rank: int, world_size: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of (epoch, index): a (seed, epoch) permutation of `indices`, cut into whole
    global batches (the incomplete last one is dropped), rank r taking slice r of each."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    order = indices[np.random.default_rng((seed, epoch)).permutation(len(indices))]
    return [[(epoch, int(i)) for i in order[start + rank * per_rank: start + (rank + 1) * per_rank]]
            for start in range(0, len(order) - global_batch + 1, global_batch)]


def eval_batches(num_samples: int, batch: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """This rank's evaluation batches: every world_size-th image from `rank`, each image on one rank."""
    mine = list(range(rank, num_samples, world_size))
    return [[(0, i) for i in mine[s: s + batch]] for s in range(0, len(mine), batch)]


def make_loader(dataset: ImageListDataset, batches: list, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None)


class TorchTrainLoader:
    """Per-epoch training batches for this rank, same interface as DaliTrainLoader."""

    def __init__(self, images: ImageList, transform, global_batch: int, seed: int, rank: int, world_size: int,
                 workers: int, pin_memory: bool):
        self.dataset = ImageListDataset(images, transform, seed)
        self.global_batch, self.seed, self.rank, self.world_size = global_batch, seed, rank, world_size
        self.workers, self.pin_memory = workers, pin_memory

    def epoch(self, epoch: int, indices: np.ndarray) -> DataLoader:
        batches = train_batches(indices, epoch, self.seed, self.global_batch, self.rank, self.world_size)
        return make_loader(self.dataset, batches, self.workers, self.pin_memory)


class TorchEvalLoader:
    """Evaluation batches of one list for this rank (a sized iterable of (images, labels))."""

    def __init__(self, images: ImageList, transform, batch: int, rank: int, world_size: int, workers: int,
                 pin_memory: bool):
        dataset = ImageListDataset(images, transform, seed=0)
        self.loader = make_loader(dataset, eval_batches(len(dataset), batch, rank, world_size), workers, pin_memory)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
