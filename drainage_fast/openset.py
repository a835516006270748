"""Open-set recognition, dataset-cleaning and selective-classification metrics, and the scores they
rank by.

Open set and cleaning: a score is an *outlier* score, higher = more likely unknown (out-of-distribution,
or mislabeled when cleaning), as in pytorch-ood. Known samples are the "in-distribution" (ID) set,
unknown ones the "out-of-distribution" (OOD) set.

Selective classification (Geifman and El-Yaniv, "Selective Classification for Deep Neural Networks",
NeurIPS 2017; "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", ICLR 2019): a score
is a *confidence*, higher = more confident, the opposite direction. At coverage c a classifier accepts
the ceil(c n) most confident of n samples and abstains on the rest; its selective risk is the error rate
among the accepted ones. See risk_coverage_curve for ties.

FPR@95TPR has two conventions in the literature and both are reported, each named for its positive
class (docs/design.md, "Open-set and cleaning metrics"):
  FPR@95TPR[unknown-positive]  OpenOOD v1.5 / pytorch-ood: the fraction of known samples flagged as
                               unknown at the threshold that flags 95% of the unknown ones.
  FPR@95TPR[known-positive]    the classic ODIN / Hendrycks one: the fraction of unknown samples
                               accepted as known at the threshold that accepts 95% of the known ones.
scikit-learn computes the ROC and precision-recall curves (imported lazily: `pip install scikit-learn`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCORES = ("p_d", "msp", "max_logit", "energy")
CONFIDENCES = ("1-p_d", "msp")  # selective_confidences
# the coverages the harness reports the selective risk at (risk@100 is the plain error rate)
REPORTED_COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7)


def drainage_probability(logits: torch.Tensor, drainage_idx: int = -1) -> torch.Tensor:
    """(N, K) logits -> (N,) float32 p_d: the drainage output's share of the softmax over all K outputs."""
    return logits.detach().float().softmax(dim=1)[:, drainage_idx]


def _class_logits(logits: torch.Tensor, drainage_idx: int | None) -> tuple[torch.Tensor, int | None]:
    """(the (N, C) class logits: every output but the drainage one, all of them for None; the drainage
    output's non-negative index or None)."""
    if drainage_idx is None:
        return logits, None
    d = drainage_idx % logits.shape[1]
    return torch.cat([logits[:, :d], logits[:, d + 1 :]], dim=1), d


def open_set_scores(logits: torch.Tensor, drainage_idx: int | None = -1) -> dict[str, torch.Tensor]:
    """Outlier scores (N,) from (N, K) logits; higher = more likely unknown.

    p_d:        drainage probability of the full ("open") softmax over all K outputs
                (only when drainage_idx is not None).
    msp:        1 - the maximum softmax probability over the C class outputs ("closed" softmax).
    max_logit:  minus the largest class logit.
    energy:     minus logsumexp of the class logits (the free energy, temperature 1).
    The class outputs are all K outputs but the drainage one (all of them when drainage_idx is None).
    """
    logits = logits.detach().float()
    classes, d = _class_logits(logits, drainage_idx)
    out = {
        "msp": 1.0 - classes.softmax(dim=1).amax(dim=1),
        "max_logit": -classes.amax(dim=1),
        "energy": -classes.logsumexp(dim=1),
    }
    if drainage_idx is not None:
        out = {"p_d": drainage_probability(logits, d), **out}
    return out


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _fpr_at_tpr(positive: np.ndarray, negative: np.ndarray, tpr_level: float) -> float:
    """FPR at the first ROC point whose TPR reaches tpr_level; positives score higher."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    fpr, tpr, _ = roc_curve(labels, np.r_[positive, negative])
    return float(fpr[np.argmax(tpr >= tpr_level)])


def oscr(outlier_known, outlier_unknown, correct) -> float:
    """Open-Set Classification Rate (Dhamija et al., NeurIPS 2018): the area under the curve of
    CCR (fraction of known samples both correctly classified and accepted) against FPR (fraction of
    unknown samples accepted) as the acceptance threshold sweeps every score.

    The curve runs from (0, 0) to (1, closed-set accuracy), so OSCR <= accuracy and a perfect
    classifier with perfect rejection scores 1. Ties are accepted or rejected together.
    """
    known, unknown, correct = _np(outlier_known), _np(outlier_unknown), _np(correct).astype(bool)
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError(f"oscr needs known and unknown samples, got {len(known)} and {len(unknown)}")
    # Accept when the outlier score is <= threshold; sweep thresholds over every distinct score.
    thresholds = np.unique(np.r_[known, unknown])
    ccr = np.searchsorted(np.sort(known[correct]), thresholds, side="right") / len(known)
    fpr = np.searchsorted(np.sort(unknown), thresholds, side="right") / len(unknown)
    fpr, ccr = np.r_[0.0, fpr], np.r_[0.0, ccr]  # nothing accepted below the smallest score
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


def open_set_metrics(outlier_known, outlier_unknown, *, correct=None) -> dict[str, float]:
    """AUROC, AUPR-IN, AUPR-OUT and FPR@95TPR in both conventions; with `correct` (a bool per known
    sample: was it classified right), closed-set accuracy and OSCR too. Values in [0, 1]."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    known, unknown = _np(outlier_known), _np(outlier_unknown)
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError(
            f"open_set_metrics needs known and unknown samples, got {len(known)} and {len(unknown)}"
        )
    is_unknown = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    scores = np.r_[known, unknown]
    out = {
        "AUROC": float(roc_auc_score(is_unknown, scores)),  # the same with either class as positive
        "AUPR-IN": float(average_precision_score(1 - is_unknown, -scores)),
        "AUPR-OUT": float(average_precision_score(is_unknown, scores)),
        "FPR@95TPR[unknown-positive]": _fpr_at_tpr(unknown, known, 0.95),
        "FPR@95TPR[known-positive]": _fpr_at_tpr(-known, -unknown, 0.95),
    }
    if correct is not None:
        out["closed_set_accuracy"] = float(_np(correct).mean())
        out["OSCR"] = oscr(known, unknown, correct)
    return out


def precision_curve(score, positives) -> np.ndarray:
    """(N,) precision@k for k = 1..N: the fraction of positives among the k highest scores. The ranking
    is stable (ties keep sample order), so it is reproducible."""
    hits = _np(positives).astype(bool)[np.argsort(-_np(score), kind="stable")]
    return np.cumsum(hits) / np.arange(1, len(hits) + 1)


def precision_at_k(score, positives, k: int | None = None) -> float:
    """precision_curve at k; k defaults to the number of positives (then precision = recall). nan when
    k is 0 (no positive); a k outside [0, N] is a ValueError."""
    n = len(_np(score))
    k = int(_np(positives).sum()) if k is None else k
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    return float(precision_curve(score, positives)[k - 1]) if k else float("nan")


def cleaning_metrics(score, is_flipped, ks=(10, 50, 100)) -> dict[str, float]:
    """How well a per-sample score (higher = more suspect, e.g. p_d) finds mislabeled samples.

    precision@k: fraction of flipped labels among the k highest scores; recall@k: fraction of all
    flipped labels found there; AUROC of the score at separating flipped from clean labels. The
    ranking is stable (ties keep sample order), so it is reproducible.
    """
    from sklearn.metrics import roc_auc_score

    score, flipped = _np(score), _np(is_flipped).astype(bool)
    curve = precision_curve(score, flipped)
    out = {}
    for k in ks:
        if not 0 < k <= len(score):
            raise ValueError(f"k must be in [1, {len(score)}], got {k}")
        out[f"precision@{k}"] = float(curve[k - 1])
        out[f"recall@{k}"] = float(curve[k - 1] * k / max(flipped.sum(), 1))
    if 0 < flipped.sum() < len(flipped):
        out["AUROC"] = float(roc_auc_score(flipped, score))
    return out


def selective_confidences(logits: torch.Tensor, drainage_idx: int | None = -1) -> dict[str, torch.Tensor]:
    """Confidences (N,) float64 from (N, K) logits, higher = more confident (selective classification's
    direction, the opposite of open_set_scores), as natural logarithms:

    1-p_d:  log(1 - p_d), p_d the drainage (abstain) output's probability in the open softmax over all K
            outputs (only when drainage_idx is not None): what Drainage, Deep Gamblers and DAC abstain
            by. = -softplus(z_d - lse(class logits)).
    msp:    log of the maximum softmax probability over the C class outputs (all outputs but the
            drainage one): the baseline every classifier has. = -log1p(sum over the other classes of
            exp(z_j - z_max)).
    A logarithm ranks as its argument does, so every selective metric is that of 1 - p_d and of the
    MSP; but where 1 - p_d or the MSP round to 1.0 (p_d or the rest of the softmax below 1.1e-16, common
    for a confident model) their logarithms, written as above, keep the samples apart instead of tying
    them.
    """
    logits = logits.detach().double()
    classes, d = _class_logits(logits, drainage_idx)
    shifted = classes - classes.amax(dim=1, keepdim=True)
    top = torch.zeros_like(shifted, dtype=torch.bool).scatter_(1, shifted.argmax(dim=1, keepdim=True), True)
    out = {"msp": -torch.log1p(shifted.exp().masked_fill(top, 0.0).sum(dim=1))}
    if drainage_idx is not None:
        out = {"1-p_d": -torch.nn.functional.softplus(logits[:, d] - classes.logsumexp(dim=1)), **out}
    return out


def _confidence_and_errors(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf, right = _np(confidence), _np(correct)
    if conf.ndim != 1 or conf.shape != right.shape or len(conf) == 0:
        raise ValueError(
            f"confidence and correct must be two non-empty 1-d sequences of one length, got shapes "
            f"{conf.shape} and {right.shape}"
        )
    if np.isnan(conf).any():
        raise ValueError("confidence holds nan: a sample without a confidence cannot be ranked")
    return conf, right == 0


def risk_coverage_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk), each (n,): for k = 1..n, coverage k / n and the error rate among
    the k most confident samples (confidence: higher = more confident; correct: a bool per sample).

    Ties: samples of equal confidence cannot be told apart by a threshold, so no order among them is
    the right one. Where the k-th most confident sample lies in a group of ties, the risk is the
    expectation over every order of that group (uniformly random tie-breaking): the errors of the
    samples above the group plus (k - those samples) times the group's error rate, over k. It does
    not depend on the order the samples come in, and without ties it is the plain sorted count.
    """
    conf, wrong = _confidence_and_errors(confidence, correct)
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], wrong[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])  # first position of each tie group
    group = np.cumsum(np.r_[True, conf[1:] != conf[:-1]]) - 1  # the group of each sorted position
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(wrong, starts)
    errors_above = np.r_[0.0, np.cumsum(group_errors)[:-1]]
    k = np.arange(1, n + 1)
    expected_errors = errors_above[group] + (k - starts[group]) * group_errors[group] / sizes[group]
    return k / n, expected_errors / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: the mean selective risk over k = 1..n (risk_coverage_curve,
    ties included). Lower is better; a random order scores about the error rate."""
    return float(risk_coverage_curve(confidence, correct)[1].mean())


def e_aurc(confidence, correct) -> float:
    """Excess AURC: aurc minus the AURC of the ideal order of the same predictions (every correct one
    before every wrong one), so 0 is a perfect ranking whatever the accuracy."""
    return aurc(confidence, correct) - _ideal_aurc(_confidence_and_errors(confidence, correct)[1])


def _ideal_aurc(wrong: np.ndarray) -> float:
    """The AURC when the #correct right predictions come first: risk max(0, k - #correct) / k."""
    k = np.arange(1, len(wrong) + 1)
    return float((np.maximum(0, k - (len(wrong) - wrong.sum())) / k).mean())


def accepted_count(n: int, coverage: float) -> int:
    """ceil(coverage * n), the number of samples accepted at `coverage` in (0, 1]. The product is
    rounded to 9 decimals first, so that 0.07 * 100 = 7.000000000000001 accepts 7, not 8."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    return math.ceil(round(coverage * n, 9))


def selective_risk(confidence, correct, coverage: float) -> float:
    """The error rate among the ceil(coverage * n) most confident samples (accepted_count; ties as in
    risk_coverage_curve). coverage 1 is the plain error rate."""
    _, risk = risk_coverage_curve(confidence, correct)
    return float(risk[accepted_count(len(risk), coverage) - 1])


def selective_threshold(confidence, coverage: float) -> float:
    """The confidence threshold of the rule "accept when confidence >= threshold" that reaches
    `coverage` on these samples: the ceil(coverage * n)-th highest confidence. Ties at the threshold
    are all accepted, so the coverage reached is at least `coverage` (more when the threshold ties).
    Choose it on held-out data, then apply it to new samples: the rule a deployed model uses."""
    conf = _np(confidence)
    if conf.ndim != 1 or len(conf) == 0 or np.isnan(conf).any():
        raise ValueError(f"confidence must be a non-empty 1-d sequence without nan, got shape {conf.shape}")
    return float(np.sort(conf)[::-1][accepted_count(len(conf), coverage) - 1])


def selective_metrics(confidence, correct, coverages=REPORTED_COVERAGES) -> dict[str, float]:
    """AURC, E-AURC and the selective risk at each coverage, keyed "risk@90" for 0.9 (values in
    [0, 1]; one sort for all)."""
    _, risk = risk_coverage_curve(confidence, correct)
    wrong = _confidence_and_errors(confidence, correct)[1]
    out = {"AURC": float(risk.mean()), "E-AURC": float(risk.mean()) - _ideal_aurc(wrong)}
    for c in coverages:
        out[f"risk@{100 * c:g}"] = float(risk[accepted_count(len(risk), c) - 1])
    return out
