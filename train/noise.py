"""Label-noise generators. Each returns (noisy labels, NoiseRecord); the record is saved beside the run.

Conventions (docs/design.md, "Datasets and noise"; https://github.com/Virusdoll/Active-Negative-Loss):

- asym: exactly floor(eta * n_i) samples of each source class i are flipped to its partner class
  (MNIST / digits 7->1, 2->7, 5<->6, 3->8; CIFAR-10 9->1, 2->0, 3<->5, 4->7; CIFAR-100 k -> next class
  in its block of 5, cyclic). The ANL code's exact-count rule.
- sym: the ANL / APL convention: T = (1 - eta) on the diagonal, eta / (C - 1) elsewhere (the true class
  is never a flip target), realised by exact counts: floor(eta / (C - 1) * n_i) samples of class i go to
  each other class j. The realised rate is therefore slightly below eta when eta * n_i / (C - 1) is not
  an integer.
- instance: Xia et al. 2020 (part-dependent) on raw [0, 1] pixels: per-sample flip rate ~ normal(eta, 0.1)
  truncated to [0, 1]; W ~ N(0, 1) of shape (C, D, C); row i of the transition is flip_i * softmax(x_i W[y_i])
  with the true class masked, plus 1 - flip_i on the true class. float64 numpy on the CPU, so the labels
  are a function of the seed only.
- human: labels from a file (CIFAR-10N worse_label, CIFAR-100N noisy_label); see train/data/cifarn.py.

All random draws come from numpy.random.default_rng(seed); nothing touches global RNG state.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .run_dirs import UserError

NOISE_TYPES = ("none", "sym", "asym", "instance", "human")
INSTANCE_NORM_STD = 0.1

# source -> noisy label; digits uses the MNIST map (both are hand-written digits 0-9)
ASYM_FLIPS = {
    "mnist": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
    "cifar10": {9: 1, 2: 0, 3: 5, 5: 3, 4: 7},
}
ASYM_FLIPS["digits"] = ASYM_FLIPS["mnist"]


@dataclass
class NoiseRecord:
    """What was done to the labels: enough to audit and reproduce it."""

    noise_type: str
    noise_rate: float  # requested eta (ignored for human noise)
    seed: int
    num_samples: int
    realised_rate: float  # fraction of labels that differ from the clean ones
    transition_counts: list  # (C, C): [clean][noisy] sample counts
    source: str = ""  # generator / file the labels came from
    extra: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def transition_counts(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 matrix: entry [i, j] = number of samples with clean label i and noisy label j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (clean, noisy), 1)
    return counts


def _record(noise_type, rate, seed, clean, noisy, num_classes, source, **extra) -> NoiseRecord:
    return NoiseRecord(
        noise_type=noise_type,
        noise_rate=float(rate),
        seed=int(seed),
        num_samples=len(clean),
        realised_rate=float((clean != noisy).mean()) if len(clean) else 0.0,
        transition_counts=transition_counts(clean, noisy, num_classes).tolist(),
        source=source,
        extra=extra,
    )


def symmetric_transition(num_classes: int, rate: float) -> np.ndarray:
    T = np.full((num_classes, num_classes), rate / (num_classes - 1))
    np.fill_diagonal(T, 1 - rate)
    return T


def has_asymmetric_map(dataset: str) -> bool:
    return dataset == "cifar100" or dataset in ASYM_FLIPS


def asymmetric_transition(dataset: str, num_classes: int, rate: float) -> np.ndarray:
    """The dataset's class-flip map as a row-stochastic (C, C) matrix."""
    T = np.eye(num_classes)
    if dataset == "cifar100":
        for k in range(num_classes):
            T[k, k], T[k, k - k % 5 + (k + 1) % 5] = 1 - rate, rate
        return T
    if not has_asymmetric_map(dataset):
        raise UserError(
            f"noise_type=asym: no asymmetric flip map for dataset {dataset!r}; "
            f"have {sorted(ASYM_FLIPS)} and cifar100"
        )
    for src, dst in ASYM_FLIPS[dataset].items():
        T[src, src], T[src, dst] = 1 - rate, rate
    return T


def flip_exact_counts(labels: np.ndarray, T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each class i, floor(T[i, j] * n_i) randomly chosen samples of class i get label j (j != i)."""
    noisy = labels.copy()
    for i in range(len(T)):
        members = rng.permutation(np.flatnonzero(labels == i))
        start = 0
        for j in range(len(T)):
            if j == i:
                continue
            # the 1e-9 keeps floor(0.4 * 50) from becoming 19 through 0.4 * 50 = 19.999...
            count = math.floor(T[i, j] * len(members) + 1e-9)
            noisy[members[start : start + count]] = j
            start += count
    return noisy


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, size: int) -> np.ndarray:
    """Samples of normal(mean, std) truncated to [0, 1], by inverting the CDF (float64)."""
    bounds = torch.tensor([(0 - mean) / std, (1 - mean) / std], dtype=torch.float64)
    lo, hi = torch.special.ndtr(bounds).tolist()
    u = torch.from_numpy(rng.uniform(lo, hi, size))
    return (mean + std * torch.special.ndtri(u)).clamp(0, 1).numpy()


def instance_dependent(
    labels: np.ndarray,
    images: torch.Tensor,
    pixel_scale: float,
    num_classes: int,
    rate: float,
    seed: int,
    norm_std: float = INSTANCE_NORM_STD,
) -> tuple[np.ndarray, NoiseRecord]:
    """Xia et al. 2020 part-dependent noise. images: (N, ...) raw pixels, divided by pixel_scale -> [0, 1]."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    flip_rate = _truncated_normal(rng, rate, norm_std, n)
    features = images.reshape(n, -1)
    probs = np.empty((n, num_classes))
    # W is drawn one class slice at a time (the same stream as one (C, D, C) draw) so CIFAR-100's
    # 100 x 3072 x 100 float64 tensor (245 MB) never exists at once.
    for c in range(num_classes):
        W_c = rng.standard_normal((features.shape[1], num_classes))
        rows = np.flatnonzero(labels == c)
        x = features[torch.from_numpy(rows)].double().numpy() / pixel_scale
        scores = x @ W_c
        scores[:, c] = -np.inf
        scores = np.exp(scores - scores.max(1, keepdims=True))
        probs[rows] = flip_rate[rows, None] * scores / scores.sum(1, keepdims=True)
        probs[rows, c] += 1 - flip_rate[rows]
    cdf = np.cumsum(probs, axis=1)
    u = rng.uniform(0, 1, n) * cdf[:, -1]
    noisy = (cdf < u[:, None]).sum(1).astype(labels.dtype)
    record = _record(
        "instance",
        rate,
        seed,
        labels,
        noisy,
        num_classes,
        "Xia et al. 2020 part-dependent",
        norm_std=norm_std,
        mean_flip_rate=float(flip_rate.mean()),
    )
    return noisy, record


def apply_noise(
    noise_type: str,
    rate: float,
    labels: np.ndarray,
    num_classes: int,
    *,
    dataset: str,
    seed: int,
    images: torch.Tensor | None = None,
    pixel_scale: float = 255.0,
    human_labels: np.ndarray | None = None,
    human_source: str = "",
) -> tuple[np.ndarray, NoiseRecord]:
    """Noisy labels for `labels` (clean, (N,) int64) and the record of what was done.

    images / pixel_scale: needed by instance noise; human_labels: needed by human noise.
    Raises ValueError for an unknown noise type, a rate outside [0, 1] or a missing input (Config.validate
    catches the first two as UserErrors), UserError for an asymmetric noise without a flip map.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {rate}")
    labels = np.asarray(labels, dtype=np.int64)
    if noise_type == "none" or (rate == 0.0 and noise_type != "human"):
        return labels.copy(), _record(noise_type, rate, seed, labels, labels, num_classes, "clean labels")
    if noise_type == "human":
        if human_labels is None:
            raise ValueError("human noise needs the human labels (CIFAR-10N / CIFAR-100N file)")
        noisy = np.asarray(human_labels, dtype=np.int64)
        return noisy.copy(), _record("human", rate, seed, labels, noisy, num_classes, human_source)
    if noise_type == "instance":
        if images is None:
            raise ValueError("instance-dependent noise needs the training images")
        return instance_dependent(labels, images, pixel_scale, num_classes, rate, seed)
    if noise_type == "sym":
        T, source = symmetric_transition(num_classes, rate), "symmetric, exact counts, true class excluded"
    else:
        T = asymmetric_transition(dataset, num_classes, rate)
        source = f"asymmetric {dataset} map, exact counts"
    noisy = flip_exact_counts(labels, T, np.random.default_rng(seed))
    return noisy, _record(noise_type, rate, seed, labels, noisy, num_classes, source)
