"""train/grid.py and the CLI vocabulary: grid syntax, the best grid point, the reproducing command, and
the shared flags (train/cli.py shared_parser) meaning the same in every command."""

from __future__ import annotations

import argparse
import shlex

import pytest

from train.cli import SHARED_FLAGS, build_parser
from train.grid import best_points, config_for, grid_points, parse_grid, point_overrides, reproducing_command


def test_string_grid_values_that_start_like_json_words_stay_strings():
    """scheduler=cosine,none once crashed: values starting with t, f or n were handed to json.loads."""
    axes = parse_grid(["scheduler=cosine,none", "optimizer=sgd,adam", "nesterov=true,false"])
    assert axes == [
        (None, "scheduler", ["cosine", "none"]),
        (None, "optimizer", ["sgd", "adam"]),
        (None, "nesterov", [True, False]),
    ]
    cfgs = [config_for("digits", "ce", point_overrides(p)) for p in grid_points("ce", axes)]
    assert [(c.scheduler, c.optimizer, c.nesterov) for c in cfgs][:3] == [
        ("cosine", "sgd", True),
        ("cosine", "sgd", False),
        ("cosine", "adam", True),
    ]
    assert {c.scheduler for c in cfgs} == {"cosine", "none"}


def test_best_points_averages_over_the_noise_settings_and_keeps_the_first_on_a_tie():
    agg = [
        {"loss": "ce", "params": "lr=0.1", "noise": "a", "m": 0.9},
        {"loss": "ce", "params": "lr=0.1", "noise": "b", "m": 0.5},
        {"loss": "ce", "params": "lr=0.3", "noise": "a", "m": 0.8},
        {"loss": "ce", "params": "lr=0.3", "noise": "b", "m": 0.8},
        {"loss": "gce", "params": "q=0.7", "noise": "a", "m": 0.6},
        {"loss": "gce", "params": "q=0.9", "noise": "a", "m": 0.6},
    ]
    assert best_points(agg, "loss", "m") == {"ce": ("lr=0.3", 0.8), "gce": ("q=0.7", 0.6)}
    assert best_points(agg, "loss", "m", keep=lambda a: a["noise"] == "a") == {
        "ce": ("lr=0.1", 0.9),
        "gce": ("q=0.7", 0.6),
    }


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def test_a_shared_flag_means_the_same_in_every_command():
    commands = subparsers()
    for flag in SHARED_FLAGS:
        given = {
            name: flag_actions(p)[f"--{flag}"]
            for name, p in commands.items()
            if f"--{flag}" in flag_actions(p)
        }
        assert len(given) >= 2, flag
        kinds = {(a.nargs, a.type, type(a).__name__, a.help, a.metavar) for a in given.values()}
        assert len(kinds) == 1, (flag, kinds)
    assert "--seeds" in flag_actions(commands["sweep"])
    assert flag_actions(commands["clean"])["--noise"].nargs == "+"


@pytest.mark.parametrize("command", ["sweep", "osr", "clean", "demo789"])
def test_seeds_is_a_list_or_a_range_everywhere(command):
    parser = build_parser()
    assert parser.parse_args([command, "--seeds", "4"]).seeds == [4]
    assert parser.parse_args([command, "--seeds", "1-3", "7"]).seeds == [1, 2, 3, 7]


def test_each_command_keeps_its_own_defaults():
    parser = build_parser()
    assert parser.parse_args(["sweep"]).seeds == [1, 2, 3]
    assert parser.parse_args(["osr"]).seeds == [1] and parser.parse_args(["clean"]).noise == ["asym:0.4"]


COMMAND_LINES = [
    [
        "sweep",
        "--dataset",
        "digits",
        "--losses",
        "ce",
        "gce",
        "--noise",
        "asym:0.4",
        "sym:0.6",
        "--seeds",
        "1-3",
        "--tuning",
        "--grid",
        "lr=0.03,0.1",
        "gce:loss_params.q=0.7",
        "--set",
        "epochs=2",
        'loss_params={"a": 1}',
    ],
    [
        "osr",
        "--dataset",
        "mnist",
        "--methods",
        "ce",
        "drainage",
        "--known",
        "5",
        "--splits",
        "0",
        "2",
        "--seeds",
        "3",
        "--drainage_logit",
        "4.5",
        "--unknown_train",
        "relabel",
        "--set",
        "epochs=1",
    ],
    ["osr", "--split_files", "a.json", "b.json", "--seeds", "1", "2"],
    [
        "clean",
        "--losses",
        "drainage",
        "--noise",
        "asym:0.2",
        "--seeds",
        "1",
        "5",
        "--ks",
        "5",
        "10",
        "--grid",
        "drainage:loss_params.alpha=0.03,1",
    ],
    ["clean", "--runs", "runs/a b", "runs/c"],
    ["demo789", "--methods", "drainage", "--seeds", "1", "2", "--tuning", "--grid", "lr=0.01,0.1"],
]


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda a: " ".join(a[:2]))
def test_the_reproducing_command_reads_back_as_the_same_job(argv):
    """Each report's "Reproduce" line is one helper's (grid.reproducing_command) and parses to the job."""
    import importlib

    parser = build_parser()
    args = parser.parse_args(argv)
    line = importlib.import_module(f"train.commands.{argv[0]}").command_line(args)
    words = shlex.split(line)
    assert words[:4] == ["python", "-m", "train", argv[0]]
    again = parser.parse_args(words[3:])
    ignored = {"runs_dir", "out", "title", "jobs", "seed_start"}
    assert {k: v for k, v in vars(again).items() if k not in ignored} == {
        k: v for k, v in vars(args).items() if k not in ignored
    }


def test_reproducing_command_leaves_out_what_is_not_given():
    args = argparse.Namespace(a=None, b=False, c=[], d=True, e=0.5, f=["x", "y z"])
    assert reproducing_command("sweep", args, "abcdef") == "python -m train sweep --d --e 0.5 --f x 'y z'"
