"""The torch DataLoader path: globally planned batches (ranks' slices of one global batch), eval
coverage, per-sample augmentation that does not depend on workers or ranks, and files that break
after the list check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.scale.lists import webvision_val
from train.scale.smoke import corrupt_file, make_webvision_tree
from train.scale.torch_loader import (
    ImageListDataset,
    TorchEvalLoader,
    TorchTrainLoader,
    eval_batches,
    train_batches,
)
from train.scale.transforms import EvalTransform, TrainTransform
from train.scale.validate import DataFileError


def test_ranks_take_slices_of_the_single_process_global_batches():
    indices = np.arange(100, 203)
    single = train_batches(indices, epoch=2, seed=5, global_batch=12, rank=0, world_size=1)
    ranks = [train_batches(indices, epoch=2, seed=5, global_batch=12, rank=r, world_size=3) for r in range(3)]
    assert len(single) == 103 // 12 and all(len(r) == len(single) for r in ranks)
    for k, batch in enumerate(single):
        assert batch == ranks[0][k] + ranks[1][k] + ranks[2][k]
    drawn = [i for batch in single for _, i in batch]
    assert len(set(drawn)) == len(drawn) == 96 and set(drawn) <= set(indices.tolist())
    assert single != train_batches(indices, epoch=3, seed=5, global_batch=12, rank=0, world_size=1)
    with pytest.raises(ValueError, match="not divisible by the world size 5"):
        train_batches(indices, epoch=0, seed=0, global_batch=12, rank=0, world_size=5)


def test_eval_batches_cover_every_index_once():
    seen = sorted(i for r in range(3) for batch in eval_batches(23, 4, r, 3) for _, i in batch)
    assert seen == list(range(23))


def test_samples_are_seeded_by_epoch_and_index(webvision_tree):
    dataset = ImageListDataset(
        webvision_val(webvision_tree[0]), TrainTransform(32, color_jitter=True), seed=3
    )
    a, label, bad = dataset[(1, 4)]
    assert a.shape == (32, 32, 3) and a.dtype == torch.uint8 and label == dataset.labels[4] and bad == -1
    assert torch.equal(a, dataset[(1, 4)][0]) and not torch.equal(a, dataset[(2, 4)][0])


def test_eval_loader_with_workers_returns_every_image(webvision_tree):
    val = webvision_val(webvision_tree[0])
    loader = TorchEvalLoader(
        val, EvalTransform(32, 36), batch=16, rank=0, world_size=1, workers=2, pin_memory=False
    )
    labels = torch.cat([y for _, y in loader])
    images = next(iter(loader))[0]
    assert images.shape == (16, 32, 32, 3) and labels.tolist() == val.labels.tolist()


def test_a_file_damaged_after_the_check_is_replaced_in_training_and_left_out_in_evaluation(tmp_path):
    # The list check ran before; the files broke since. Training keeps every batch whole (DDP ranks must
    # agree on the step count and torch.compile on the shape), evaluation counts only what it decoded.
    root = tmp_path / "tree"
    make_webvision_tree(
        root, train_per_class=1, extra_classes=0, val_per_class=1, size=(36, 48), missing=0, corrupt=0
    )
    val = webvision_val(root)
    corrupt_file(val.root / val.paths[2], "garbage")
    (val.root / val.paths[5]).unlink()
    train = TorchTrainLoader(
        val, TrainTransform(32), global_batch=10, seed=0, rank=0, world_size=1, workers=0, pin_memory=False
    )
    batches = train.epoch(0, np.arange(len(val)))
    assert [len(labels) for _, labels in batches] == [10] * 5 and sorted(batches.bad_files) == [2, 5]
    evaluation = TorchEvalLoader(
        val, EvalTransform(32, 36), batch=16, rank=0, world_size=1, workers=1, pin_memory=False
    )
    labels = torch.cat([y for _, y in evaluation])
    assert labels.tolist() == np.delete(val.labels, [2, 5]).tolist() and sorted(evaluation.bad_files) == [
        2,
        5,
    ]


def test_training_stops_with_one_line_when_no_file_can_be_read(tmp_path):
    root = tmp_path / "tree"
    make_webvision_tree(
        root, train_per_class=1, extra_classes=0, val_per_class=1, size=(36, 48), missing=0, corrupt=0
    )
    val = webvision_val(root)
    for path in val.paths:
        (val.root / path).unlink()  # the storage went away
    train = TorchTrainLoader(
        val, TrainTransform(32), global_batch=10, seed=0, rank=0, world_size=1, workers=0, pin_memory=False
    )
    with pytest.raises(DataFileError, match="could not be decoded: is the storage under .* still readable"):
        next(iter(train.epoch(0, np.arange(len(val)))))
