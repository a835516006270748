"""List validation: missing and corrupt files are found before training, counted, cached and dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.run_dirs import UserError
from train.scale.distributed import DistContext
from train.scale.lists import webvision_train
from train.scale.smoke import corrupt_file, make_webvision_tree
from train.scale.validate import check_file, check_list, describe, drop_bad

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def test_decode_check_finds_missing_truncated_and_garbage(webvision_tree, tmp_path):
    root, expected, _ = webvision_tree
    images = webvision_train(root)
    result = check_list(images, "decode", SINGLE, tmp_path, threads=2)
    assert len(result.missing) == expected["train_missing"]
    assert len(result.corrupt) == expected["train_corrupt"]
    assert {check_file(str(root / images.paths[i]), "header") for i in result.corrupt} == {"corrupt"}
    exists = check_list(images, "exists", SINGLE, None, threads=1)
    assert len(exists.missing) == expected["train_missing"] and exists.corrupt == []
    line = describe(result, images)
    assert f"{len(images)} listed, 1 missing, 2 corrupt -> {len(images) - 3} used" in line
    assert images.paths[result.missing[0]] in line


def test_only_the_decode_level_catches_a_file_truncated_after_its_header(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
    corrupt_file(path, "truncated")
    assert check_file(str(path), "header") is None and check_file(str(path), "decode") == "corrupt"
    assert check_file(str(tmp_path / "absent.jpg"), "header") == "missing"


def test_check_is_cached_per_list_and_level(webvision_tree, tmp_path):
    images = webvision_train(webvision_tree[0])
    first = check_list(images, "decode", SINGLE, tmp_path, threads=2)
    again = check_list(images, "decode", SINGLE, tmp_path, threads=2)
    assert (
        not first.cached and again.cached and (again.missing, again.corrupt) == (first.missing, first.corrupt)
    )
    assert "(cached check)" in describe(again, images)
    assert not check_list(images.subset(images.labels < 10), "decode", SINGLE, tmp_path, threads=1).cached


def test_cached_check_sees_files_damaged_or_deleted_since(tmp_path):
    # The cache was keyed by the list alone: a file damaged after the first check stayed "fine", and
    # the next run died mid-epoch. Now a changed size or modification time sends the file to the check.
    root = tmp_path / "tree"
    make_webvision_tree(
        root, train_per_class=1, extra_classes=0, val_per_class=1, size=(36, 48), missing=0, corrupt=0
    )
    images = webvision_train(root)
    cache = tmp_path / "cache"
    assert check_list(images, "decode", SINGLE, cache, threads=2).bad == 0
    corrupt_file(root / images.paths[3], "truncated")
    (root / images.paths[7]).unlink()
    again = check_list(images, "decode", SINGLE, cache, threads=2)
    assert (again.corrupt, again.missing) == ([3], [7])
    assert again.rechecked == 1 and not again.cached  # the deleted file needs a stat, not a decode
    assert "1 new or changed file(s) checked" in describe(again, images)
    assert len(drop_bad(images, again, 0.05)) == len(images) - 2
    third = check_list(images, "decode", SINGLE, cache, threads=2)  # the new verdicts were cached
    assert third.cached and (third.corrupt, third.missing) == ([3], [7])
    (cache / next(cache.iterdir()).name).write_bytes(b"garbage")  # a damaged cache is a full check, no error
    assert check_list(images, "decode", SINGLE, cache, threads=2).rechecked == -1


def test_drop_bad_removes_entries_and_refuses_a_wrong_root(webvision_tree, tmp_path):
    images = webvision_train(webvision_tree[0])
    result = check_list(images, "decode", SINGLE, None, threads=2)
    kept = drop_bad(images, result, max_bad_fraction=0.05)
    assert len(kept) == len(images) - 3
    bad = {images.paths[i] for i in result.missing + result.corrupt}
    assert not bad & set(kept.paths)
    with pytest.raises(UserError, match="--max_bad_fraction 0.01: exceeded"):
        drop_bad(images, result, max_bad_fraction=0.01)
    with pytest.raises(ValueError, match="check level"):
        check_list(images, "full", SINGLE, None, threads=1)
