"""Open-set splits (reproducible from the seed, committed files checked), the known / unknown cut of a
dataset in both modes (drop, relabel), the constant-drainage model, and the SVHN loader on files written
in the real format."""

import json

import numpy as np
import pytest
import torch

from drainage_fast import fused_drainage_loss
from drainage_fast.openset import open_set_scores
from train.data import load_raw, tuning_split
from train.data.download import DatasetNotFound
from train.openset.data import NO_KNOWN_LABEL, build_open_set_data
from train.openset.runs import ConstantDrainageLogit, build_method_model
from train.openset.splits import SPLIT_DIR, OpenSetSplit, load_split, make_split, save_split, seeded_split


def test_committed_digits_splits_are_what_their_seeds_give():
    splits = [load_split(SPLIT_DIR / f"digits_6-4_seed{s}.json") for s in range(5)]
    for s, split in enumerate(splits):
        rng_known = sorted(np.random.default_rng(s).permutation(10)[:6].tolist())  # the rule, written out
        assert list(split.known) == rng_known and split.seed == s
        assert sorted(split.known + split.unknown) == list(range(10))
    assert len({split.known for split in splits}) == 5, "five different splits"


def test_split_files_are_read_and_checked_never_written(tmp_path):
    first, on_disk = seeded_split("mnist", 10, 6, 7, tmp_path)
    path = tmp_path / "mnist_6-4_seed7.json"
    assert not on_disk and not path.exists()  # the command saves a new split beside its results
    save_split(first, path)
    assert seeded_split("mnist", 10, 6, 7, tmp_path) == (first, True)
    assert make_split("mnist", 10, 6, 7).known == first.known
    record = json.loads(path.read_text())
    known, unknown = record["known"], record["unknown"]
    record["known"], record["unknown"] = unknown[:2] + known[2:], known[:2] + unknown[2:]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="seed 7 gives known classes"):
        seeded_split("mnist", 10, 6, 7, tmp_path)


def test_hand_written_split_round_trips_and_bad_splits_are_refused(tmp_path):
    split = OpenSetSplit("digits", 10, (0, 1, 2, 3, 4, 5, 6), (7, 8, 9))
    assert load_split(save_split(split, tmp_path / "mine.json")).known == split.known
    with pytest.raises(ValueError, match="partition"):
        OpenSetSplit("digits", 10, (0, 1, 2), (2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="num_known"):
        make_split("digits", 10, 10, 0)


@pytest.fixture(scope="module")
def digits():
    return load_raw("digits")


def test_drop_mode_keeps_only_known_classes_relabelled_in_order(digits):
    split = make_split("digits", 10, 6, 0)
    osd = build_open_set_data(digits, split, seed=1)
    d = osd.data
    original = digits.train_y[d.train_index.numpy()]
    assert np.isin(original, split.known).all()
    assert (np.isin(digits.train_y, split.known).sum(), d.num_classes) == (len(d.train_y), 6)
    assert (np.array(split.known)[d.train_y.numpy()] == original).all() and not d.flipped.any()
    # the test set is cut into known and unknown, nothing lost
    assert len(osd.known_eval_index) + len(osd.unknown_eval_index) == len(digits.test_y)
    assert (np.array(split.known)[d.eval_y.numpy()] == digits.test_y[osd.known_eval_index]).all()
    assert np.isin(osd.unknown_eval_label, split.unknown).all() and len(osd.unknown_x) == len(
        osd.unknown_eval_label
    )
    assert torch.equal(osd.unknown_x, digits.test_x[torch.from_numpy(osd.unknown_eval_index)])


def test_tuning_mode_never_touches_the_test_set(digits):
    osd = build_open_set_data(digits, make_split("digits", 10, 6, 0), seed=1, tuning=True)
    train_part, val_part = tuning_split(len(digits.train_y))
    assert osd.data.eval_split == "val"
    assert set(osd.data.train_index.tolist()) <= set(train_part.tolist())
    assert sorted([*osd.known_eval_index, *osd.unknown_eval_index]) == val_part.tolist()
    assert torch.equal(osd.unknown_x, digits.train_x[torch.from_numpy(osd.unknown_eval_index)])


def test_relabel_mode_gives_the_unknown_training_images_random_known_labels(digits):
    split = load_split(SPLIT_DIR / "digits_789.json")
    a = build_open_set_data(digits, split, seed=1, unknown_train="relabel")
    b = build_open_set_data(digits, split, seed=1, unknown_train="relabel")
    c = build_open_set_data(digits, split, seed=2, unknown_train="relabel")
    is_789 = np.isin(digits.train_y, [7, 8, 9])
    assert len(a.data.train_y) == len(digits.train_y)  # every image kept
    assert (a.data.flipped.numpy() == is_789).all()
    assert (a.data.train_y_clean.numpy()[is_789] == NO_KNOWN_LABEL).all()
    assert (a.data.train_y.numpy()[~is_789] == digits.train_y[~is_789]).all()
    given = a.data.train_y.numpy()[is_789]
    assert given.min() >= 0 and given.max() <= 6
    counts = np.bincount(given, minlength=7)  # uniform: about 399 / 7 = 57 each
    assert counts.min() > 30, counts
    assert torch.equal(a.data.train_y, b.data.train_y) and not torch.equal(a.data.train_y, c.data.train_y)
    assert a.data.noise.realised_rate == pytest.approx(is_789.mean())
    assert np.array(a.data.noise.transition_counts)[7:].sum() == is_789.sum()


def test_constant_drainage_logit_model():
    torch.manual_seed(0)
    model = build_method_model("drainage_const", "digits_mlp", 6, drainage_logit=2.5)
    assert isinstance(model, ConstantDrainageLogit)
    x = torch.randn(5, 1, 8, 8)
    z = model(x)
    assert z.shape == (5, 7) and (z[:, -1] == 2.5).all()
    loss = fused_drainage_loss(z, torch.tensor([0, 1, 2, 3, 5]), alpha=1.0, beta=1.0, backend="reference")
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert "value" in model.state_dict() and not any(p.shape == () for p in model.parameters())
    assert build_method_model("drainage", "digits_mlp", 6)(x).shape == (5, 7)
    assert build_method_model("ce", "digits_mlp", 6)(x).shape == (5, 6)


def test_constant_logit_is_a_shift_and_p_d_is_a_function_of_energy():
    """Why drainage_logit hardly matters, and why p_d ranks like energy for the constant variant: the
    loss of [z, c] is the loss of [z - c, 0], and p_d = sigmoid(c + energy) with energy = -logsumexp(z)."""
    z, c = torch.randn(8, 5, dtype=torch.float64), 1.7
    target = torch.arange(8) % 5
    with_c = torch.cat([z, torch.full((8, 1), c, dtype=torch.float64)], 1)
    with_0 = torch.cat([z - c, torch.zeros(8, 1, dtype=torch.float64)], 1)
    kw = {"alpha": 1.0, "beta": 1.0, "reduction": "none", "backend": "reference"}
    torch.testing.assert_close(
        fused_drainage_loss(with_c, target, **kw), fused_drainage_loss(with_0, target, **kw)
    )
    s = open_set_scores(with_c)
    torch.testing.assert_close(s["p_d"], torch.sigmoid(c + s["energy"]))


def svhn_arrays(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, 10 = the digit 0, as in the real files
    y[0] = 10
    return x, y


@pytest.mark.parametrize("split_name", ["train_32x32.mat", "test_32x32.mat"])
def test_svhn_mat_files_load(tmp_path, split_name):
    from scipy.io import savemat

    folder = tmp_path / "svhn"
    folder.mkdir()
    arrays = {
        name: svhn_arrays(n, i) for i, (name, n) in enumerate([("train_32x32.mat", 7), ("test_32x32.mat", 5)])
    }
    for name, (x, y) in arrays.items():
        savemat(folder / name, {"X": x, "y": y})
    raw = load_raw("svhn", str(tmp_path), download=False)
    x, y = arrays[split_name]
    images, labels = (
        (raw.train_x, raw.train_y) if split_name.startswith("train") else (raw.test_x, raw.test_y)
    )
    assert images.shape == (len(y), 3, 32, 32) and images.dtype == torch.uint8
    n, c, h, w = 2, 1, 5, 30
    assert images[n, c, h, w] == x[h, w, c, n]
    assert labels[0] == 0 and (labels[1:] == y[1:, 0] % 10).all()
    assert raw.num_classes == 10 and len(raw.mean) == 3


def test_svhn_missing_files_and_bad_labels(tmp_path):
    from scipy.io import savemat

    with pytest.raises(DatasetNotFound, match="train_32x32.mat"):
        load_raw("svhn", str(tmp_path), download=False)
    folder = tmp_path / "svhn"
    folder.mkdir()
    x, y = svhn_arrays(4, 0)
    y[1] = 0
    for name in ("train_32x32.mat", "test_32x32.mat"):
        savemat(folder / name, {"X": x, "y": y})
    with pytest.raises(ValueError, match="labels must be 1..10"):
        load_raw("svhn", str(tmp_path), download=False)
