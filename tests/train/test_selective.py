"""Selective classification in the harness (train/trainer.py, train/selective.py, the reports): the metrics a
run reports recompute from its eval_scores.npz, and the abstention rule of `--set coverage=0.9` is
chosen on the held-out 20% (recomputed here from the saved model) and applied to the test images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from drainage_fast.openset import accepted_count, selective_confidences
from tests.train.support import listing, run_here
from train.config import load_config
from train.data import load_raw, tuning_split
from train.data.augment import prepare_batch
from train.experiment import run_experiment
from train.losses import num_outputs
from train.models import build_model
from train.selective import mean_risk_coverage, read_confidences


def plain_curve(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Selective risk at k = 1..n by sorting (the run's confidences are distinct logarithms)."""
    assert len(np.unique(confidence)) == len(confidence)
    wrong = ~correct[np.argsort(-confidence)]
    return np.cumsum(wrong) / np.arange(1, len(wrong) + 1)


@pytest.mark.parametrize("loss", ["dac", "ce"])
def test_reported_selective_metrics_recompute_from_the_dump(loss, tmp_path):
    schedule = ["loss_params.learn_epochs=1"] if loss == "dac" else []
    cfg = load_config(f"digits_{loss}", ["epochs=3", "checkpoint=false", *schedule])
    result = run_experiment(cfg, tmp_path / loss, quiet=True)
    confidences, correct = read_confidences(result.run_dir)
    assert list(confidences) == (["1-p_d", "msp"] if loss == "dac" else ["msp"])
    assert correct.mean() == pytest.approx(result.summary["last_eval_acc"])
    for name, confidence in confidences.items():
        risk = plain_curve(confidence, correct)
        s = result.summary
        assert s[f"eval_aurc[{name}]"] == pytest.approx(risk.mean(), rel=1e-12)
        for c in (1.0, 0.95, 0.9, 0.8, 0.7):  # ceil(c * 450) accepted
            assert s[f"eval_risk@{100 * c:g}[{name}]"] == pytest.approx(
                risk[int(np.ceil(c * 450 - 1e-9)) - 1]
            )
    (label, (coverage, risk)), *_ = mean_risk_coverage({"X": [result.run_dir]}).items()
    assert label == ("X / 1 - p_d" if loss == "dac" else "X / MSP") and len(coverage) == 450


def test_the_abstention_rule_is_chosen_on_the_held_out_split_and_applied_to_the_test_set(tmp_path):
    out = tmp_path / "runs"
    argv = ["run", "--config", "digits_drainage", "--set", "epochs=4", "coverage=0.9", "--out_dir", str(out)]
    assert run_here([*argv, "--name", "rule", "--quiet"]) == 0
    run_dir = out / "rule"
    rule = json.loads((run_dir / "summary.json").read_text())["coverage_rule"]
    raw = load_raw("digits")
    train_idx, calib_idx = tuning_split(len(raw.train_y))
    assert np.array_equal(np.load(run_dir / "labels.npz")["index"], train_idx)  # trained on the 80% only
    # the threshold recomputed from the saved weights on the held-out 20%: the ceil(0.9 n)-th highest
    cfg = load_config(str(run_dir / "config.json"))
    model = build_model(cfg.model, num_outputs(cfg.loss, 10))
    model.load_state_dict(torch.load(run_dir / "last.pt", weights_only=True)["model"])
    x = prepare_batch(raw.train_x[calib_idx], pixel_scale=raw.pixel_scale, mean=raw.mean, std=raw.std)
    with torch.no_grad():
        calib = selective_confidences(model.eval()(x))["1-p_d"].numpy()
    k = accepted_count(len(calib_idx), 0.9)
    assert rule["confidence"] == "1-p_d" and rule["calibration_images"] == len(calib_idx) == 270
    assert rule["log_threshold"] == pytest.approx(np.sort(calib)[::-1][k - 1], rel=1e-9, abs=1e-12)
    assert rule["calibration_coverage"] == pytest.approx((calib >= rule["log_threshold"]).mean())
    assert rule["calibration_coverage"] >= 0.9
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 450 and [int(r["index"]) for r in rows] == list(range(450))
    conf = np.array([float(r["log_confidence"]) for r in rows])
    abstain = np.array([r["abstain"] == "1" for r in rows])
    correct = np.array([r["correct"] == "1" for r in rows])
    assert np.array_equal(abstain, conf < rule["log_threshold"])
    assert np.array_equal(correct, np.array([r["pred"] == r["label"] for r in rows]))
    assert rule["test_coverage"] == pytest.approx(1 - abstain.mean())
    assert rule["test_selective_risk"] == pytest.approx(1 - correct[~abstain].mean())
    assert abs(rule["test_coverage"] - 0.9) < 0.1  # the test images are not the calibration ones
    assert "abstention rule: accept when log(1-p_d) >=" in (run_dir / "train.log").read_text()


def test_run_prints_the_selective_table_and_draws_the_curves(tmp_path, capsys):
    argv = ["run", "--config", "digits_gamblers", "--set", "epochs=3", "loss_params.pretrain=1"]
    assert run_here([*argv, "--out_dir", str(tmp_path), "--name", "g"]) == 0
    out = capsys.readouterr().out
    assert (
        "| model / confidence | AURC | E-AURC | risk@100% | risk@95% | risk@90% | risk@80% | risk@70% |"
        in out
    )
    assert "| Deep Gamblers / 1 - p_d |" in out and "| Deep Gamblers / MSP |" in out
    assert (tmp_path / "g" / "risk_coverage.png").stat().st_size > 10_000
    assert "coverage_rule" not in json.loads((tmp_path / "g" / "summary.json").read_text())
    assert "predictions.csv" not in listing(tmp_path / "g")
