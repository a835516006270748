"""train/jobs.py (issue 20, item 2): a multi-run command cut by Ctrl-C says in one line what finished,
what was cut and the command that continues; that command continues the cut run in place from its
checkpoint, reuses the finished ones, and ends with the same results, bit for bit on the CPU (time
columns aside), as a job never cut, leaving no empty or duplicated folder. Sweeps are cut by a real
SIGINT in a child process (one process, and --jobs 2); osr, clean and demo789 in this process."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys

import pytest
import torch

from tests.train.support import environment, listing, metrics_epochs, run_cut, run_here, run_module
from train.jobs import Job, same_json
from train.run_dirs import lock_run_dir, unlock_run_dir
from train.trainer import CHECKPOINT, CHECKPOINT_KEYS, Trainer

SWEEP = ["sweep", "--losses", "drainage", "ce", "--seeds", "1", "2", "--set", "epochs=3", "batch_size=256"]
SWEEP += ["--runs_dir", "sw", "--out", "report"]


def continuing(stderr: str) -> list[str]:
    """The arguments of the command the one line says continues the job."""
    assert stderr.count("\n") == 1, stderr
    words = shlex.split(stderr.split("; continue with: ")[1])
    assert words[:3] == ["python", "-m", "train"], words
    return words[3:]


def rows(path) -> list[dict]:
    """A report CSV without its time columns (train_time_s and its mean / std)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if "time_s" not in k} for r in csv.DictReader(f)]


def assert_same_job(cut_dir, uncut_dir, report="report"):
    """The same report (markdown whole, CSVs without time columns) and the same files in the runs."""
    assert (cut_dir / f"{report}.md").read_text() == (uncut_dir / f"{report}.md").read_text()
    for suffix in (".csv", "_runs.csv"):
        assert rows(cut_dir / f"{report}{suffix}") == rows(uncut_dir / f"{report}{suffix}"), suffix
    assert listing(cut_dir / "sw") == listing(uncut_dir / "sw")


@pytest.fixture(scope="module")
def uncut_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncut")
    done = run_cut(SWEEP, tmp, at=0)
    assert done.returncode == 0, done.stderr
    return tmp


# (epoch at which Ctrl-C comes, the line's counts and cut run): 1 = in the first epoch of the first
# run, whose last.pt then holds epoch 0; 5 = in epoch 2 of the second run
CUTS = {
    1: "interrupted: 0 of 4 runs finished; cut: sw/drainage/asym0.4/s1 (its last.pt holds epoch 0)",
    5: "interrupted: 1 of 4 runs finished; cut: sw/drainage/asym0.4/s2 (its last.pt holds epoch 1)",
}


@pytest.mark.parametrize("at", CUTS)
def test_a_sweep_cut_by_ctrl_c_continues_to_the_same_table(at, uncut_sweep, tmp_path):
    cut = run_cut(SWEEP, tmp_path, at=at)
    assert cut.returncode == 130 and "Traceback" not in cut.stderr, cut.stderr
    assert cut.stderr.startswith(f"python -m train sweep: {CUTS[at]}; continue with: python -m train sweep ")
    command = continuing(cut.stderr)  # the Reproduce line's, and where the job's outputs are
    assert command == [
        *("sweep --dataset digits --losses drainage ce --noise asym:0.4 --seeds 1 2".split()),
        *("--set epochs=3 batch_size=256 --runs_dir sw --out report".split()),
    ]
    cut_run = tmp_path / CUTS[at].split("cut: ")[1].split(" ")[0]
    # on disk: the cut run with its checkpoint and the line that continues it; no folder of a run that
    # had not started; nothing half-made
    assert (cut_run / CHECKPOINT).is_file() and not (cut_run / "summary.json").exists()
    assert train_log_line(cut_run).endswith(
        f"continue with: {shlex.join(['python', '-m', 'train', *command])}"
    )
    assert not (tmp_path / "sw" / "ce").exists() and not (tmp_path / "report.md").exists()

    again = run_module(command, tmp_path)
    assert again.returncode == 0, again.stderr
    finished = 0 if at == 1 else 1
    assert (
        f"4 runs: {finished} reused, 1 continued from their checkpoint, {3 - finished} to run" in again.stdout
    )
    assert_same_job(tmp_path, uncut_sweep)  # no s1-2, no empty folder, no last.pt left (checkpoint=false)


def train_log_line(run_dir) -> str:
    return (run_dir / "train.log").read_text().strip().splitlines()[-1]


# `python -m train sweep --jobs 2` that sends itself (the parent, not its workers) Ctrl-C once its first
# run has finished: the runs in progress in the workers stop wherever they are
PARALLEL_CUT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started ignoring it
import train.commands.sweep as sweep
progress = sweep._progress
def cut_progress(n, *args):
    progress(n, *args)
    if n == 1:
        os.kill(os.getpid(), signal.SIGINT)
sweep._progress = cut_progress
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_parallel_sweep_cut_by_ctrl_c_continues_to_the_same_table(uncut_sweep, tmp_path):
    """The digits presets train on one CPU thread (cpu_threads=1), as a worker does: the same bits as
    the sweep in one process."""
    argv = [sys.executable, "-c", PARALLEL_CUT, *SWEEP, "--jobs", "2"]
    cut = subprocess.run(argv, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert cut.returncode == 130 and "Traceback" not in cut.stderr, cut.stderr
    assert cut.stderr.startswith("python -m train sweep: interrupted: ")
    command = continuing(cut.stderr)
    assert command[-2:] == ["--jobs", "2"]
    again = run_module(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_job(tmp_path, uncut_sweep)


def cut_in_epoch(monkeypatch, at: int):
    """Ctrl-C (KeyboardInterrupt) as training epoch number `at` of this process begins."""
    calls, epoch = [0], Trainer.train_epoch

    def cut(self):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", cut)


# two runs of two epochs each: Ctrl-C comes in epoch 2 of the second run (the fourth epoch trained)
JOBS = {
    "osr": ["osr", "--splits", "0", "--methods", "ce", "drainage", "--set", "epochs=2"],
    "clean": ["clean", "--losses", "drainage", "ce", "--set", "epochs=2", "batch_size=256"],
    "demo789": ["demo789", "--set", "epochs=2"],
}


@pytest.mark.parametrize("name", JOBS)
def test_osr_clean_and_demo789_cut_by_ctrl_c_continue_to_the_same_report(name, tmp_path, monkeypatch, capsys):
    argv = [*JOBS[name], "--runs_dir", "sw", "--out", "report"]
    (tmp_path / "uncut").mkdir()
    (tmp_path / "cut").mkdir()
    monkeypatch.chdir(tmp_path / "uncut")
    assert run_here(argv) == 0
    monkeypatch.chdir(tmp_path / "cut")
    with monkeypatch.context() as patched:
        cut_in_epoch(patched, 4)
        assert run_here(argv) == 130
    err = capsys.readouterr().err
    assert f"python -m train {name}: interrupted: 1 of 2 runs finished" in err, err
    assert "(its last.pt holds epoch 1); continue with: " in err, err
    assert run_here(continuing(err)) == 0
    assert "continued from their checkpoint" in capsys.readouterr().out
    assert_same_job(tmp_path / "cut", tmp_path / "uncut")
    report = (tmp_path / "cut" / "report.md").read_text()  # one seed: said so, never "over 1 seeds"
    assert "over 1 " not in report and ("one seed, no spread" in report or "one run, no spread" in report)


SAME = {"config.json": {"lr": 0.1}}


def folder(path, config=None, checkpoint: bytes | None = None):
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if checkpoint is not None:
        (path / CHECKPOINT).write_bytes(checkpoint)
    return path


def valid_checkpoint(tmp_path) -> bytes:
    torch.save({key: 0 for key in CHECKPOINT_KEYS}, tmp_path / "c.pt")
    return (tmp_path / "c.pt").read_bytes()


def claim(job, parent):
    run = job.plan(parent, "s1", lambda d: same_json(d, SAME), lambda d: (d / "summary.json").is_file())
    return run.preview, job.claim(run)


def test_which_folder_a_planned_run_takes(tmp_path, capsys):
    runs = tmp_path / "runs"
    cut = folder(runs / "cut" / "s1", SAME["config.json"], valid_checkpoint(tmp_path))
    (cut / ".last.pt.123.tmp").write_bytes(b"half a checkpoint")  # a write cut by a kill
    damaged = folder(runs / "damaged" / "s1", SAME["config.json"], b"not a checkpoint")
    unstarted = folder(runs / "unstarted" / "s1", SAME["config.json"])
    (unstarted / "train.log").write_text("the start of a run killed before its first checkpoint\n")
    folder(runs / "empty" / "s1")
    finished = folder(runs / "finished" / "s1", SAME["config.json"])
    (finished / "summary.json").write_text("{}")
    other = folder(runs / "other" / "s1", {"lr": 0.3}, valid_checkpoint(tmp_path))
    held = folder(runs / "held" / "s1", SAME["config.json"], valid_checkpoint(tmp_path))
    before = listing(other)
    lock = lock_run_dir(held)  # as if another process were training it (a second descriptor conflicts)
    try:
        with Job("the command", runs) as job:
            names = ("cut", "damaged", "unstarted", "empty", "finished", "other", "held")
            taken = {name: claim(job, runs / name) for name in names}
            assert job.counts() == "7 runs: 1 reused, 2 continued from their checkpoint, 4 to run"
            assert {name: slot.state for name, (preview, slot) in taken.items() if preview} == {
                "cut": "continue",
                "damaged": "new",  # the preview said "continue": its last.pt is read only when claimed
                "unstarted": "new",
                "empty": "new",
                "finished": "reused",
            }
            assert {name: (slot.run_dir.name, slot.lock is None) for name, (_, slot) in taken.items()} == {
                "cut": ("s1", False),
                "damaged": ("s1", False),
                "unstarted": ("s1", False),
                "empty": ("s1", False),
                "finished": ("s1", True),
                "other": ("s1-2", False),
                "held": ("s1-2", False),
            }
            assert not (cut / ".last.pt.123.tmp").exists() and (cut / CHECKPOINT).is_file()
            assert listing(unstarted) == [".lock"] and listing(damaged) == [".lock"]
    finally:
        unlock_run_dir(lock)
    out = capsys.readouterr().out
    assert f"{damaged}: trained again from the start" in out
    assert f"{other}: not reused, its config differs: lr 0.3 (wanted 0.1)" in out
    assert f"{held}: not reused, another process is training it now" in out
    assert f"{finished}: reused (finished, same config)" in out
    # at the end, the folders in which no run began are gone, with the folders left empty above them;
    # another run's folder was not even locked
    assert listing(other) == before and (held / CHECKPOINT).is_file()
    assert sorted(p.name for p in runs.iterdir()) == ["cut", "finished", "held", "other"]
    assert not (runs / "other" / "s1-2").exists()


def test_a_job_cut_before_its_runs_began_leaves_no_folder(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt, match="^interrupted: 0 of 3 runs finished; cut: none; continue"):
        with Job("the command", runs) as job:
            claim(job, runs / "a" / "asym0.4")
            claim(job, runs / "b" / "asym0.4")
            job.plan(runs / "c", "s1", lambda d: None, lambda d: False)
            raise KeyboardInterrupt
    assert not runs.exists()


def test_run_cut_by_ctrl_c_prints_one_line_that_continues_it_also_with_quiet(tmp_path):
    argv = ["run", "--config", "digits", "--set", "epochs=3", "batch_size=256", "train_stats=false", "--name"]
    for name, quiet in (("loud", []), ("quiet", ["--quiet"])):
        cut = run_cut([*argv, name, *quiet], tmp_path, at=2)
        assert cut.returncode == 130 and "Traceback" not in cut.stderr, cut.stderr
        assert cut.stderr == (
            f"python -m train run: interrupted; runs/{name}/last.pt holds epoch 1 of 3; continue with: "
            f"python -m train run --resume runs/{name}\n"
        )
        assert (cut.stdout == "") == bool(quiet)
        assert run_module(continuing(cut.stderr), tmp_path).returncode == 0
        assert metrics_epochs(tmp_path / "runs" / name) == [1, 2, 3]


def test_a_run_cut_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def cut_at_start(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Trainer, "__init__", cut_at_start)
    assert run_here(["run", "--config", "digits", "--name", "r"]) == 130
    assert capsys.readouterr().err == (
        "python -m train run: interrupted before the first checkpoint; runs/r was removed\n"
    )
    assert run_here(["default"]) == 130
    assert listing(tmp_path) == ["runs"] and listing(tmp_path / "runs") == []


def test_resume_refuses_a_run_that_another_process_trains_or_an_open_set_run(tmp_path, capsys):
    run_dir = folder(tmp_path / "r", {"epochs": 1}, valid_checkpoint(tmp_path))
    lock = lock_run_dir(run_dir)
    try:
        assert run_here(["run", "--resume", str(run_dir)]) == 2
    finally:
        unlock_run_dir(lock)
    assert f"--resume {run_dir}: another process is training this run now" in capsys.readouterr().err
    (run_dir / "openset.json").write_text("{}")
    assert run_here(["run", "--resume", str(run_dir)]) == 2
    assert "an open-set run (osr, demo789); the command that started it continues" in capsys.readouterr().err
