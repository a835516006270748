"""A user's mistake ends in one line naming the argument, the value and what would be accepted, exit status
2, and nothing on disk; a bug keeps its traceback (issue 13, items 5-8 and 10). --set values are read by
the type their Config field declares; a resume applies the overrides that are safe and refuses the rest."""

import json
import math
import shutil

import pytest
import torch

from tests.train.support import TINY, listing, metrics_epochs, run_here, run_module
from train.config import load_config
from train.grid import parse_noise
from train.openset.splits import SPLIT_DIR
from train.run_dirs import UserError

MISTAKES = [  # (argv, what the one line must say)
    (["run", "--set", "epochs=abc"], "epochs=abc: epochs takes an integer"),
    (["run", "--set", "lr=abc"], "lr=abc: lr takes a number"),
    (["run", "--set", "noise_rate=abc"], "noise_rate=abc: noise_rate takes a number"),
    (["run", "--set", "epochs=2.5"], "epochs=2.5: epochs takes an integer"),
    (["run", "--set", "tuning=maybe"], "tuning=maybe: tuning takes true or false"),
    (["run", "--set", "eval_batch_size=0"], "eval_batch_size=0: must be an integer >= 1"),
    (["run", "--set", "device=mps"], "device=mps: must be auto, cpu, cuda or cuda:N"),
    (["run", "--set", "loss_params={alpha:0.5}"], "loss_params={alpha:0.5}: loss_params takes a JSON object"),
    (["run", "--set", "model=nope"], "model=nope: unknown model; choose from"),
    (["run", "--set", "lr=-1"], "lr=-1: must be a number > 0"),
    (["run", "--config", "nope"], "--config nope: not a .json file, and not one of"),
    (["run", "--run_epochs", "-1"], "argument --run_epochs: expected an integer >= 1, got '-1'"),
    (["run", "--resume", "nonexistent"], "--resume nonexistent: no such run folder"),
    (["sweep", "--seeds", "3-1"], "argument --seeds: expected seeds (integers >= 0) or a range FIRST-LAST"),
    (["clean", "--seeds", "x"], "argument --seeds: expected seeds (integers >= 0) or a range FIRST-LAST"),
    (["osr", "--seeds", "1", "1-2"], "argument --seeds: seed 1 given twice"),
    (["demo789", "--set"], "argument --set: expected at least one argument"),
    (["default", "--set"], "argument --set: expected at least one argument"),
    (
        ["sweep", "--seeds", "2", "--seed_start", "101"],
        "--seed_start 101: gone; --seeds lists the seeds themselves, e.g. --seeds 101-105",
    ),
    (["clean", "--noise", "asym:0.4", "sym"], "--noise sym: a noise setting is TYPE:RATE"),
    (["sweep", "--noise", "asym"], "--noise asym: a noise setting is TYPE:RATE"),
    (["sweep", "--set", "epochs=abc"], "epochs=abc: epochs takes an integer"),
    (["osr", "--set", "amp=perhaps"], "amp=perhaps: amp takes true or false"),
    # issue 22: the abstention rule, the schedules' epochs, the new losses in every command
    (["run", "--set", "coverage=0.9", "tuning=true"], "coverage=0.9: must be null when tuning=true"),
    (["run", "--set", "coverage=0"], "coverage=0: must be null or a number in (0, 1]"),
    (
        ["run", "--config", "digits_dac", "--set", "loss_params.learn_epochs=3", "epochs=3"],
        "loss_params.learn_epochs=3: must be < epochs=3",
    ),
    (
        ["sweep", "--losses", "gamblers", "--set", "loss_params.reward=1"],
        "reward must be a finite number > 1",
    ),
    (["clean", "--losses", "dac", "--set", "loss_params.pretrain=2"], "got unknown ['pretrain']"),
    (["osr", "--methods", "dac", "nonsense"], "--methods nonsense: unknown loss"),
    (["sweep", "--openset_splits", "0-2", "2"], "argument --openset_splits: seed 2 given twice"),
]


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2_and_leaves_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_here(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "error" in err, err
    assert listing(tmp_path) == []


def test_a_mistake_from_the_shell_has_no_traceback_and_the_backend_is_checked_on_the_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("Triton runs on this machine's GPU: backend=triton is no mistake here")
    result = run_module(["run", "--config", "digits", "--set", "loss_params.backend=triton"], tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "loss_params.backend=triton: cannot run on cpu" in result.stderr
    assert listing(tmp_path) == []


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only UserError is a user's mistake: a ValueError from a bug must not be turned into exit status 2."""

    def bug(*args, **kwargs):
        raise ValueError("not a user's mistake")

    monkeypatch.setattr("train.experiment.run_experiment", bug)
    with pytest.raises(ValueError, match="not a user's mistake"):
        run_here(["run", *TINY])


def test_set_values_are_read_by_their_declared_type():
    cfg = load_config(
        "digits",
        [
            "tuning=no",
            "amp=OFF",
            "nesterov=Yes",
            "compile=0",
            "train_stats=on",
            "deterministic=False",
            "epochs=7",
            "lr=1e-2",
            "pretrained=null",
            "name=123",
            "optimizer=adam",
            "loss_params.alpha=0.5",
            'loss_params={"alpha": 2}',
        ],
    )
    assert (cfg.tuning, cfg.amp, cfg.nesterov, cfg.compile, cfg.train_stats, cfg.deterministic) == (
        False,
        False,
        True,
        False,
        True,
        False,
    )
    assert (cfg.epochs, cfg.lr, cfg.pretrained, cfg.name, cfg.optimizer) == (7, 0.01, None, "123", "adam")
    assert cfg.loss_params == {"alpha": 2} and isinstance(cfg.epochs, int)
    assert load_config("digits", {"tuning": "off", "epochs": 3}).tuning is False  # dict overrides alike
    with pytest.raises(UserError, match="loss_params.alpha='big': drainage takes a number"):
        load_config("digits", ["loss_params.alpha=big"])


def test_a_noise_setting_needs_its_rate():
    assert parse_noise("asym:0.4") == ("asym", 0.4) and parse_noise("none") == ("none", 0.0)
    for bad in ("asym", "asym:", "asym:x", "asym:1.5", "gaussian:0.2"):
        with pytest.raises(UserError, match=f"--noise {bad}:"):
            parse_noise(bad)


@pytest.fixture(scope="module")
def chunked_run(tmp_path_factory):
    """A run of 3 planned epochs stopped after 2 (lr 0.1, cosine), with its checkpoint."""
    tmp = tmp_path_factory.mktemp("resume")
    assert (
        run_here(
            ["run", *TINY, "epochs=3", "lr=0.1", "--out_dir", str(tmp), "--name", "r", "--run_epochs", "2"]
        )
        == 0
    )
    return tmp / "r"


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign"])
def test_resume_of_a_damaged_checkpoint_is_a_sentence(chunked_run, tmp_path, capsys, damage):
    run_dir = copy_of(chunked_run, tmp_path)
    checkpoint = run_dir / "last.pt"
    if damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, checkpoint)
    else:
        checkpoint.write_bytes(
            {"truncated": checkpoint.read_bytes()[:2000], "empty": b"", "garbage": b"not a checkpoint\n"}[
                damage
            ]
        )
    before = {p: p.read_bytes() for p in run_dir.iterdir()}
    assert run_here(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {run_dir}: {checkpoint}" in err, err
    assert {p: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing in the run changed


def test_resume_applies_epochs_and_refuses_what_would_make_another_run(chunked_run, tmp_path, capsys):
    run_dir = copy_of(chunked_run, tmp_path)
    assert run_here(["run", "--resume", str(run_dir), "--set", "lr=0.5"]) == 2
    assert "lr cannot change when a run resumes (only epochs, eval_freq can)" in capsys.readouterr().err
    assert run_here(["run", "--resume", str(run_dir), "--seed", "7"]) == 2
    assert "a resumed run keeps its config" in capsys.readouterr().err
    assert run_here(["run", "--resume", str(run_dir), "--set", "epochs=1"]) == 2
    assert "has trained 2 epochs already" in capsys.readouterr().err

    assert run_here(["run", "--resume", str(run_dir), "--set", "epochs=4", "--quiet"]) == 0
    assert metrics_epochs(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # epochs 3 and 4 follow the cosine over the new length, as a run planned for 4 epochs would
    for row in rows[2:]:
        assert row["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * (row["epoch"] - 1) / 4)) / 2)


def test_osr_grid_mistakes_leave_no_split_in_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    splits = listing(SPLIT_DIR)
    assert run_here(["osr", "--splits", "9", "--methods", "ce", "--grid", "drainage_logit=0,1"]) == 2
    assert "drainage_const only" in capsys.readouterr().err
    assert listing(tmp_path) == [] and listing(SPLIT_DIR) == splits


# A model whose output count does not fit the loss (issue 20, item 6): a Drainage model with C outputs
# would train until a batch holds class C - 1 (the drainage index), so it is refused before training.
WRONG_OUTPUTS = [  # (argv, outputs the model emits, what the line must say)
    (
        ["run", "--config", "digits_drainage"],
        10,
        "model=digits_mlp: emits 10 outputs per image; loss=drainage on digits (10 classes) needs 11 "
        "outputs (10 class logits and the abstain (drainage) output: K = C + 1)",
    ),
    (
        ["run", "--config", "digits_dac"],
        10,
        "model=digits_mlp: emits 10 outputs per image; loss=dac on digits (10 classes) needs 11 outputs",
    ),
    (
        ["osr", "--methods", "gamblers", "--splits", "0"],
        6,
        "emits 6 outputs per image; loss=gamblers on digits (6 classes) needs 7 outputs",
    ),
    (
        ["sweep", "--losses", "ce"],
        11,
        "model=digits_mlp: emits 11 outputs per image; loss=ce on digits (10 classes) needs 10, one a class",
    ),
    (
        ["osr", "--methods", "drainage", "--splits", "0"],
        6,
        "emits 6 outputs per image; loss=drainage on digits (6 classes) needs 7 outputs",
    ),
]


@pytest.mark.parametrize(
    "argv, emitted, message", WRONG_OUTPUTS, ids=[" ".join(a) for a, _, _ in WRONG_OUTPUTS]
)
def test_a_model_with_the_wrong_output_count_is_refused_before_training(
    argv, emitted, message, tmp_path, monkeypatch, capsys
):
    from train.models import MODELS, digits_mlp

    monkeypatch.setitem(MODELS, "digits_mlp", lambda outputs: digits_mlp(emitted))
    monkeypatch.chdir(tmp_path)
    assert run_here(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert listing(tmp_path) == []
