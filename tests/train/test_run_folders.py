"""Run folders (issue 13, items 1, 2 and 4): a run never reuses, overwrites or mixes with another run's
folder, also when processes start at the same moment; a sweep reuses only a finished run of the same
config; a command that fails leaves nothing half-made, and an error that ends a run is in its train.log."""

import json

import pytest

from tests.train.support import TINY, finish, listing, metrics_epochs, run_here, start_overlapping
from train.config import load_config
from train.experiment import default_run_name, run_experiment
from train.openset.splits import SPLIT_DIR
from train.trainer import Trainer


def test_parallel_runs_with_default_names_get_a_folder_each(tmp_path):
    """The grid loop of the issue with equal settings: both runs ask for the same default name in the
    same second; each must get a folder of its own with only its own rows."""
    results = finish([start_overlapping(["run", *TINY], tmp_path) for _ in range(2)])
    assert [code for code, _, _ in results] == [0, 0], results
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and folders[1].name == folders[0].name + "-2"
    for folder in folders:
        assert metrics_epochs(folder) == [1, 2]
        assert json.loads((folder / "summary.json").read_text())["epochs"] == 2


def test_parallel_runs_with_one_name_one_wins(tmp_path):
    results = finish([start_overlapping(["run", *TINY, "--name", "same"], tmp_path) for _ in range(2)])
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser_stderr = next(err for code, _, err in results if code == 2)
    assert "runs/same already exists" in loser_stderr and "Traceback" not in loser_stderr
    assert metrics_epochs(tmp_path / "runs" / "same") == [1, 2]


def test_parallel_sweeps_on_one_runs_dir_never_mix(tmp_path):
    args = [
        "sweep",
        "--losses",
        "ce",
        "--seeds",
        "1",
        "--set",
        "epochs=2",
        "batch_size=256",
        "--runs_dir",
        "sw",
    ]
    results = finish([start_overlapping([*args, "--out", f"report{i}"], tmp_path) for i in range(2)])
    assert [code for code, _, _ in results] == [0, 0], results
    folders = sorted((tmp_path / "sw" / "ce" / "asym0.4").iterdir())
    assert [f.name for f in folders] in (["s1"], ["s1", "s1-2"])  # s1 alone: one sweep reused the other's
    for folder in folders:
        assert metrics_epochs(folder) == [1, 2]


def test_default_names_differ_by_config_and_read_like_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda *args: "20260101-000000")  # the same second for all
    names = {lr: default_run_name(load_config("digits", [f"lr={lr}"])) for lr in (0.1, 0.03)}
    assert names[0.1] != names[0.03]
    assert names[0.1].startswith("20260101-000000-digits-drainage-asym0.4-s1-")


def test_a_named_run_is_never_overwritten_without_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_here(["run", *TINY, "--name", "r"]) == 0
    before = (tmp_path / "runs" / "r" / "metrics.jsonl").read_text()
    assert run_here(["run", *TINY, "epochs=1", "--name", "r"]) == 2
    assert "runs/r already exists" in capsys.readouterr().err
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").read_text() == before
    # --overwrite with a mistake in it: the old run stays (checked before anything is removed)
    assert run_here(["run", *TINY, "lr=-1", "--name", "r", "--overwrite"]) == 2
    assert (tmp_path / "runs" / "r" / "metrics.jsonl").read_text() == before
    assert run_here(["run", *TINY, "epochs=1", "--name", "r", "--overwrite"]) == 0
    assert metrics_epochs(tmp_path / "runs" / "r") == [1]


def test_sweep_reuses_only_a_finished_run_of_the_same_config(tmp_path, capsys):
    def sweep(epochs, out):
        assert (
            run_here(
                [
                    "sweep",
                    "--losses",
                    "ce",
                    "--seeds",
                    "1",
                    "--set",
                    f"epochs={epochs}",
                    "batch_size=256",
                    "--runs_dir",
                    str(tmp_path / "sw"),
                    "--out",
                    str(tmp_path / out),
                ]
            )
            == 0
        )
        return capsys.readouterr().out

    sweep(1, "one")
    text = sweep(2, "two")
    assert "1 run: 0 reused, 0 continued from their checkpoint, 1 to run" in text
    assert "s1: not reused, its config differs: epochs 1 (wanted 2)" in text
    two = json.loads((tmp_path / "sw" / "ce" / "asym0.4" / "s1-2" / "summary.json").read_text())
    assert two["epochs"] == 2
    assert f"{100 * two['last_eval_acc']:.2f}" in (tmp_path / "two.md").read_text()
    text = sweep(2, "again")
    assert "1 reused, 0 continued from their checkpoint, 0 to run" in text
    assert "s1-2: reused (finished, same config)" in text


FAILED_STARTS = [  # the issue's: a bad model (unknown, or one that cannot take the images), loss, dataset, lr
    ["run", "--set", "model=nope"],
    ["run", "--set", "model=cnn8"],
    ["run", "--set", "loss=nope"],
    ["run", "--set", "lr=-1"],
    ["run", "--config", "cifar10_drainage", "--set", "data_root=nodata", "download=false"],
    ["sweep", "--set", "model=cnn4"],
    ["default", "--set", "model=resnet34"],
    ["osr", "--set", "model=cnn8"],
]


@pytest.mark.parametrize("argv", FAILED_STARTS, ids=[" ".join(a) for a in FAILED_STARTS])
def test_a_failed_start_leaves_no_folder(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert run_here(argv) == 2
    assert listing(tmp_path) == [] and "Traceback" not in capsys.readouterr().err


def test_osr_without_data_writes_nothing_and_no_split_into_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = listing(SPLIT_DIR)
    assert run_here(["osr", "--dataset", "cifar10", "--set", "data_root=nodata", "download=false"]) == 2
    assert listing(tmp_path) == [] and listing(SPLIT_DIR) == splits


def test_osr_writes_a_new_split_beside_its_results(tmp_path):
    assert (
        run_here(
            [
                "osr",
                "--splits",
                "7",
                "--methods",
                "ce",
                "--set",
                "epochs=1",
                "--runs_dir",
                str(tmp_path / "runs"),
                "--out",
                str(tmp_path / "osr"),
            ]
        )
        == 0
    )
    assert (tmp_path / "runs" / "splits" / "digits_6-4_seed7.json").exists()
    assert not (SPLIT_DIR / "digits_6-4_seed7.json").exists()


def test_an_error_that_ends_a_run_is_in_its_train_log(tmp_path, monkeypatch):
    def broken_fit(self, *args, **kwargs):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Trainer, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        run_experiment(load_config("digits", {"epochs": 1}), tmp_path / "run", quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: a bug in the loop" in log


@pytest.mark.parametrize(
    "dataset, overrides, noise",
    [
        ("svhn", ["model=cnn8", "noise_type=sym", "noise_rate=0.4"], "-sym0.4-"),
        ("mnist", ["model=cnn4", "noise_type=asym", "noise_rate=0.2"], "-asym0.2-"),
        ("cifar10n", ["model=cnn8", "noise_type=sym", "noise_rate=0.4"], "-human-"),
    ],
)
def test_a_default_run_name_names_the_noise_the_run_trains_with(dataset, overrides, noise):
    """Every SVHN run was once named "human" noise (the test was dataset.endswith("n"))."""
    name = default_run_name(load_config(None, [f"dataset={dataset}", *overrides]))
    assert noise in name and name.count("human") == (noise == "-human-"), name
