"""Every loss against its formula: exact hand-computed values on uniform logits, and a float64 numpy
transcription of the paper formula on random logits (independent of train/losses.py)."""

import math

import numpy as np
import pytest
import torch

from drainage_fast import drainage_loss_reference
from train.losses import LOSSES, build_loss, l1_penalty, num_outputs

A_RCE = -math.log(1e-4)
A_NNCE = -math.log(1e-7)

# Uniform logits over C = 3 classes: p = 1/3 everywhere; target 1. Values worked out by hand.
UNIFORM_3 = {
    "ce": math.log(3),
    "fl": -((2 / 3) ** 0.5) * math.log(1 / 3),                # gamma 0.5
    "mae": 2 / 3,
    "gce": (1 - (1 / 3) ** 0.7) / 0.7,                        # q 0.7
    "rce": A_RCE * 2 / 3,                                     # two off-target entries of 1/3
    "sce": 0.1 * math.log(3) + 1.0 * A_RCE * 2 / 3,           # alpha 0.1, beta 1
    "nce": 1 / 3,                                             # log(1/3) / (3 log(1/3))
    "nfl": 1 / 3,
    "agce": ((1 + 1) ** 2 - (1 + 1 / 3) ** 2) / 2,            # a 1, q 2
    "aul": ((1.5 - 1 / 3) ** 0.9 - 0.5**0.9) / 0.9,           # a 1.5, q 0.9
    "ael": math.exp(-1 / 9),                                  # a 3
    "nnce": 2 / 3,                                            # 1 - (A + log 1/3) / (3 (A + log 1/3))
    "nnfl": 2 / 3,
    "nce_mae": 1 / 3 + 2 / 3,
    "nce_rce": 1 / 3 + A_RCE * 2 / 3,
    "nfl_mae": 1 / 3 + 2 / 3,
    "nfl_rce": 1 / 3 + A_RCE * 2 / 3,
    "nce_agce": 1 / 3 + ((1 + 1) ** 2 - (1 + 1 / 3) ** 2) / 2,
    "nce_aul": 1 / 3 + ((1.5 - 1 / 3) ** 0.9 - 0.5**0.9) / 0.9,
    "nce_ael": 1 / 3 + math.exp(-1 / 9),
    "anl_ce": 1 / 3 + 2 / 3,
    "anl_fl": 1 / 3 + 2 / 3,
    "anl_ce_er": 1 / 3 + 2 / 3,   # the batch-mean prediction is uniform: the entropy term is 0
    # K = 4 outputs, uniform: p_t = p_d = 1/4, p_J = 2/4 -> log(1 + alpha * 3 + beta * 2), alpha = beta = 1
    "drainage": math.log(1 + 3 + 2),
}


def test_every_registered_loss_has_a_hand_computed_value():
    assert set(UNIFORM_3) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_uniform_logits_hand_computed(name):
    K = num_outputs(name, 3)
    loss = build_loss(name, 3)(torch.zeros(2, K, dtype=torch.float64), torch.tensor([1, 1]))
    assert loss.item() == pytest.approx(UNIFORM_3[name], rel=1e-6)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def formula(name, z, t, **hp):
    """Per-sample paper formulas in numpy float64."""
    C = z.shape[1]
    p = softmax(z)
    pt = p[np.arange(len(t)), t]
    onehot = np.eye(C)[t]
    def fl_k(g, logp):
        return -((1 - np.exp(logp)) ** g) * logp

    if name == "ce":
        return -np.log(pt)
    if name == "gce":
        return (1 - np.maximum(pt, 1e-7) ** hp["q"]) / hp["q"]
    if name == "rce":
        return -(np.clip(p, 1e-7, 1) * np.log(np.clip(onehot, 1e-4, 1))).sum(1)
    if name == "nce":
        return np.log(pt) / np.log(p).sum(1)
    if name == "fl":
        return fl_k(hp["gamma"], np.log(pt))
    if name == "nfl":
        fl = fl_k(hp["gamma"], np.log(p))
        return fl[np.arange(len(t)), t] / fl.sum(1)
    if name == "nnce":
        s = -np.log(1e-7) + np.log(np.clip(p, 1e-7, 1))
        return 1 - s[np.arange(len(t)), t] / s.sum(1)
    if name == "nnfl":
        g = hp["gamma"]
        fl = fl_k(g, np.maximum(np.log(p), np.log(1e-7)))
        A = -((1 - 1e-7) ** g) * np.log(1e-7)
        return 1 - (A - fl[np.arange(len(t)), t]) / (C * A - fl.sum(1))
    if name == "agce":
        return ((hp["a"] + 1) ** hp["q"] - (hp["a"] + pt) ** hp["q"]) / hp["q"]
    if name == "aul":
        return ((hp["a"] - pt) ** hp["q"] - (hp["a"] - 1) ** hp["q"]) / hp["q"]
    if name == "ael":
        return np.exp(-pt / hp["a"])
    if name == "mae":
        return np.abs(p - onehot).sum(1) / 2
    raise KeyError(name)


SINGLE = [("ce", {}), ("mae", {}), ("gce", {"q": 0.4}), ("rce", {}), ("nce", {}), ("fl", {"gamma": 2.0}),
          ("nfl", {"gamma": 0.5}), ("nnce", {"min_prob": 1e-7}), ("nnfl", {"gamma": 0.5, "min_prob": 1e-7}),
          ("agce", {"a": 6.0, "q": 1.5}), ("aul", {"a": 6.3, "q": 1.5}), ("ael", {"a": 5.0})]


def random_batch(C=7, N=33, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * scale
    t = torch.randint(0, C, (N,), generator=g)
    return z, t


@pytest.mark.parametrize("name, hp", SINGLE, ids=[s[0] for s in SINGLE])
def test_single_losses_match_formula(name, hp):
    z, t = random_batch()
    got = build_loss(name, 7, **hp)(z, t).item()
    assert got == pytest.approx(formula(name, z.numpy(), t.numpy(), **hp).mean(), rel=1e-5)


@pytest.mark.parametrize("name, parts, hp", [
    ("sce", ("ce", "rce"), {"alpha": 0.3, "beta": 2.0}),
    ("nce_mae", ("nce", "mae"), {"alpha": 2.0, "beta": 0.5}),
    ("nce_rce", ("nce", "rce"), {"alpha": 10.0, "beta": 0.1}),
    ("nfl_rce", ("nfl", "rce"), {"alpha": 1.0, "beta": 1.0, "gamma": 0.5}),
    ("nce_agce", ("nce", "agce"), {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5}),
    ("nce_aul", ("nce", "aul"), {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5}),
    ("nce_ael", ("nce", "ael"), {"alpha": 1.0, "beta": 4.0, "a": 5.0}),
    ("anl_ce", ("nce", "nnce"), {"alpha": 5.0, "beta": 5.0}),
    ("anl_fl", ("nfl", "nnfl"), {"alpha": 5.0, "beta": 5.0, "gamma": 0.5}),
])
def test_combinations_are_weighted_sums(name, parts, hp):
    z, t = random_batch(C=10, seed=1)
    zn, tn = z.numpy(), t.numpy()
    part_hp = {k: v for k, v in hp.items() if k not in ("alpha", "beta")}
    first = formula(parts[0], zn, tn, **part_hp).mean()
    second = formula(parts[1], zn, tn, **part_hp).mean()
    expected = hp["alpha"] * first + hp["beta"] * second
    assert build_loss(name, 10, **hp)(z, t).item() == pytest.approx(expected, rel=1e-5)


def test_anl_ce_er_adds_the_batch_entropy_gap():
    z, t = random_batch(C=5, seed=2)
    p = softmax(z.numpy())
    pbar = p.sum(0) / p.sum()
    gap = math.log(5) + (pbar * np.log(pbar)).sum()
    anl = 5.0 * formula("nce", z.numpy(), t.numpy()).mean() + 5.0 * formula("nnce", z.numpy(),
                                                                            t.numpy()).mean()
    got = build_loss("anl_ce_er", 5, alpha=5.0, beta=5.0, lamb=2.0)(z, t).item()
    assert gap > 1e-3  # random logits: the batch mean is not uniform, so the term is tested
    assert got == pytest.approx(anl + 2.0 * gap, rel=1e-5)


@pytest.mark.parametrize("alpha, beta", [(1.0, None), (0.1, None), (0.5, 3.0)])
def test_drainage_is_the_library_loss_with_drainage_last(alpha, beta):
    z, t = random_batch(C=11, seed=3)
    t = t % 10
    got = build_loss("drainage", 10, alpha=alpha, beta=beta)(z, t)
    expected = drainage_loss_reference(z, t, alpha=alpha, beta=beta, drainage_idx=-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains(name):
    """All of them run forward and backward with finite gradients (the authors' MAE and ANL-CE-ER did not
    run)."""
    z = torch.randn(16, num_outputs(name, 4), requires_grad=True)
    t = torch.randint(0, 4, (16,))
    loss = build_loss(name, 4)(z, t)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bf16_logits_give_fp32_losses():
    z = torch.randn(8, 5).bfloat16()
    t = torch.randint(0, 5, (8,))
    assert build_loss("gce", 5)(z, t).dtype == torch.float32


def test_unknown_names_and_parameters_are_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("cee", 10)
    with pytest.raises(ValueError, match="unknown \\['qq'\\]"):
        build_loss("gce", 10, qq=0.7)
    assert type(build_loss("alpha_dl", 10, alpha=0.1)).__name__ == "Drainage"  # the authors' name


def test_num_outputs_adds_the_drainage_node():
    assert num_outputs("drainage", 10) == 11 and num_outputs("alpha_dl", 100) == 101
    assert num_outputs("ce", 10) == 10 and num_outputs("anl_ce", 100) == 100


def test_l1_penalty_is_sum_of_absolute_parameters():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        model.bias.copy_(torch.tensor([-0.25, 0.75]))
    assert l1_penalty(model).item() == pytest.approx(8.5)
