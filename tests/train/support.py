"""Running `python -m train` as the user does: in a fresh process (for exit codes, stderr, and processes
that run at the same time) or in this one (for speed), from a given working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train.cli import main

REPO = Path(__file__).resolve().parents[2]

# `python -m train` whose clock reads the same second for every process and whose epochs take at least
# 0.4 s: two such processes started together ask for the same default folder at the same moment and
# train at the same time, which is what the collision tests need (a real grid loop does it by chance)
OVERLAPPING_CLI = """
import sys, time
time.strftime = lambda *args: "20260101-000000"
import train.trainer
epoch = train.trainer.Trainer.train_epoch
def slow_epoch(self):
    time.sleep(0.4)
    return epoch(self)
train.trainer.Trainer.train_epoch = slow_epoch
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""
# `python -m train` that sends itself SIGINT (Ctrl-C) as training epoch number CUT_AT of the process begins
# (CUT_AT=0: never): the real signal, delivered mid-epoch
CUT_CLI = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started ignoring it
import train.trainer
at, calls = int(os.environ["CUT_AT"]), [0]
epoch = train.trainer.Trainer.train_epoch
def cut_epoch(self):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGINT)
    return epoch(self)
train.trainer.Trainer.train_epoch = cut_epoch
from train.cli import main
sys.exit(main(sys.argv[1:]))
"""
# a run that takes about a second: digits, two epochs, no training-set statistics
TINY = ["--config", "digits", "--quiet", "--set", "epochs=2", "batch_size=256", "train_stats=false"]


def environment() -> dict:
    """This environment for a child `python -m train`: the repository importable, and Triton's CPU
    interpreter (which the test session switches on) off, as a user has it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


def start_overlapping(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", OVERLAPPING_CLI, *args],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cut(args: list[str], cwd: Path, at: int) -> subprocess.CompletedProcess:
    """`python -m train *args` in cwd, Ctrl-C as its training epoch number `at` begins (0: never)."""
    return subprocess.run(
        [sys.executable, "-c", CUT_CLI, *args],
        cwd=cwd,
        env=environment() | {"CUT_AT": str(at)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, waiting for all."""
    outputs = [p.communicate(timeout=300) for p in processes]
    return [(p.returncode, *out) for p, out in zip(processes, outputs)]


def run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run_here(args: list[str]) -> int:
    """main(args) in this process; an argparse mistake's SystemExit becomes its exit status."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def listing(folder: Path) -> list[str]:
    """Every path under folder, relative, sorted: what a command left on disk."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
