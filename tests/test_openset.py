"""Open-set and cleaning metrics against hand-computed values and independent implementations."""

import math

import numpy as np
import pytest
import torch

from drainage_fast.openset import cleaning_metrics, open_set_metrics, open_set_scores, oscr


def test_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]])  # drainage output last
    s = open_set_scores(logits, drainage_idx=-1)
    # row 0: open softmax e^2, 1, 2 -> p_d = 2 / (e^2 + 3); closed softmax over (2, 0): max = e^2 / (e^2 + 1)
    e2 = math.exp(2.0)
    torch.testing.assert_close(s["p_d"], torch.tensor([2 / (e2 + 3), 1 / 3]))
    torch.testing.assert_close(s["msp"], torch.tensor([1 - e2 / (e2 + 1), 0.5]))
    torch.testing.assert_close(s["max_logit"], torch.tensor([-2.0, 0.0]))
    torch.testing.assert_close(s["energy"], torch.tensor([-math.log(e2 + 1), -math.log(2.0)]))
    no_drain = open_set_scores(logits, drainage_idx=None)
    assert "p_d" not in no_drain
    torch.testing.assert_close(no_drain["max_logit"], torch.tensor([-2.0, 0.0]))


def pairwise_auroc(known, unknown):
    """P(unknown scores above known) + half the ties: the Mann-Whitney definition, pair by pair."""
    wins = sum((u > k) + 0.5 * (u == k) for u in unknown for k in known)
    return wins / (len(known) * len(unknown))


def average_precision(scores, positive):
    """sum_n (R_n - R_{n-1}) P_n over thresholds at each distinct score, highest first."""
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores), reverse=True):
        flagged = [p for s, p in zip(scores, positive) if s >= thr]
        recall = sum(flagged) / sum(positive)
        ap += (recall - prev_recall) * sum(flagged) / len(flagged)
        prev_recall = recall
    return ap


def test_auroc_and_aupr_by_hand():
    known = [0.1, 0.4, 0.35, 0.8, 0.4]
    unknown = [0.9, 0.4, 0.7, 0.05]
    m = open_set_metrics(known, unknown)
    assert m["AUROC"] == pytest.approx(pairwise_auroc(known, unknown))
    scores, is_unknown = known + unknown, [0] * 5 + [1] * 4
    assert m["AUPR-OUT"] == pytest.approx(average_precision(scores, is_unknown))
    assert m["AUPR-IN"] == pytest.approx(average_precision([-s for s in scores], [1 - u for u in is_unknown]))


def test_auroc_on_random_data_matches_pair_counting():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(0, 1, 60).round(1), rng.normal(0.7, 1, 40).round(1)  # rounding: ties
    assert open_set_metrics(known, unknown)["AUROC"] == pytest.approx(pairwise_auroc(known, unknown))


def test_fpr95_conventions_differ_on_a_constructed_case():
    known = np.arange(100) / 100  # 0.00 .. 0.99
    unknown = np.r_[np.full(95, 2.0), np.full(5, -1.0)]
    m = open_set_metrics(known, unknown)
    # Flagging 95% of the unknown (threshold 2.0) flags no known sample.
    assert m["FPR@95TPR[unknown-positive]"] == 0.0
    # Accepting 95% of the known (scores <= 0.94) also accepts the 5 unknown at -1.
    assert m["FPR@95TPR[known-positive]"] == pytest.approx(0.05)


def test_oscr_by_hand():
    # thresholds 0.1, 0.15, 0.2, 0.3, 0.4 give (FPR, CCR) = (0, 1/3), (1/2, 1/3), (1/2, 1/3),
    # (1/2, 2/3), (1, 2/3): area = 1/2 * 1/3 + 1/2 * 2/3 = 1/2
    assert oscr([0.1, 0.2, 0.3], [0.15, 0.4], [True, False, True]) == pytest.approx(0.5)
    perfect = open_set_metrics([0.0, 0.1], [0.9, 1.0], correct=[True, True])
    assert perfect["OSCR"] == pytest.approx(1.0) and perfect["closed_set_accuracy"] == 1.0
    assert perfect["AUROC"] == 1.0 and perfect["FPR@95TPR[known-positive]"] == 0.0


def test_oscr_never_exceeds_accuracy():
    rng = np.random.default_rng(1)
    correct = rng.random(50) < 0.7
    m = open_set_metrics(rng.random(50), rng.random(30) + 0.3, correct=correct)
    assert 0.0 <= m["OSCR"] <= m["closed_set_accuracy"] == pytest.approx(correct.mean())


def test_cleaning_metrics_by_hand():
    score = [0.9, 0.1, 0.8, 0.3, 0.7, 0.2]
    flipped = [True, False, False, True, True, False]
    m = cleaning_metrics(score, flipped, ks=(1, 3))
    assert m["precision@1"] == 1.0 and m["recall@1"] == pytest.approx(1 / 3)
    assert m["precision@3"] == pytest.approx(2 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["AUROC"] == pytest.approx(pairwise_auroc([0.1, 0.8, 0.2], [0.9, 0.3, 0.7]))
    with pytest.raises(ValueError, match="k must be"):
        cleaning_metrics(score, flipped, ks=(7,))


def test_metrics_need_both_sets():
    with pytest.raises(ValueError, match="known and unknown"):
        open_set_metrics([0.1], [])
