"""Open-set recognition and dataset-cleaning metrics, and the scores they rank by.

Convention everywhere in this module: a score is an *outlier* score, higher = more likely unknown
(out-of-distribution, or mislabeled when cleaning), as in pytorch-ood. Known samples are the
"in-distribution" (ID) set, unknown ones the "out-of-distribution" (OOD) set.

FPR@95TPR has two conventions in the literature and both are reported, each named for its positive
class (docs/design.md, "Open-set and cleaning metrics"):
  FPR@95TPR[unknown-positive]  OpenOOD v1.5 / pytorch-ood: the fraction of known samples flagged as
                               unknown at the threshold that flags 95% of the unknown ones.
  FPR@95TPR[known-positive]    the classic ODIN / Hendrycks one: the fraction of unknown samples
                               accepted as known at the threshold that accepts 95% of the known ones.
scikit-learn computes the ROC and precision-recall curves (imported lazily: `pip install scikit-learn`).
"""

from __future__ import annotations

import numpy as np
import torch

SCORES = ("p_d", "msp", "max_logit", "energy")


def drainage_probability(logits: torch.Tensor, drainage_idx: int = -1) -> torch.Tensor:
    """(N, K) logits -> (N,) float32 p_d: the drainage output's share of the softmax over all K outputs."""
    return logits.detach().float().softmax(dim=1)[:, drainage_idx]


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
    if drainage_idx is None:
        classes = logits
    else:
        d = drainage_idx % logits.shape[1]
        classes = torch.cat([logits[:, :d], logits[:, d + 1 :]], dim=1)
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
