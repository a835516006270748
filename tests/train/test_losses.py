"""Every loss against its formula: exact hand-computed values on uniform logits, and a float64 numpy
transcription of the paper formula on random logits (independent of train/losses.py)."""

import math
import re

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
    "fl": -((2 / 3) ** 0.5) * math.log(1 / 3),  # gamma 0.5
    "mae": 2 / 3,
    "gce": (1 - (1 / 3) ** 0.7) / 0.7,  # q 0.7
    "rce": A_RCE * 2 / 3,  # two off-target entries of 1/3
    "sce": 0.1 * math.log(3) + 1.0 * A_RCE * 2 / 3,  # alpha 0.1, beta 1
    "nce": 1 / 3,  # log(1/3) / (3 log(1/3))
    "nfl": 1 / 3,
    "agce": ((1 + 1) ** 2 - (1 + 1 / 3) ** 2) / 2,  # a 1, q 2
    "aul": ((1.5 - 1 / 3) ** 0.9 - 0.5**0.9) / 0.9,  # a 1.5, q 0.9
    "ael": math.exp(-1 / 9),  # a 3
    "nnce": 2 / 3,  # 1 - (A + log 1/3) / (3 (A + log 1/3))
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
    "anl_ce_er": 1 / 3 + 2 / 3,  # the batch-mean prediction is uniform: the entropy term is 0
    # K = 4 outputs, uniform: p_t = p_d = 1/4, p_J = 2/4 -> log(1 + alpha * 3 + beta * 2), alpha = beta = 1
    "drainage": math.log(1 + 3 + 2),
    # K = 4, the first epoch: Deep Gamblers with pretrain 0 gambles, -log(p_t + p_d / 2.2) ...
    "gamblers": -math.log(1 / 4 + 1 / 4 / 2.2),
    # ... DAC is in its 10-epoch warm-up, cross-entropy over all K = 4 outputs
    "dac": math.log(4),
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


SINGLE = [
    ("ce", {}),
    ("mae", {}),
    ("gce", {"q": 0.4}),
    ("rce", {}),
    ("nce", {}),
    ("fl", {"gamma": 2.0}),
    ("nfl", {"gamma": 0.5}),
    ("nnce", {"min_prob": 1e-7}),
    ("nnfl", {"gamma": 0.5, "min_prob": 1e-7}),
    ("agce", {"a": 6.0, "q": 1.5}),
    ("aul", {"a": 6.3, "q": 1.5}),
    ("ael", {"a": 5.0}),
]


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


@pytest.mark.parametrize(
    "name, parts, hp",
    [
        ("sce", ("ce", "rce"), {"alpha": 0.3, "beta": 2.0}),
        ("nce_mae", ("nce", "mae"), {"alpha": 2.0, "beta": 0.5}),
        ("nce_rce", ("nce", "rce"), {"alpha": 10.0, "beta": 0.1}),
        ("nfl_rce", ("nfl", "rce"), {"alpha": 1.0, "beta": 1.0, "gamma": 0.5}),
        ("nce_agce", ("nce", "agce"), {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5}),
        ("nce_aul", ("nce", "aul"), {"alpha": 1.0, "beta": 4.0, "a": 6.3, "q": 1.5}),
        ("nce_ael", ("nce", "ael"), {"alpha": 1.0, "beta": 4.0, "a": 5.0}),
        ("anl_ce", ("nce", "nnce"), {"alpha": 5.0, "beta": 5.0}),
        ("anl_fl", ("nfl", "nnfl"), {"alpha": 5.0, "beta": 5.0, "gamma": 0.5}),
    ],
)
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
    anl = (
        5.0 * formula("nce", z.numpy(), t.numpy()).mean() + 5.0 * formula("nnce", z.numpy(), t.numpy()).mean()
    )
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
    assert num_outputs("gamblers", 10) == 11 and num_outputs("DAC", 10) == 11
    assert num_outputs("ce", 10) == 10 and num_outputs("anl_ce", 100) == 100


def test_l1_penalty_is_sum_of_absolute_parameters():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        model.bias.copy_(torch.tensor([-0.25, 0.75]))
    assert l1_penalty(model).item() == pytest.approx(8.5)


# ---- the focal family's gradient: the official code's (focal weight detached) and the differentiated one
# Official: ZKI-PH-ImageAnalysis/Drainage loss.py (commit 3359c4b) FocalLoss line 153, NormalizedFocalLoss
# lines 176-179, NormalizedNegativeFocalLoss lines 198-201: every weight (1 - p_k)^gamma is computed from
# `logpt.data`, a constant for autograd. Below, that gradient written out by hand in numpy float64
# (d log p_k / d z_j = delta_kj - p_j), independent of train/losses.py.
FOCAL_C = 10


def official_focal_gradient(name, z, t, gamma, min_prob=1e-7):
    """d mean_i loss_i / d z (N, C) with every focal weight held constant, as the official code."""
    N, C = z.shape
    p = softmax(z)
    rows = np.arange(N)
    onehot = np.eye(C)[t]
    if name == "fl":  # -w_t log p_t -> w_t (p - e_t)
        w_t = (1 - p[rows, t]) ** gamma
        return w_t[:, None] * (p - onehot) / N
    if name == "nfl":  # u / v, u = -w_t log p_t, v = -sum_k w_k log p_k
        logp, w = np.log(p), (1 - p) ** gamma
        u, v = -(w * logp)[rows, t], -(w * logp).sum(1)
        du = w[rows, t][:, None] * (p - onehot)
        dv = w.sum(1, keepdims=True) * p - w  # sum_k w_k (p_j - delta_kj)
        return (du * v[:, None] - u[:, None] * dv) / v[:, None] ** 2 / N
    if name == "nnfl":  # 1 - (A - FL_t) / (C A - sum FL_k), log p clamped at log(min_prob)
        logp = np.log(p)
        live = logp >= np.log(min_prob)  # the clamp passes the gradient only here
        lc = np.maximum(logp, np.log(min_prob))
        w = (1 - np.exp(lc)) ** gamma
        A = -((1 - min_prob) ** gamma) * np.log(min_prob)
        fl = -w * lc
        u, v = A - fl[rows, t], C * A - fl.sum(1)
        dlc = live[:, :, None] * (np.eye(C)[None] - p[:, None, :])  # d lc_k / d z_j: (N, k, j)
        du = w[rows, t][:, None] * dlc[rows, t]
        dv = (w[:, :, None] * dlc).sum(1)
        return -(du * v[:, None] - u[:, None] * dv) / v[:, None] ** 2 / N
    raise KeyError(name)


def numeric_gradient(name, z, t, gamma, eps=1e-5):
    """Central differences of the numpy formula (the focal weight differentiated): O(eps^2) error."""
    grad = np.zeros_like(z)
    for i, j in np.ndindex(*z.shape):
        hi, lo = z.copy(), z.copy()
        hi[i, j] += eps
        lo[i, j] -= eps
        up, down = formula(name, hi, t, gamma=gamma).mean(), formula(name, lo, t, gamma=gamma).mean()
        grad[i, j] = (up - down) / (2 * eps)
    return grad


def loss_gradient(name, z, t, **hp):
    z = z.clone().requires_grad_()
    build_loss(name, z.shape[1], **hp)(z, t).backward()
    return z.grad.numpy()


# float64 autograd against the hand-written float64 gradient: both round ~100 operations of relative error
# 2^-53 = 1.1e-16 per entry, so they agree to ~1e-14 of the gradient's scale; 1e-11 leaves a wide margin
# and still fails on any formula error (the detached and differentiated gradients differ by ~1e-2).
EXACT = dict(rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["fl", "nfl", "nnfl"])
@pytest.mark.parametrize("scale", [1.0, 20.0])  # 20: some p_k < 1e-7, so NNFL's clamp is active
def test_focal_gradient_is_the_official_detached_one_by_default(name, scale):
    z, t = random_batch(C=FOCAL_C, N=24, scale=scale, seed=3)
    expected = official_focal_gradient(name, z.numpy(), t.numpy(), gamma=0.5)
    np.testing.assert_allclose(loss_gradient(name, z, t, gamma=0.5), expected, **EXACT)
    explicit = loss_gradient(name, z, t, gamma=0.5, detach_focal_weight=True)
    np.testing.assert_allclose(explicit, expected, **EXACT)


@pytest.mark.parametrize("name", ["fl", "nfl", "nnfl"])
def test_focal_gradient_differentiates_the_weight_on_request(name):
    z, t = random_batch(C=FOCAL_C, N=6, scale=1.0, seed=4)
    got = loss_gradient(name, z, t, gamma=0.5, detach_focal_weight=False)
    # central differences with eps 1e-5: truncation ~eps^2 * f''' ~ 1e-10, rounding ~1e-16 / eps = 1e-11
    np.testing.assert_allclose(got, numeric_gradient(name, z.numpy(), t.numpy(), 0.5), rtol=1e-6, atol=1e-8)
    official = official_focal_gradient(name, z.numpy(), t.numpy(), gamma=0.5)
    assert np.linalg.norm(got - official) > 0.05 * np.linalg.norm(official)  # the switch matters at C = 10


@pytest.mark.parametrize(
    "name, parts", [("anl_fl", ("nfl", "nnfl")), ("nfl_rce", ("nfl", "rce")), ("nfl_mae", ("nfl", "mae"))]
)
def test_focal_combinations_pass_the_switch_to_their_focal_parts(name, parts):
    z, t = random_batch(C=FOCAL_C, N=24, scale=3.0, seed=5)
    alpha, beta = 5.0, 2.0

    def part_gradient(part, detach):
        if part in ("rce", "mae"):  # no focal weight: its own autograd gradient
            return loss_gradient(part, z, t)
        if detach:
            return official_focal_gradient(part, z.numpy(), t.numpy(), gamma=0.5)
        return loss_gradient(part, z, t, gamma=0.5, detach_focal_weight=False)

    for detach in (None, True, False):  # None: the default, the official gradient
        hp = {"gamma": 0.5} if detach is None else {"gamma": 0.5, "detach_focal_weight": detach}
        expected = sum(w * part_gradient(part, detach is not False) for w, part in zip((alpha, beta), parts))
        np.testing.assert_allclose(loss_gradient(name, z, t, alpha=alpha, beta=beta, **hp), expected, **EXACT)


def test_detach_focal_weight_takes_a_boolean_and_only_in_the_focal_family():
    with pytest.raises(ValueError, match="detach_focal_weight=1: nfl takes true or false"):
        build_loss("nfl", 10, detach_focal_weight=1)
    with pytest.raises(ValueError, match="unknown \\['detach_focal_weight'\\]"):
        build_loss("nce", 10, detach_focal_weight=True)


# The papers' spellings of a loss name (NCE+MAE, ANL-CE), in any case, name the code's (issue 20, item 4)
SPELLINGS = {
    "NCE+MAE": "nce_mae",
    "nce_mae": "nce_mae",
    "NCE_MAE": "nce_mae",
    "nce+rce": "nce_rce",
    "NFL+RCE": "nfl_rce",
    "ANL-CE": "anl_ce",
    "Anl-Ce-Er": "anl_ce_er",
    "NCE+AGCE": "nce_agce",
    "Drainage": "drainage",
    "alpha_dl": "drainage",  # the Drainage authors' name
    "CE": "ce",
}


@pytest.mark.parametrize("given", SPELLINGS)
def test_a_loss_name_in_any_spelling_is_stored_as_the_code_names_it(given):
    from train.config import load_config

    assert load_config("digits", [f"loss={given}", "loss_params={}"]).loss == SPELLINGS[given]


def test_the_help_and_the_error_list_the_same_loss_names(tmp_path, monkeypatch, capsys):
    from tests.train.support import run_here
    from train.losses import LOSS_NAMES

    monkeypatch.chdir(tmp_path)
    for command in ("sweep", "clean"):
        assert run_here([command, "-h"]) == 0
        assert LOSS_NAMES in " ".join(capsys.readouterr().out.split())  # argparse wraps the help
        assert run_here([command, "--losses", "ce", "nce-plus-mae"]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and f"--losses nce-plus-mae: unknown loss; choose from {LOSS_NAMES}" in err
        )
    assert all(name in LOSS_NAMES.split("; ")[0].split(", ") for name in LOSSES)
    assert run_here(["run", "--set", "loss=nce-plus-mae"]) == 2
    assert f"loss=nce-plus-mae: unknown loss; choose from {LOSS_NAMES}" in capsys.readouterr().err


def test_a_sweep_takes_the_papers_spellings_for_losses_and_grid_owners(tmp_path, monkeypatch, capsys):
    from tests.train.support import run_here

    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--losses", "NCE+RCE", "CE", "--seeds", "1", "--set", "epochs=1"]
    argv += ["--grid", "nce+rce:loss_params.alpha=0.5,1", "--runs_dir", str(tmp_path / "sw")]
    assert run_here(argv) == 0
    capsys.readouterr()
    folders = sorted(p.relative_to(tmp_path / "sw").parts[0] for p in (tmp_path / "sw").glob("*/*/s1"))
    assert folders == ["ce", "nce_rce[alpha=0.5]", "nce_rce[alpha=1]"]
    assert run_here([*argv[:-2], "--grid", "gce:q=0.5,0.7"]) == 2  # gce is not in this sweep
    assert "--grid gce:q=...: gce is none of the losses of this job (nce_rce ce)" in capsys.readouterr().err


# ---- Deep Gamblers and DAC: their formulas, and the schedules of the official code
# Formulas in numpy float64 on the probabilities, p = softmax over all K outputs, the abstain output last.


def gamblers_formula(z, t, reward):
    p = softmax(z)
    return -np.log(p[np.arange(len(t)), t] + p[:, -1] / reward)


def ce_over_classes(z, t):
    return -np.log(softmax(z[:, :-1])[np.arange(len(t)), t])


def dac_formula(z, t, alpha, clamp=False):
    """(1 - p_d) h_c - alpha log(1 - p_d); clamp: p_d <= 1 - 1e-7 first, as dac_loss.py does."""
    p = softmax(z)
    p_d = np.minimum(p[:, -1], 1 - 1e-7) if clamp else p[:, -1]
    return (1 - p_d) * ce_over_classes(z, t) - alpha * np.log(1 - p_d)


@pytest.mark.parametrize("reward", [1.5, 2.2, 9.0])
def test_gamblers_pretrains_on_the_classes_then_gambles(reward):
    """Z-T-WANG/NIPS2019DeepGamblers main.py: cross-entropy over outputs[:, :-1] while epoch < pretrain
    (0-based), then -log(p_t + p_d / reward)."""
    z, t = random_batch(C=6, seed=4)
    t = t % 5
    loss = build_loss("gamblers", 5, reward=reward, pretrain=2)
    for epoch, expected in ((1, ce_over_classes), (2, ce_over_classes), (3, None), (7, None)):
        loss.start_epoch(epoch, 7)
        want = expected(z.numpy(), t.numpy()) if expected else gamblers_formula(z.numpy(), t.numpy(), reward)
        assert loss(z, t).item() == pytest.approx(want.mean(), rel=1e-10)
        assert loss.phase() == {"loss_phase": "pretrain" if expected else "gamblers"}


class OfficialDAC:
    """thulas/dac-label-noise dac_loss.py (03f9ec6) transcribed in numpy float64, called per batch as
    train_dac.py does: the warm-up's EWMA, alpha set on the first batch after it, alpha += alpha_inc on
    the first batch of each later epoch; p_d clamped at 1 - 1e-7 in the abstention phase."""

    def __init__(self, learn_epochs, total_epochs, alpha_final=1.0, alpha_init_factor=64.0):
        self.learn_epochs, self.total_epochs = learn_epochs, total_epochs
        self.alpha_final, self.alpha_init_factor = alpha_final, alpha_init_factor
        self.ewma = self.alpha = self.alpha_inc = self.alpha_set_epoch = None

    def _track(self, p_abstain, h_c):
        value = ((1 - p_abstain) * h_c).mean()
        self.ewma = value if self.ewma is None else 0.05 * value + 0.95 * self.ewma

    def __call__(self, z, t, epoch):
        p = softmax(z)
        h_c = ce_over_classes(z, t)
        if epoch <= self.learn_epochs:
            self._track(p[:, -1], h_c)
            return -np.log(p[np.arange(len(t)), t]).mean()
        p_abstain = np.minimum(p[:, -1], 1 - 1e-7)
        self._track(p_abstain, h_c)
        if self.alpha is None:
            self.alpha = self.ewma / self.alpha_init_factor
            self.alpha_inc = (self.alpha_final - self.alpha) / (self.total_epochs - epoch)
            self.alpha_set_epoch = epoch
        elif epoch > self.alpha_set_epoch:
            self.alpha += self.alpha_inc
            self.alpha_set_epoch = epoch
        return ((1 - p_abstain) * h_c - self.alpha * np.log(1 - p_abstain)).mean()


def dac_batches(epochs, per_epoch=3, C=5, seed=5):
    """Fixed random batches (float64 logits, 16 rows, K = C + 1) for each epoch."""
    return [
        [random_batch(C=C + 1, N=16, seed=seed + 100 * e + b) for b in range(per_epoch)]
        for e in range(epochs)
    ]


def test_dac_follows_the_official_warm_up_ewma_and_alpha_ramp():
    epochs, official = 6, OfficialDAC(learn_epochs=2, total_epochs=6)
    loss = build_loss("dac", 5, learn_epochs=2)
    for epoch, batches in enumerate(dac_batches(epochs), start=1):
        loss.start_epoch(epoch, epochs)
        for z, t in batches:
            t = t % 5
            # the EWMA is float32 here (a device tensor), float64 there: alpha agrees to ~1e-7
            assert loss(z, t).item() == pytest.approx(official(z.numpy(), t.numpy(), epoch), rel=1e-6)
        assert loss.phase()["loss_phase"] == ("warm-up" if epoch <= 2 else "abstain")
        if epoch > 2:
            assert loss.alpha == pytest.approx(official.alpha, rel=1e-6)
    assert loss.alpha == 1.0 and official.alpha == pytest.approx(1.0)  # alpha_final at the last epoch
    assert loss.alpha_epoch == 3


def test_dac_after_its_warm_up_is_the_formula_at_the_scheduled_alpha():
    z, t = random_batch(C=8, seed=6)
    t = t % 7
    loss = build_loss("dac", 7, learn_epochs=0, alpha_init_factor=16.0)
    loss.start_epoch(1, 5)
    first = loss(z, t).item()
    alpha_0 = loss.alpha
    p = softmax(z.numpy())
    ewma = ((1 - p[:, -1]) * ce_over_classes(z.numpy(), t.numpy())).mean()  # one batch: its mean
    assert alpha_0 == pytest.approx(ewma / 16.0, rel=1e-6)
    assert first == pytest.approx(dac_formula(z.numpy(), t.numpy(), alpha_0).mean(), rel=1e-6)
    loss.start_epoch(3, 5)  # alpha_0 + (1 - alpha_0) * (3 - 1) / (5 - 1)
    assert loss.alpha == pytest.approx(alpha_0 + (1 - alpha_0) / 2)
    assert loss(z, t).item() == pytest.approx(dac_formula(z.numpy(), t.numpy(), loss.alpha).mean(), rel=1e-10)
    loss.start_epoch(5, 8)  # a resume that extends the run to 8 epochs re-plans the ramp
    assert loss.alpha == pytest.approx(alpha_0 + (1 - alpha_0) * 4 / 7)


def test_dac_schedule_state_survives_a_weights_only_checkpoint(tmp_path):
    """Continued from its saved state, the schedule gives the losses of one never interrupted, bit for bit."""
    batches = dac_batches(5)
    straight, cut = build_loss("dac", 5, learn_epochs=1), build_loss("dac", 5, learn_epochs=1)

    def train(loss, epochs):
        out = []
        for epoch in epochs:
            loss.start_epoch(epoch, 5)
            out += [loss(z, t % 5).item() for z, t in batches[epoch - 1]]
        return out

    expected = train(straight, range(1, 6))
    for stop in (1, 3):  # in the warm-up, and after alpha was set
        first = build_loss("dac", 5, learn_epochs=1)
        done = train(first, range(1, stop + 1))
        torch.save(first.schedule_state(), tmp_path / "state.pt")
        cut = build_loss("dac", 5, learn_epochs=1)
        cut.load_schedule_state(torch.load(tmp_path / "state.pt", weights_only=True))
        assert done + train(cut, range(stop + 1, 6)) == expected


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("gamblers", {"reward": 1.0}, "reward must be a finite number > 1"),
        ("gamblers", {"pretrain": 2.5}, "loss_params.pretrain=2.5: gamblers takes an integer >= 0 (epochs)"),
        ("gamblers", {"pretrain": -1}, "loss_params.pretrain=-1"),
        ("dac", {"learn_epochs": True}, "loss_params.learn_epochs=True: dac takes an integer >= 0"),
        ("dac", {"alpha_final": -0.5}, "alpha must be a finite number >= 0"),
        ("dac", {"alpha_init_factor": 0}, "loss_params.alpha_init_factor=0: dac takes a number > 0"),
    ],
)
def test_schedule_parameters_are_checked_naming_them(name, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_loss(name, 10, **params)


def test_a_warm_up_as_long_as_the_run_is_refused():
    from train.config import load_config

    with pytest.raises(ValueError, match=re.escape("loss_params.learn_epochs=10: must be < epochs=10")):
        load_config("digits", ["loss=dac", "loss_params={}", "epochs=10"])
    with pytest.raises(ValueError, match=re.escape("loss_params.pretrain=5: must be < epochs=5")):
        load_config("digits", ["loss=gamblers", "loss_params={}", "loss_params.pretrain=5", "epochs=5"])
    assert load_config("digits", ["loss=dac", "loss_params={}", "epochs=11"]).loss == "dac"
