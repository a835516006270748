"""What a run and a report give a user of timm / Lightning (issue 13): best.pt, metrics.csv, TensorBoard
tags grouped train/ and eval/, a per-batch progress bar, --help for every option, single-seed tables
without "± 0.00", and bar charts that start at 0 or mark the axis break."""

import csv
import json
import logging
import math

import matplotlib
import numpy as np
import pytest
import torch

from train.cli import build_parser
from train.commands.osr import metrics_table, paired_table
from train.commands.sweep import METRICS, write_report
from train.config import load_config, preset_names
from train.data import build_data
from train.experiment import run_experiment
from train.losses import build_loss, num_outputs
from train.models import build_model
from train.openset.runs import aggregate_scores
from train.report import aggregate, pct, plot_grid, plot_sweep
from train.report.openset import plot_osr
from train.trainer import BEST, Trainer, class_predictions


def digits_config(**overrides):
    return load_config("digits", {"epochs": 4, "lr": 0.05, "batch_size": 256, **overrides})


def test_best_pt_holds_the_weights_of_the_best_epoch(tmp_path):
    cfg = digits_config()
    result = run_experiment(cfg, tmp_path / "run", quiet=True)
    best = torch.load(tmp_path / "run" / BEST, weights_only=True)
    assert (best["epoch"], best["eval_acc"]) == (
        result.summary["best_epoch"],
        result.summary["best_eval_acc"],
    )
    data = build_data(cfg)
    model = build_model(cfg.model, num_outputs(cfg.loss, data.num_classes))
    model.load_state_dict(best["model"])
    trainer = Trainer(
        cfg,
        data,
        model,
        build_loss(cfg.loss, data.num_classes),
        tmp_path,
        torch.device("cpu"),
        logging.getLogger("test"),
        show_progress=False,
    )
    predictions = class_predictions(trainer.logits(trainer.eval_x), data.num_classes)
    assert (predictions == trainer.eval_y).float().mean().item() == best["eval_acc"]
    assert not list((tmp_path / "run").glob(".*.tmp")), "atomic writes leave no temporary file"


def test_metrics_csv_has_the_jsonl_rows_also_after_a_resume(tmp_path):
    cfg = digits_config(train_stats=False)
    run_experiment(cfg, tmp_path / "run", quiet=True, stop_after=2)
    run_experiment(cfg, tmp_path / "run", quiet=True, resume=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for row, line in zip(rows, table):
        assert float(line["eval_acc"]) == row["eval_acc"] and float(line["lr"]) == row["lr"]


def test_tensorboard_tags_are_grouped_train_and_eval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(digits_config(epochs=1, tb=True), tmp_path / "run", quiet=True)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/pd_flipped", "eval/acc", "eval/best_acc", "time/epoch_s"} <= tags
    assert all(tag.split("/")[0] in ("train", "eval", "time") for tag in tags), tags


class RecordingBar:
    """Stands in for tqdm.tqdm: records each bar's arguments and updates in `bars` (set by the test)."""

    bars: list

    def __init__(self, *args, **kwargs):
        self.kwargs, self.n = kwargs, 0
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass

    @staticmethod
    def write(text, file=None):  # the console log goes through tqdm.write
        pass


@pytest.mark.parametrize("quiet", [False, True])
def test_a_progress_bar_counts_the_batches_of_each_epoch(tmp_path, monkeypatch, quiet):
    monkeypatch.setattr("tqdm.tqdm", RecordingBar)
    monkeypatch.setattr(RecordingBar, "bars", [], raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    run_experiment(digits_config(epochs=2), tmp_path / "run", quiet=quiet)
    batch_bars = [bar for bar in RecordingBar.bars if bar.kwargs.get("unit") == "batch"]
    assert [(bar.kwargs["total"], bar.n) for bar in batch_bars] == [(6, 6), (6, 6)]  # 1,347 images / 256
    assert all(bar.kwargs["disable"] is quiet for bar in batch_bars)


def test_every_option_of_every_command_has_help_and_config_lists_its_presets():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"python -m train {name} {action.option_strings}: no help text"
    config_help = next(a.help for a in commands["run"]._actions if "--config" in a.option_strings)
    assert all(preset in config_help for preset in preset_names())


def sweep_rows(seeds, accuracy=0.9):
    return [
        {
            "loss": loss,
            "params": "",
            "noise": "asym:0.4",
            "seed": seed,
            "eval_split": "test",
            **{m: accuracy + 0.01 * seed for m in METRICS},
        }
        for loss in ("drainage", "ce")
        for seed in seeds
    ]


def test_single_seed_tables_print_the_value_alone(tmp_path):
    one = write_report(sweep_rows([1]), tmp_path / "one", "one seed")
    assert "91.00" in one and "±" not in one.split("## Last epoch")[1]
    # A sweep's report says one seed as such (issue 20, item 8: it once said "over 1 seeds").
    assert "over 1 " not in one and "one run per setting (seed 1)" in one and "one seed, no spread" in one
    assert "91.50 ± 0.71" in write_report(sweep_rows([1, 2]), tmp_path / "two", "two seeds")
    assert pct(0.5, math.nan) == "50.00" and pct(0.5, 0.01) == "50.00 ± 1.00"
    rows = [
        {
            "method": "ce",
            "params": "",
            "split": "s0",
            "seed": 1,
            "eval_split": "test",
            "score": "msp",
            "AUROC": 0.9,
            "OSCR": 0.8,
        }
    ]
    assert "±" not in metrics_table(aggregate_scores(rows))
    rows.append({**rows[0], "method": "drainage", "score": "p_d", "AUROC": 0.95})
    assert "| +5.00 |" in paired_table(rows)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection instead of written."""
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    monkeypatch.setattr(matplotlib.pyplot, "close", lambda *args: None)
    return saved


def value_axis_ok(ax, axis: str) -> bool:
    """A bar chart's value axis starts at 0 or carries the break mark."""
    low = (ax.get_ylim() if axis == "y" else ax.get_xlim())[0]
    return low == 0 or any(line.get_gid() == "axis_break" for line in ax.lines)


@pytest.mark.parametrize("accuracy", [0.9, 0.1])
def test_bar_charts_start_at_zero_or_mark_the_break(tmp_path, figures, accuracy):
    agg = aggregate(sweep_rows([1, 2], accuracy), ["loss", "params", "noise", "eval_split"], METRICS)
    for a in agg:
        a["setting"] = a["loss"]
    plot_sweep(agg, tmp_path / "sweep.png", "sweep")
    plot_grid(agg, tmp_path / "grid.png", "grid", {"ce": ""})
    rows = [
        {
            "method": m,
            "params": "",
            "split": f"s{s}",
            "seed": 1,
            "eval_split": "test",
            "score": "msp",
            "AUROC": accuracy + 0.01 * s,
            "OSCR": accuracy,
        }
        for m in ("ce", "drainage")
        for s in (0, 1)
    ]
    plot_osr(aggregate_scores(rows), rows, tmp_path / "osr.png", "osr")
    sweep_fig, grid_fig, osr_fig = figures
    checks = [(ax, "y") for ax in sweep_fig.axes] + [
        (ax, "x") for ax in (*grid_fig.axes, *osr_fig.axes) if ax.patches
    ]
    assert len(checks) == 2 + 2 + 2 and all(value_axis_ok(ax, axis) for ax, axis in checks)
    zoomed = [ax for ax, axis in checks if (ax.get_ylim() if axis == "y" else ax.get_xlim())[0] > 0]
    assert bool(zoomed) == (accuracy > 0.5) and all(
        "axis starts at" in ax.get_ylabel() + ax.get_xlabel() for ax in zoomed
    )
    assert np.isfinite([ax.get_ylim() for ax in sweep_fig.axes]).all()


@pytest.mark.parametrize("loss, outputs", [("drainage", 11), ("ce", 10)])
def test_logits_of_no_images_have_the_models_K_columns(tmp_path, loss, outputs):
    """The empty-input fallback of Trainer.logits once had C columns, also for a drainage model (C + 1)."""
    cfg = digits_config(loss=loss, loss_params={})
    data = build_data(cfg)
    model = build_model(cfg.model, num_outputs(cfg.loss, data.num_classes))
    trainer = Trainer(
        cfg,
        data,
        model,
        build_loss(cfg.loss, data.num_classes),
        tmp_path,
        torch.device("cpu"),
        logging.getLogger("test"),
        show_progress=False,
    )
    assert (
        trainer.logits(trainer.eval_x[:0]).shape
        == (0, outputs)
        == (0, trainer.logits(trainer.eval_x[:2]).shape[1])
    )
