"""Selective classification (drainage_fast.openset): the risk-coverage curve, AURC, E-AURC, the selective
risk at a coverage and the threshold that reaches it, against a brute force that averages the plain
sorted count over every order of the tied samples, in exact fractions."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from drainage_fast.openset import (
    accepted_count,
    aurc,
    e_aurc,
    risk_coverage_curve,
    selective_confidences,
    selective_metrics,
    selective_risk,
    selective_threshold,
)


def brute_curve(confidence, correct) -> list[Fraction]:
    """Selective risk at k = 1..n, averaged over every order that puts more confident samples first
    (each group of equal confidences in every order): the definition, counted sample by sample."""
    levels = sorted(set(confidence), reverse=True)
    groups = [[i for i, c in enumerate(confidence) if c == level] for level in levels]
    curves = []
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        errors, curve = 0, []
        for k, i in enumerate((i for order in orders for i in order), start=1):
            errors += not correct[i]
            curve.append(Fraction(errors, k))
        curves.append(curve)
    return [sum(c[k] for c in curves) / len(curves) for k in range(len(confidence))]


def brute_ideal_aurc(correct) -> Fraction:
    """Every correct prediction first."""
    ordered = sorted(correct, reverse=True)
    return sum(brute_curve(list(range(len(ordered), 0, -1)), ordered)) / len(ordered)


def test_a_small_case_by_hand():
    # k = 1: 0.9 (right). k = 2: one of the tied 0.8s, right or wrong with equal chance: 1/2 error
    # expected over 2 accepted. k = 3: both 0.8s, 1 error in 3. k = 4: 2 errors in 4.
    conf, correct = [0.8, 0.9, 0.3, 0.8], [False, True, False, True]
    coverage, risk = risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.25, 1 / 3, 0.5])
    assert aurc(conf, correct) == pytest.approx((0.25 + 1 / 3 + 0.5) / 4)
    # the ideal order of 2 right and 2 wrong: risks 0, 0, 1/3, 1/2
    assert e_aurc(conf, correct) == pytest.approx(0.25 / 4)
    assert selective_risk(conf, correct, 0.5) == pytest.approx(0.25)
    assert selective_risk(conf, correct, 1.0) == pytest.approx(0.5)  # the error rate


@pytest.mark.parametrize("seed", range(6))
def test_curve_equals_the_brute_force_over_every_tie_order(seed):
    rng = np.random.default_rng(seed)
    n = 8
    conf = rng.integers(0, 4, n).tolist()  # four levels among eight samples: ties everywhere
    correct = (rng.random(n) < 0.6).tolist()
    expected = brute_curve(conf, correct)
    _, risk = risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(risk, [float(r) for r in expected], rtol=1e-12)
    assert aurc(conf, correct) == pytest.approx(float(sum(expected) / n), rel=1e-12)
    ideal = brute_ideal_aurc(correct)
    assert e_aurc(conf, correct) == pytest.approx(float(sum(expected) / n - ideal), abs=1e-12)


@pytest.mark.parametrize("coverage", ["1", "0.95", "0.9", "0.8", "0.7", "0.35", "0.05"])
def test_selective_risk_accepts_the_ceil_of_coverage_times_n(coverage):
    rng = np.random.default_rng(7)
    n = 8
    conf, correct = rng.integers(0, 4, n).tolist(), (rng.random(n) < 0.6).tolist()
    k = math.ceil(Fraction(coverage) * n)  # exact arithmetic
    assert accepted_count(n, float(coverage)) == k
    got = selective_risk(conf, correct, float(coverage))
    assert got == pytest.approx(float(brute_curve(conf, correct)[k - 1]), rel=1e-12)


def test_without_ties_the_curve_is_the_plain_sorted_count():
    rng = np.random.default_rng(3)
    n = 500
    conf, correct = rng.random(n), rng.random(n) < 0.8
    order = np.argsort(-conf)
    plain = np.cumsum(~correct[order]) / np.arange(1, n + 1)
    _, risk = risk_coverage_curve(conf, correct)
    np.testing.assert_allclose(risk, plain, rtol=1e-12)
    metrics = selective_metrics(conf, correct)
    assert metrics["risk@100"] == pytest.approx(1 - correct.mean())
    assert metrics["risk@90"] == pytest.approx(plain[449])  # ceil(0.9 * 500) = 450 accepted
    assert metrics["AURC"] == pytest.approx(plain.mean()) and metrics["E-AURC"] >= 0


def test_the_result_does_not_depend_on_the_order_of_the_samples():
    rng = np.random.default_rng(4)
    conf, correct = rng.integers(0, 10, 300), rng.random(300) < 0.5
    shuffle = rng.permutation(300)
    np.testing.assert_allclose(
        risk_coverage_curve(conf, correct)[1], risk_coverage_curve(conf[shuffle], correct[shuffle])[1]
    )


def test_a_perfect_ranking_has_zero_excess_and_a_reversed_one_the_most():
    correct = np.array([True] * 7 + [False] * 3)
    perfect, reversed_ = np.arange(10, 0, -1), np.arange(10)
    assert e_aurc(perfect, correct) == pytest.approx(0.0, abs=1e-15)
    assert aurc(perfect, correct) < aurc(np.zeros(10), correct) < aurc(reversed_, correct)
    # all tied: every k has the error rate as its expected risk
    np.testing.assert_allclose(risk_coverage_curve(np.zeros(10), correct)[1], 0.3)


def test_float_products_round_before_the_ceiling():
    assert 0.07 * 100 > 7  # 7.000000000000001 in floats
    assert accepted_count(100, 0.07) == 7
    assert accepted_count(450, 0.9) == 405 and accepted_count(450, 0.95) == 428  # 427.5 -> 428
    assert accepted_count(7, 1.0) == 7 and accepted_count(7, 1e-9) == 1


@pytest.mark.parametrize("coverage", [0.9, 0.5, 1.0, 0.01])
def test_the_threshold_reaches_the_coverage_and_no_higher_one_does(coverage):
    rng = np.random.default_rng(5)
    conf = rng.integers(0, 30, 200).astype(float)  # with ties
    t = selective_threshold(conf, coverage)
    k = accepted_count(200, coverage)
    assert (conf >= t).sum() >= k  # ties at t are accepted together
    assert (conf > t).sum() < k  # a higher threshold would fall short


def test_bad_input_is_refused_naming_it():
    with pytest.raises(ValueError, match="coverage must be in"):
        selective_risk([0.5, 0.4], [True, False], 0.0)
    with pytest.raises(ValueError, match="coverage must be in"):
        selective_threshold([0.5], 1.5)
    with pytest.raises(ValueError, match="one length"):
        aurc([0.5, 0.4], [True])
    with pytest.raises(ValueError, match="nan"):
        aurc([0.5, float("nan")], [True, False])


def test_confidences_by_hand():
    logits = torch.tensor([[2.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]])  # drainage output last
    c = selective_confidences(logits, drainage_idx=-1)
    e2 = math.exp(2.0)
    # open softmax e^2, 1, 2: 1 - p_d = (e^2 + 1) / (e^2 + 3); closed softmax over (2, 0); as logarithms
    expected_kept = torch.tensor([(e2 + 1) / (e2 + 3), 2 / 3], dtype=torch.float64).log()
    torch.testing.assert_close(c["1-p_d"], expected_kept)
    torch.testing.assert_close(c["msp"], torch.tensor([e2 / (e2 + 1), 0.5], dtype=torch.float64).log())
    assert list(selective_confidences(logits[:, :2], drainage_idx=None)) == ["msp"]
    # the drainage output in the middle is left out of the classes
    middle = selective_confidences(logits[:, [0, 2, 1]], drainage_idx=1)
    torch.testing.assert_close(middle["1-p_d"], c["1-p_d"])
    torch.testing.assert_close(middle["msp"], c["msp"])


def test_confidences_keep_their_order_where_the_probabilities_round_to_one():
    """p_d of 1.6e-18, 2.1e-19 and 3.7e-27, runner-up probabilities below 1e-16: 1 - p_d and the MSP
    read 1.0 in float64 and would tie; their logarithms are -p_d and -(rest of the softmax) to full
    precision."""
    logits = torch.tensor([[40.0, 0.0, -1.0], [40.0, 0.0, -3.0], [50.0, 0.0, -10.0]], dtype=torch.float64)
    c = selective_confidences(logits)
    p = logits.softmax(dim=1)
    assert (1 - p[:, 2] == 1.0).all() and (p[:, :2].amax(1) == 1.0).all()  # the rounding it avoids
    torch.testing.assert_close(c["1-p_d"], -p[:, 2], rtol=1e-12, atol=0)
    torch.testing.assert_close(c["msp"], -p[:, 1] / p[:, :2].sum(1), rtol=1e-12, atol=0)
    assert c["1-p_d"][2] > c["1-p_d"][1] > c["1-p_d"][0]
