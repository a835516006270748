"""The command line: the smoke job (no --data_root) on its generated tree, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from tests.scale.support import run_module
from train.run_dirs import UserError
from train.scale.options import PRESETS, ScaleOptions, build_parser, resolve


def test_smoke_job_generates_a_tree_validates_it_and_trains(tmp_path):
    result = run_module(
        ["--arch", "tiny_convnet", "--out_dir", str(tmp_path), "--name", "smoke", "--set", "epochs=1"]
    )
    run = tmp_path / "smoke"
    log = (run / "train.log").read_text()
    assert "smoke job" in log and "webvision_train: 300 listed, 1 missing, 2 corrupt -> 297 used" in log
    assert "ilsvrc12_val: 100 listed" in log and "img/s" in log, result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["selected_on"] == "webvision_val"
    assert {"webvision_val_top1", "ilsvrc12_val_top1"} <= set(summary["last"])
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "scale_options.json",
        "env.json",
        "last.pt",
        "best.pt",
        "metrics.jsonl",
    }
    assert json.loads((run / "scale_options.json").read_text())["data_root"].endswith("smoke_data/webvision")


def test_clothing1m_run_resamples_balanced_epochs_and_reports_test_at_the_selected_epoch(
    tmp_path, clothing_tree
):
    run_module(
        [
            "--config",
            "clothing1m_drainage",
            "--data_root",
            str(clothing_tree[0]),
            "--arch",
            "tiny_convnet",
            "--crop",
            "32",
            "--resize",
            "36",
            "--balanced_samples",
            "28",
            "--out_dir",
            str(tmp_path),
            "--name",
            "c",
            "--quiet",
            "--set",
            "pretrained=null",
            "epochs=2",
            "batch_size=8",
            "eval_batch_size=16",
        ]
    )
    log = (tmp_path / "c" / "train.log").read_text()
    assert "clothing1m_train: 56 listed" in log and "unlabelled: 1" in log
    history = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train_images"] for row in history] == [24, 24]  # 28 drawn (2 per class), whole batches of 8
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["selected_on"] == "clothing1m_val" and "clothing1m_test_top1" in summary["best"]
    assert f"done: selected epoch {summary['best']['epoch']} on clothing1m_val" in log
    reported = summary["reported"]  # the official metric: test top-1 after the last epoch, then at best val
    assert (reported["split"], reported["last_epoch"], reported["top1_last_epoch"]) == (
        "clothing1m_test",
        2,
        history[-1]["clothing1m_test_top1"],
    )
    assert (reported["best_val_epoch"], reported["top1_best_val_epoch"]) == (
        summary["best"]["epoch"],
        summary["best"]["clothing1m_test_top1"],
    )
    assert f"result: clothing1m_test top-1 {reported['top1_last_epoch']:.2%} at the last epoch 2" in log


def test_reported_result_is_the_last_epoch_with_the_best_validation_epoch_beside():
    from types import SimpleNamespace

    from train.scale.loop import ScaleTrainer

    history = [
        {"epoch": 1, "clothing1m_val_top1": 0.5, "clothing1m_test_top1": 0.4},
        {"epoch": 2, "clothing1m_val_top1": 0.7, "clothing1m_test_top1": 0.6},
        {"epoch": 3},  # not evaluated (eval_freq)
        {"epoch": 4, "clothing1m_val_top1": 0.6, "clothing1m_test_top1": 0.65},
    ]
    spec = SimpleNamespace(select="clothing1m_val", report="clothing1m_test")
    best = {"epoch": 2, "clothing1m_val_top1": 0.7, "clothing1m_test_top1": 0.6}
    reported = ScaleTrainer.reported(SimpleNamespace(spec=spec, history=history, best=best))
    assert reported == {
        "split": "clothing1m_test",
        "last_epoch": 4,
        "top1_last_epoch": 0.65,
        "selected_on": "clothing1m_val",
        "best_val_epoch": 2,
        "top1_best_val_epoch": 0.6,
    }
    webvision = SimpleNamespace(select="webvision_val", report=None)  # no test split: the selection split
    row = {"epoch": 1, "webvision_val_top1": 0.3}
    reported = ScaleTrainer.reported(SimpleNamespace(spec=webvision, history=[row], best=row))
    assert reported["top1_last_epoch"] == 0.3


def parse(*argv):
    return resolve(build_parser().parse_args(list(argv)))


def test_flags_and_smoke_defaults_resolve():
    cfg, options, smoke = parse()
    assert smoke and cfg.dataset == "webvision" and cfg.loss == "drainage" and options.crop == 32
    cfg, options, smoke = parse("--loader", "torch", "--set", "epochs=5", "--crop", "48", "--resize", "56")
    assert (cfg.epochs, options.loader, options.crop) == (5, "torch", 48)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--data_root", "/data/webvision"],
            "--data_root /data/webvision: needs --config, one of clothing1m_dac, clothing1m_drainage",
        ),
        (["--crop", "64", "--resize", "32"], r"--resize 32: must be at least --crop \(64\)"),
        (["--set", "dataset=clothing1m"], "generated WebVision tree"),
        (["--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
        (["--set", "epochs=many"], "epochs=many: epochs takes an integer"),
        (["--config", "cifar10_drainage"], "imagenet_scale trains webvision and clothing1m"),
        (["--overwrite"], "--overwrite: needs --name"),
        (["--name", "../elsewhere"], "name=../elsewhere: must be a folder name without /"),
    ],
)
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message):
        parse(*argv)


def test_options_reject_bad_values():
    with pytest.raises(UserError, match="--loader fast: must be one of auto, dali, torch"):
        ScaleOptions(loader="fast").validate()
    with pytest.raises(UserError, match=r"--max_bad_fraction 2: must be in \[0, 1\]"):
        ScaleOptions(max_bad_fraction=2).validate()


def test_global_batch_must_divide_over_ranks(tmp_path, webvision_tree):
    config = tmp_path / "c.json"
    # the CPU (gloo) on every machine: on one GPU, rank 1 would ask for cuda:1
    config.write_text(
        json.dumps({"dataset": "webvision", "batch_size": 15, "eval_batch_size": 32, "device": "cpu"})
    )
    result = run_module(
        [
            "--config",
            str(config),
            "--data_root",
            str(webvision_tree[0]),
            "--arch",
            "tiny_convnet",
            "--out_dir",
            str(tmp_path),
            "--quiet",
            "--loader",
            "torch",
            "--crop",
            "32",
            "--resize",
            "36",
        ],
        torchrun=2,
        check=False,
    )
    # torchrun adds its own report of the failed processes; ours is the one line of rank 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("python -m train.imagenet_scale")]
    assert result.returncode != 0 and len(ours) == 1, result.stderr
    assert (
        "config batch_size=15 (global) is not divisible by the world size 2: accepted: a multiple of 2"
        in ours[0]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_every_option_has_help_and_config_lists_its_presets():
    parser = build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.help is None]
    assert undocumented == []
    config_help = next(a.help for a in parser._actions if "--config" in a.option_strings)
    assert {"webvision_drainage", "clothing1m_drainage"} <= set(PRESETS)
    assert all(preset in config_help for preset in PRESETS)
    assert "--overwrite" in parser.format_help()


def test_resolve_returns_what_its_docstring_promises():
    """The docstring once promised four values (Config, ScaleOptions, run_dir or None, smoke); three come
    back."""
    promised = resolve.__doc__.split("(", 1)[1].split(")", 1)[0].split(", ")
    assert promised == ["Config", "ScaleOptions", "smoke"]
    assert len(parse()) == len(promised)
