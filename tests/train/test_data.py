"""Loaders on small files written in the real on-disk formats, the safe unpicklers, the tuning split for
every noise type, and the batched augmentations."""

import gzip
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from train.config import load_config
from train.data import build_data, load_raw
from train.data.augment import prepare_batch, random_crop, random_flip, random_rotation
from train.data.cifar import read_batch
from train.data.cifarn import read_human_labels
from train.data.download import DatasetNotFound
from train.data.mnist import read_idx


def write_cifar10(root, per_batch=12, test=20, seed=0, protocol=2):
    """cifar-10-batches-py as the official archive has it: 5 training pickles + test_batch, each a dict
    with a uint8 (n, 3072) 'data' array (R, G, B planes) and a 'labels' list."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        batch = {
            "batch_label": f"{name} of 5",
            "labels": y,
            "data": data,
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        images.append(data)
        labels.append(y)
    return np.concatenate(images[:5]), np.concatenate(labels[:5]), images[5], np.array(labels[5])


def as_numpy1_pickle(data: bytes) -> bytes:
    """A protocol-2 pickle as numpy 1.x (and the official Python 2 files) name the array helpers."""
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_load_in_torchvision_order(tmp_path, protocol):
    train_x, train_y, _test_x, test_y = write_cifar10(tmp_path, protocol=protocol)
    raw = load_raw("cifar10", str(tmp_path), download=False)
    assert raw.train_x.shape == (60, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert (raw.train_y == train_y).all() and (raw.test_y == test_y).all()
    # row layout: 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major
    assert raw.train_x[7, 1, 2, 3].item() == train_x[7, 1024 + 2 * 32 + 3]
    assert raw.augment == "crop_flip" and raw.num_classes == 10


def test_numpy1_style_batches_load(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    original = path.read_bytes()
    assert b"numpy._core.multiarray" in original or b"numpy.core.multiarray" in original
    path.write_bytes(as_numpy1_pickle(original))
    assert read_batch(path)["data"].shape == (12, 3072)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in [("train", 30), ("test", 10)]:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": list(range(n)),
            "coarse_labels": [i // 5 for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    raw = load_raw("cifar100", str(tmp_path), download=False)
    assert raw.num_classes == 100 and (raw.train_y == np.arange(30)).all()
    assert raw.augment == "crop_flip_rotate"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Exploit(), "labels": [0]}, protocol=2))
    with pytest.raises(
        pickle.UnpicklingError, match="refusing to load posix.system|refusing to load os.system"
    ):
        read_batch(path)


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_mnist_idx_files(tmp_path, gz):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (9, 28, 28)), 2051),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, 9), 2049),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (4, 28, 28)), 2051),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 4), 2049),
    }
    for name, (array, magic) in arrays.items():
        write_idx(raw_dir / (name + (".gz" if gz else "")), array, magic)
    raw = load_raw("mnist", str(tmp_path), download=False)
    assert raw.train_x.shape == (9, 1, 28, 28) and raw.test_x.shape == (4, 1, 28, 28)
    assert (raw.train_x[:, 0].numpy() == arrays["train-images-idx3-ubyte"][0]).all()
    assert (raw.test_y == arrays["t10k-labels-idx1-ubyte"][0]).all()


def test_idx_rejects_a_bad_magic_number(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    write_idx(path, np.zeros(3), 1234)
    with pytest.raises(ValueError, match="magic 1234"):
        read_idx(path)


def test_missing_files_name_the_expected_path(tmp_path):
    cfg = load_config(None, {"dataset": "mnist", "data_root": str(tmp_path), "download": False})
    with pytest.raises(DatasetNotFound, match=r"MNIST/raw.*train-images-idx3-ubyte"):
        build_data(cfg)
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py.*data_batch_1"):
        load_raw("cifar10", str(tmp_path), download=False)


def write_cifar10n(root, clean, worse, numpy1_names=False):
    """CIFAR-10_human.pt as released: torch.save of a dict of numpy int64 arrays."""
    path = root / "CIFAR-10_human.pt"
    torch.save(
        {
            "clean_label": np.asarray(clean, np.int64),
            "worse_label": np.asarray(worse, np.int64),
            "aggre_label": np.asarray(clean, np.int64),
        },
        path,
    )
    if numpy1_names:  # rewrite the pickle inside the zip archive as numpy 1.x wrote it
        with zipfile.ZipFile(path) as zf:
            entries = {info.filename: zf.read(info) for info in zf.infolist()}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in entries.items():
                zf.writestr(name, as_numpy1_pickle(data) if name.endswith("data.pkl") else data)
    return path


@pytest.mark.parametrize("numpy1_names", [False, True])
def test_cifar10n_file_loads_without_arbitrary_unpickling(tmp_path, numpy1_names):
    clean = np.arange(20) % 10
    path = write_cifar10n(tmp_path, clean, (clean + 1) % 10, numpy1_names)
    stored = read_human_labels(path)
    assert (stored["worse_label"] == (clean + 1) % 10).all() and stored["clean_label"].dtype == np.int64


def test_cifar10n_file_with_an_object_is_refused(tmp_path):
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": np.zeros(3, np.int64), "worse_label": _Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_human_labels(path)


@pytest.fixture
def fake_cifar(tmp_path):
    _train_x, train_y, _, _ = write_cifar10(tmp_path, per_batch=40)
    rng = np.random.default_rng(3)
    worse = np.where(rng.random(len(train_y)) < 0.4, (train_y + 3) % 10, train_y)
    write_cifar10n(tmp_path, train_y, worse)
    return tmp_path, train_y, worse


def cfg_for(root, **kw):
    return load_config(
        None,
        {"dataset": "cifar10", "data_root": str(root), "download": False, "model": "cnn8", "seed": 4, **kw},
    )


@pytest.mark.parametrize("noise_type", ["none", "sym", "asym", "instance", "human"])
def test_tuning_split_works_for_every_noise_type(fake_cifar, noise_type):
    root, clean, worse = fake_cifar
    full = build_data(cfg_for(root, noise_type=noise_type, noise_rate=0.4))
    tune = build_data(cfg_for(root, noise_type=noise_type, noise_rate=0.4, tuning=True))
    n = len(clean)
    assert full.eval_split == "test" and tune.eval_split == "val"
    assert len(tune.train_y) == int(0.8 * n) and len(tune.eval_y) == n - int(0.8 * n)
    train_idx = tune.train_index.numpy()
    val_idx = np.setdiff1d(np.arange(n), train_idx)
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(val_idx) == len(tune.eval_y)
    assert (tune.eval_y.numpy() == clean[val_idx]).all(), "validation labels must be the clean ones"
    assert (tune.train_y.numpy() == full.train_y.numpy()[train_idx]).all(), "same noisy labels as a full run"
    assert (tune.train_y_clean.numpy() == clean[train_idx]).all()
    if noise_type == "human":
        assert (full.train_y.numpy() == worse).all()
    if noise_type != "none":
        assert full.flipped.any()


def test_cifar10n_alias_and_clean_label_check(fake_cifar):
    root, clean, worse = fake_cifar
    data = build_data(load_config(None, {"dataset": "cifar10n", "data_root": str(root), "download": False}))
    assert data.noise.noise_type == "human" and (data.train_y.numpy() == worse).all()
    write_cifar10n(root, (clean + 1) % 10, worse)  # clean_label of another ordering
    with pytest.raises(ValueError, match="clean_label does not match"):
        build_data(load_config(None, {"dataset": "cifar10n", "data_root": str(root), "download": False}))


def test_digits_split_is_fixed_and_stratified():
    a, b = load_raw("digits"), load_raw("digits")
    assert a.train_x.shape == (1347, 1, 8, 8) and a.test_x.shape == (450, 1, 8, 8)
    assert (a.test_y == b.test_y).all() and (a.test_x == b.test_x).all()
    assert np.bincount(a.test_y).min() >= 17 and a.train_x.max() == 16


def test_random_crop_takes_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_flip_and_rotation():
    x = torch.rand(16, 3, 8, 8)
    flipped = random_flip(x, torch.Generator().manual_seed(1))
    same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    mirrored = [torch.equal(f, o.flip(2)) for f, o in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    assert torch.equal(random_rotation(x, 0.0, torch.Generator().manual_seed(0)), x)
    assert not torch.equal(random_rotation(x, 20.0, torch.Generator().manual_seed(0)), x)


def test_prepare_batch_normalises_and_is_reproducible():
    raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    kw = {"pixel_scale": 255.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    plain = prepare_batch(raw, **kw)
    torch.testing.assert_close(plain, (raw.float() / 255 - 0.5) / 0.25)
    a = prepare_batch(raw, augment="crop_flip_rotate", gen=torch.Generator().manual_seed(9), **kw)
    b = prepare_batch(raw, augment="crop_flip_rotate", gen=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a, b) and a.shape == raw.shape and not torch.equal(a, plain)
