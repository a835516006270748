"""The DALI CPU pipelines (device_id=None): shapes, dtypes, labels, and sharding -- within an epoch the
shards are disjoint, evaluation covers every image once, training runs the same number of steps on
every rank, and an epoch's global order depends only on (seed, epoch), not on the world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.scale.support import SIZE, needs_dali
from train.scale.lists import ImageList, webvision_train, webvision_val
from train.scale.smoke import corrupt_file, make_webvision_tree
from train.scale.validate import DataFileError, check_list, drop_bad

pytestmark = needs_dali


@pytest.fixture(scope="module")
def clean_train(webvision_tree):
    from train.scale.distributed import DistContext

    images = webvision_train(webvision_tree[0])
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    return drop_bad(images, check_list(images, "decode", ctx, None, threads=2), 0.05)


def _spec(**kw):
    from train.scale.dali_pipeline import PipelineSpec

    return PipelineSpec(crop=32, resize=36, decode_device="cpu", device_id=None, threads=2, **kw)


def with_ids(images: ImageList) -> ImageList:
    """The same files labelled 0..N-1, so a batch's labels say which files it holds."""
    return ImageList(images.name, images.root, images.paths, np.arange(len(images)), len(images))


def epoch_ids(images, world, batch, epoch, seed=7):
    from train.scale.dali_pipeline import DaliTrainLoader

    per_rank = []
    for rank in range(world):
        loader = DaliTrainLoader(with_ids(images), batch, _spec(), seed, rank, world)
        batches = loader.epoch(epoch, np.arange(len(images)))
        per_rank.append([labels.tolist() for _, labels in batches])
        assert len(per_rank[-1]) == len(batches)
    return per_rank


def test_train_batches_shapes_dtypes_and_normalisation(clean_train):
    from train.scale.dali_pipeline import DaliTrainLoader

    for fp16, dtype in ((False, torch.float32), (True, torch.float16)):
        loader = DaliTrainLoader(clean_train, 8, _spec(fp16=fp16, color_jitter=True), 1, 0, 1)
        images, labels = next(iter(loader.epoch(0, np.arange(len(clean_train)))))
        assert images.shape == (8, 32, 32, 3) and images.dtype == dtype and images.device.type == "cpu"
        assert labels.dtype == torch.int64 and labels.shape == (8,) and set(labels.tolist()) <= set(range(50))
        assert -2.2 < images.float().min() < 0 < images.float().max() < 2.7  # ImageNet-normalised pixels


def test_cutout_zeroes_a_square(clean_train):
    from train.scale.dali_pipeline import DaliTrainLoader

    loader = DaliTrainLoader(clean_train, 8, _spec(cutout=16), 1, 0, 1)
    images, _ = next(iter(loader.epoch(0, np.arange(len(clean_train)))))
    zero_pixels = (images == 0).all(-1).flatten(1).sum(1)
    assert (zero_pixels > 0).all() and (zero_pixels <= 16 * 16).all()


@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_are_disjoint_and_equal_in_length(clean_train, world):
    per_rank = epoch_ids(clean_train, world, batch=8, epoch=0)
    steps = {len(r) for r in per_rank}
    assert len(steps) == 1 and steps.pop() >= 1
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert len(seen) == len(set(seen)), "a sample appeared twice in one epoch"
    assert len(clean_train) - len(seen) < world * 8, "DROP may only cut each shard's incomplete last batch"


def test_epoch_order_depends_on_seed_and_epoch_not_world_size(clean_train):
    even = clean_train.subset(np.arange(96))  # equal shards: nothing dropped, so the orders can be compared

    def global_order(world, epoch):
        return [i for rank in epoch_ids(even, world, batch=1, epoch=epoch) for batch in rank for i in batch]

    one = global_order(1, epoch=3)
    assert one == global_order(2, epoch=3) == global_order(1, epoch=3)
    assert sorted(one) == list(range(96))
    assert one != global_order(1, epoch=4) and one != sorted(one)


@pytest.mark.parametrize("world", [1, 3])
def test_eval_shards_cover_every_image_once(webvision_tree, world):
    from train.scale.dali_pipeline import DaliEvalLoader

    val = with_ids(webvision_val(webvision_tree[0]))
    seen, steps = [], set()
    for rank in range(world):
        loader = DaliEvalLoader(val, 7, _spec(), rank, world)
        for _ in range(2):  # a second pass (auto_reset) gives the same shard
            labels = [i for _, batch in loader for i in batch.tolist()]
        steps.add(len(loader))
        seen += labels
    assert sorted(seen) == list(range(len(val))) and len(steps) == 1


def test_train_pipeline_needs_a_gpu_for_mixed_decoding():
    from train.scale.dali_pipeline import PipelineSpec

    with pytest.raises(ValueError, match="device_id=None"):
        PipelineSpec(crop=32, resize=36, decode_device="mixed", device_id=None, threads=1)
    with pytest.raises(ValueError, match="'gpu'"):
        PipelineSpec(crop=32, resize=36, decode_device="gpu", device_id=0, threads=1)


def test_a_file_damaged_after_the_check_stops_dali_with_one_line(tmp_path):
    # DALI cannot skip a sample: the loop gets a DataFileError (one line for the user), not DALI's
    # multi-line "Critical error in pipeline"
    from train.scale.dali_pipeline import DaliTrainLoader

    root = tmp_path / "tree"
    make_webvision_tree(
        root, train_per_class=1, extra_classes=0, val_per_class=1, size=SIZE, missing=0, corrupt=0
    )
    val = webvision_val(root)
    corrupt_file(val.root / val.paths[1], "garbage")
    loader = DaliTrainLoader(val, 8, _spec(), 1, 0, 1)
    with pytest.raises(
        DataFileError, match=r"DALI could not decode a file of the list \(.+; DALI does not say"
    ):
        for _ in loader.epoch(0, np.arange(len(val))):  # raised at the first prefetch or while iterating
            pass
