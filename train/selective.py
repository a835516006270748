"""Selective classification of finished runs: the risk-coverage curves of their evaluation images, read
from the run folder's eval_scores.npz (written by train/experiment.py; the metrics are
drainage_fast.openset's), and the tables' names for the confidences.

    read_confidences(run_dir) -> {"1-p_d": (N,), "msp": (N,)}, correct (N,)
    mean_risk_coverage({"Drainage": [run_dir, ...], ...}) -> {"Drainage / 1 - p_d": (coverage, risk), ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from drainage_fast.openset import risk_coverage_curve

from .report.tables import CONFIDENCE_LABELS

EVAL_SCORES = "eval_scores.npz"


def read_confidences(run_dir: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(confidence name -> (N,) confidences, (N,) correct) of a run's evaluation images."""
    scores = np.load(Path(run_dir) / EVAL_SCORES)
    names = [k[len("confidence[") : -1] for k in scores.files if k.startswith("confidence[")]
    return {name: scores[f"confidence[{name}]"] for name in names}, scores["correct"]


def mean_risk_coverage(groups: dict[str, list[Path]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group (a label -> its runs: seeds of one setting, evaluated on the same images) and
    confidence, the risk-coverage curve averaged over the runs, point by point: "<label> / 1 - p_d",
    "<label> / MSP" -> (coverage, mean risk)."""
    curves = {}
    for label, run_dirs in groups.items():
        risks: dict[str, list[np.ndarray]] = {}
        for run_dir in run_dirs:
            confidences, correct = read_confidences(run_dir)
            for name, confidence in confidences.items():
                coverage, risk = risk_coverage_curve(confidence, correct)
                risks.setdefault(name, []).append(risk)
        for name, runs in risks.items():
            curves[f"{label} / {CONFIDENCE_LABELS[name]}"] = (coverage, np.mean(runs, axis=0))
    return curves
