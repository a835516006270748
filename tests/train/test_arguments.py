"""train/arguments.py: every flag that takes several values, in every command and in
`python -m train.imagenet_scale`, adds up when it is repeated (issue 20, item 1); the first use replaces
the default; the config and the report's Reproduce line hold everything that was asked."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.train.support import listing, run_here
from tests.train.test_grid import subparsers
from train.arguments import Extend
from train.scale.options import build_parser as scale_parser
from train.scale.options import resolve

# flag -> (first use, second use, the namespace value of both); the default of each is something else,
# so a first use that appended to it would show
REPEATS = {
    "--set": (["epochs=3"], ["lr=0.05", "seed=2"], ["epochs=3", "lr=0.05", "seed=2"]),
    "--seeds": (["1-2"], ["5"], [1, 2, 5]),
    "--noise": (["asym:0.2"], ["sym:0.6", "none"], ["asym:0.2", "sym:0.6", "none"]),
    "--grid": (["lr=0.1,0.3"], ["ce:epochs=2,3"], ["lr=0.1,0.3", "ce:epochs=2,3"]),
    "--losses": (["gce"], ["sce", "nce_rce"], ["gce", "sce", "nce_rce"]),
    "--runs": (["runs/a"], ["runs/b"], ["runs/a", "runs/b"]),
    "--ks": (["5"], ["7"], [5, 7]),
    "--methods": (["drainage_const"], ["ce"], ["drainage_const", "ce"]),
    "--splits": (["7"], ["9"], [7, 9]),
    "--split_files": (["a.json"], ["b.json"], ["a.json", "b.json"]),
    "--openset_splits": (["0-1"], ["4"], [0, 1, 4]),
}
PARSERS = {**subparsers(), "imagenet_scale": scale_parser()}


def several_valued(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.nargs in ("+", "*")}


def test_every_flag_with_several_values_accumulates():
    """A flag added later with nargs="+" but without Extend would silently keep only its last use."""
    actions = {(name, flag): a for name, p in PARSERS.items() for flag, a in several_valued(p).items()}
    assert {flag for _, flag in actions} == set(REPEATS)  # each has a case below
    assert [key for key, action in actions.items() if not isinstance(action, Extend)] == []
    assert len(actions) >= 20  # the shared flags of five commands, the commands' own, imagenet_scale's


CASES = [(name, flag) for name, parser in PARSERS.items() for flag in several_valued(parser)]


@pytest.mark.parametrize("command, flag", CASES, ids=[" ".join(c) for c in CASES])
def test_a_repeated_flag_adds_up_and_its_first_use_replaces_the_default(command, flag):
    first, second, both = REPEATS[flag]
    parser, dest = PARSERS[command], flag.lstrip("-")
    assert getattr(parser.parse_args([flag, *first, flag, *second]), dest) == both
    assert getattr(parser.parse_args([flag, *first, *second]), dest) == both  # the same as one use
    alone = getattr(parser.parse_args([flag, *second]), dest)
    assert alone == both[len(both) - len(second) :], "the first use must replace the default, not extend it"


def test_a_repeated_set_reaches_the_run_config(tmp_path, monkeypatch):
    """The issue's command: the second --set once replaced the first, and alpha stayed the preset's."""
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--config", "digits_drainage", "--quiet", "--name", "r"]
    assert run_here([*argv, "--set", "loss_params.alpha=0.5", "--set", "epochs=1"]) == 0
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert (config["loss_params"]["alpha"], config["epochs"]) == (0.5, 1)


def test_a_repeated_flag_is_in_the_reproduce_line_and_every_run(tmp_path, capsys):
    args = ["sweep", "--losses", "ce", "--losses", "mae", "--seeds", "1", "--set", "epochs=1"]
    args += ["--set", "batch_size=256", "--runs_dir", str(tmp_path / "sw"), "--out", str(tmp_path / "r")]
    assert run_here(args) == 0
    capsys.readouterr()
    line = "python -m train sweep --dataset digits --losses ce mae --noise asym:0.4 --seeds 1 --set epochs=1 "
    assert line + "batch_size=256" in (tmp_path / "r.md").read_text()
    for loss in ("ce", "mae"):
        config = json.loads((tmp_path / "sw" / loss / "asym0.4" / "s1" / "config.json").read_text())
        assert (config["epochs"], config["batch_size"]) == (1, 256)


def test_a_repeated_set_reaches_the_imagenet_scale_config():
    args = scale_parser().parse_args(["--set", "epochs=1", "--set", "lr=0.5", "loss_params.alpha=0.2"])
    cfg, _, smoke = resolve(args)
    assert smoke and (cfg.epochs, cfg.lr, cfg.loss_params["alpha"]) == (1, 0.5, 0.2)


# an item given twice, over one use or two: its runs would be the same runs, trained twice
TWICE = [
    (["sweep", "--losses", "ce", "--losses", "ce"], "--losses ce: given twice"),
    (
        ["clean", "--noise", "asym:0.4", "--noise", "asym:0.40"],
        "--noise asym:0.40: given twice (as asym:0.4)",
    ),
    (["sweep", "--grid", "lr=0.1", "--grid", "lr=0.3"], "--grid lr: given twice"),
    (["sweep", "--grid", "lr=0.1,0.1"], "--grid lr=0.1,0.1: value 0.1: given twice"),
    (["osr", "--methods", "ce", "--methods", "ce"], "--methods ce: given twice"),
    (["demo789", "--methods", "ce", "ce"], "--methods ce: given twice"),
    (["osr", "--splits", "1", "--splits", "1"], "--splits 1: given twice"),
    (["clean", "--ks", "5", "--ks", "5"], "--ks 5: given twice"),
    (["clean", "--runs", "runs/a", "--runs", "./runs/a/"], "--runs ./runs/a/: given twice (as runs/a)"),
]


@pytest.mark.parametrize("argv, message", TWICE, ids=[" ".join(a) for a, _ in TWICE])
def test_an_item_given_twice_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_here(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert listing(tmp_path) == []
