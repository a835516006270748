"""List parsing for the three real formats, against the trees train/scale/smoke.py wrote."""

from __future__ import annotations

import numpy as np
import pytest

from train.scale import lists
from train.scale.smoke import SYNTHETIC_WNIDS, make_ilsvrc12_tree


def test_webvision_filter_reads_the_whole_file(webvision_tree):
    root, expected, _ = webvision_tree
    listing = (root / "info/train_filelist_google.txt").read_text()
    raw = [int(line.split()[-1]) for line in listing.splitlines()]
    first_large = next(i for i, label in enumerate(raw) if label >= 50)
    assert any(label < 50 for label in raw[first_large:]), "the tree must interleave labels >= 50"
    train = lists.webvision_train(root)
    assert len(train) == expected["train_listed"] == sum(label < 50 for label in raw)
    assert train.labels.max() < 50 and train.num_classes == 50
    assert all(p.startswith("google/q") for p in train.paths)
    assert (train.root / train.paths[-1]).parent.parent.name == "google"


def test_webvision_val_lives_under_val_images_256(webvision_tree):
    root, expected, _ = webvision_tree
    val = lists.webvision_val(root)
    assert len(val) == expected["val"] and val.root == root / "val_images_256"
    assert all((val.root / p).is_file() for p in val.paths)
    assert np.bincount(val.labels).tolist() == [1] * 50


def test_ilsvrc_maps_devkit_ids_through_wnids_to_sorted_index(webvision_tree):
    root, _, truth = webvision_tree
    val = lists.ilsvrc12_val(root / "imagenet")
    expected = {name: label for name, label in truth.items() if label < 50}
    assert dict(zip(val.paths, val.labels.tolist())) == expected
    ground_truth = root / "imagenet" / lists.DEVKIT_DIRS[0] / lists.GROUND_TRUTH
    ids = [int(t) for t in ground_truth.read_text().split()]
    naive = {f"ILSVRC2012_val_{n:08d}.JPEG": i - 1 for n, i in enumerate(ids, 1)}  # ID - 1 as the class
    assert sum(naive[name] == label for name, label in expected.items()) < len(expected) // 2


def test_ilsvrc_meta_mat_matches_text_table(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    make_ilsvrc12_tree(tmp_path, classes=4, per_class=1, size=(16, 16))
    text = tmp_path / lists.DEVKIT_DIRS[0] / lists.ID_WNID_TEXT
    table = lists.read_ilsvrc_synsets(text)
    records = np.zeros(1001, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, (i, wnid) in enumerate(table.items()):
        records[k] = (i, wnid, 0)
    records[1000] = (1001, "n00000001", 5)  # an inner node of the hierarchy: not a class
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": records})
    assert lists.read_ilsvrc_synsets(tmp_path / "meta.mat") == table


def test_ilsvrc_wnid_folders_need_all_1000(tmp_path):
    val = tmp_path / "val"
    for wnid in SYNTHETIC_WNIDS[::-1]:
        (val / wnid).mkdir(parents=True)
    (val / SYNTHETIC_WNIDS[3] / "a.JPEG").write_bytes(b"")
    (val / SYNTHETIC_WNIDS[60] / "b.JPEG").write_bytes(b"")
    images = lists.ilsvrc12_val(tmp_path)
    assert images.paths == [f"{SYNTHETIC_WNIDS[3]}/a.JPEG"] and images.labels.tolist() == [3]
    (val / SYNTHETIC_WNIDS[0]).rmdir()
    with pytest.raises(ValueError, match="999 wnid folders"):
        lists.ilsvrc12_val(tmp_path)


def test_webvision_synsets_must_start_with_the_sorted_wnids():
    lists.check_webvision_matches_ilsvrc(SYNTHETIC_WNIDS, 50)
    swapped = [SYNTHETIC_WNIDS[1], SYNTHETIC_WNIDS[0], *SYNTHETIC_WNIDS[2:]]
    with pytest.raises(ValueError, match="synsets.txt"):
        lists.check_webvision_matches_ilsvrc(swapped, 50)


def test_clothing1m_each_split_reads_its_own_labels(clothing_tree):
    root, expected = clothing_tree
    train, val, test = (lists.clothing1m(root, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (expected["train"], expected["val"], expected["test"])
    assert train.notes["unlabelled"] == expected["train_unlabelled"]
    assert dict(zip(train.paths, train.labels.tolist())) == {k: v for k, v in expected["noisy_kv"].items()}
    assert all(expected["clean_kv"][k] == v for k, v in zip(val.paths, val.labels.tolist()))
    assert all((root / p).is_file() for p in train.paths[:5]) and train.paths[0].startswith("images/")
    with pytest.raises(ValueError, match="split must be one of"):
        lists.clothing1m(root, "clean_train")


def test_class_balanced_subset_is_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [50, 20, 5, 25])
    a = lists.class_balanced_subset(labels, 40, 4, seed=1, epoch=0)
    assert np.bincount(labels[a], minlength=4).tolist() == [10, 10, 5, 10]
    assert np.array_equal(a, lists.class_balanced_subset(labels, 40, 4, seed=1, epoch=0))
    assert not np.array_equal(a, lists.class_balanced_subset(labels, 40, 4, seed=1, epoch=1))


def test_path_label_file_allows_spaces_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("dir/cute kitten.jpg 3\n\nb.jpg 0\n")
    paths, labels = lists.read_path_label_file(good)
    assert paths == ["dir/cute kitten.jpg", "b.jpg"] and labels.tolist() == [3, 0]
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1\nno_label_here\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        lists.read_path_label_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        lists.read_path_label_file(tmp_path / "missing.txt")


def test_build_dataset_names_bad_arguments(tmp_path, webvision_tree):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lists.build_dataset("webvision", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'cifar10'"):
        lists.build_dataset("cifar10", webvision_tree[0])
    spec = lists.build_dataset("webvision", webvision_tree[0])
    assert list(spec.evals) == ["webvision_val"] and spec.select == "webvision_val"
