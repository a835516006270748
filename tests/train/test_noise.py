"""Noise generators: exact per-class counts, the flip maps of docs/design.md, the transition counts in the
record, reproducibility from the seed, and the realised rate of instance-dependent noise."""

import json
import math

import numpy as np
import pytest
import torch

from train.noise import apply_noise, asymmetric_transition, instance_dependent, transition_counts

# docs/design.md, "Datasets and noise", written out again here (not imported) so a wrong map in
# train/noise.py fails
MNIST_MAP = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
CIFAR10_MAP = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}


def labels_with_counts(counts):
    rng = np.random.default_rng(0)
    return rng.permutation(np.concatenate([np.full(n, c) for c, n in enumerate(counts)])).astype(np.int64)


@pytest.mark.parametrize(
    "dataset, flips", [("mnist", MNIST_MAP), ("digits", MNIST_MAP), ("cifar10", CIFAR10_MAP)]
)
@pytest.mark.parametrize("rate", [0.2, 0.4, 0.45])
def test_asymmetric_flips_exact_counts_along_the_map(dataset, flips, rate):
    counts = [53, 61, 47, 50, 58, 44, 39, 72, 50, 66]  # unequal classes: floor(rate * n_i) per class
    clean = labels_with_counts(counts)
    noisy, record = apply_noise("asym", rate, clean, 10, dataset=dataset, seed=3)
    T = transition_counts(clean, noisy, 10)
    for src in range(10):
        if src in flips:
            assert T[src, flips[src]] == math.floor(rate * counts[src] + 1e-9)
            assert T[src, src] == counts[src] - math.floor(rate * counts[src] + 1e-9)
        else:
            assert T[src, src] == counts[src]
    assert (T.sum(1) == counts).all()
    assert record.transition_counts == T.tolist()
    assert record.realised_rate == pytest.approx((noisy != clean).mean())


def test_cifar100_asymmetric_is_cyclic_within_blocks_of_five():
    clean = np.repeat(np.arange(100), 10)
    _noisy, record = apply_noise("asym", 0.4, clean, 100, dataset="cifar100", seed=0)
    T = np.array(record.transition_counts)
    for k in range(100):
        nxt = (k // 5) * 5 + (k % 5 + 1) % 5  # 4 -> 0, 9 -> 5, ...
        assert T[k, nxt] == 4 and T[k, k] == 6
    assert T[4, 0] == 4 and T[99, 95] == 4
    assert asymmetric_transition("cifar100", 100, 0.4).sum(1) == pytest.approx(np.ones(100))


def test_symmetric_is_exact_counts_and_never_keeps_the_class_as_a_flip_target():
    clean = np.repeat(np.arange(10), 90)
    _noisy, record = apply_noise("sym", 0.6, clean, 10, dataset="cifar10", seed=1)
    T = np.array(record.transition_counts)
    off = T[~np.eye(10, dtype=bool)]
    assert (off == math.floor(0.6 / 9 * 90)).all()  # 6 per (i, j != i) cell
    assert record.realised_rate == pytest.approx(54 / 90)


@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_reproducible_from_the_seed(kind):
    clean = np.repeat(np.arange(10), 40)
    a, _ = apply_noise(kind, 0.4, clean, 10, dataset="mnist", seed=7)
    b, _ = apply_noise(kind, 0.4, clean, 10, dataset="mnist", seed=7)
    c, _ = apply_noise(kind, 0.4, clean, 10, dataset="mnist", seed=8)
    assert (a == b).all() and (a != c).any()


def test_instance_noise_realised_rate_and_reproducibility():
    g = torch.Generator().manual_seed(0)
    N, C = 2000, 10
    images = torch.randint(0, 256, (N, 3, 4, 4), generator=g, dtype=torch.uint8)
    clean = torch.randint(0, C, (N,), generator=g).numpy()
    noisy, record = instance_dependent(clean, images, 255.0, C, 0.4, seed=5)
    # per-sample flip rates ~ truncated normal(0.4, 0.1): mean 0.4; binomial sd sqrt(.24 / 2000) = 0.011
    assert record.extra["mean_flip_rate"] == pytest.approx(0.4, abs=0.01)
    assert record.realised_rate == pytest.approx(0.4, abs=0.04)
    again, _ = instance_dependent(clean, images, 255.0, C, 0.4, seed=5)
    other, _ = instance_dependent(clean, images, 255.0, C, 0.4, seed=6)
    assert (noisy == again).all() and (noisy != other).any()
    # flips depend on the image: the same class with other pixels flips to other classes
    T = np.array(record.transition_counts)
    assert (T[~np.eye(C, dtype=bool)] > 0).sum() > C


def test_instance_flip_rates_are_a_truncated_normal():
    """At eta -> 0 (or 1) half the normal is cut off: the mean flip rate is 0.1 * sqrt(2 / pi) = 0.0798
    from the nearer edge, the half-normal mean; an untruncated or clipped normal gives 0.04 or 0."""
    images = torch.rand(4000, 1, 2, 2)
    clean = np.arange(4000) % 3
    _, low = instance_dependent(clean, images, 1.0, 3, 1e-9, seed=0)
    _, high = instance_dependent(clean, images, 1.0, 3, 1.0, seed=0)
    half_normal_mean = 0.1 * math.sqrt(2 / math.pi)
    assert low.extra["mean_flip_rate"] == pytest.approx(half_normal_mean, abs=0.004)
    assert high.extra["mean_flip_rate"] == pytest.approx(1 - half_normal_mean, abs=0.004)
    assert high.realised_rate == pytest.approx(1 - half_normal_mean, abs=0.02)


def test_human_noise_records_the_given_labels():
    clean = np.array([0, 1, 2, 3, 0, 1])
    human = np.array([0, 2, 2, 3, 1, 1])
    noisy, record = apply_noise(
        "human",
        0.0,
        clean,
        4,
        dataset="cifar10",
        seed=0,
        human_labels=human,
        human_source="file[worse_label]",
    )
    assert (noisy == human).all() and record.realised_rate == pytest.approx(2 / 6)
    assert record.transition_counts[1][2] == 1 and record.source == "file[worse_label]"


def test_record_saves_as_json(tmp_path):
    _, record = apply_noise("asym", 0.4, np.repeat(np.arange(10), 5), 10, dataset="mnist", seed=0)
    record.save(tmp_path / "noise.json")
    saved = json.loads((tmp_path / "noise.json").read_text())
    assert saved["noise_type"] == "asym" and len(saved["transition_counts"]) == 10


def test_bad_arguments_are_rejected():
    y = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="noise_type"):
        apply_noise("symmetric", 0.4, y, 10, dataset="mnist", seed=0)
    with pytest.raises(ValueError, match="noise_rate"):
        apply_noise("sym", 1.5, y, 10, dataset="mnist", seed=0)
    with pytest.raises(ValueError, match="asymmetric flip map"):
        apply_noise("asym", 0.4, y, 10, dataset="svhn", seed=0)
    with pytest.raises(ValueError, match="human labels"):
        apply_noise("human", 0.0, y, 10, dataset="cifar10", seed=0)
