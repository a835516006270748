"""Helpers shared by the tests of train/scale/: the DALI skip marker, a tiny CPU config, and runners for
the command (a subprocess, or main() in this process where a test needs no fresh interpreter)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIZE = (36, 48)
HAS_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
needs_dali = pytest.mark.skipif(
    not HAS_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
)

TINY_CONFIG = {
    "dataset": "webvision",
    "model": "resnet50",
    "loss": "drainage",
    "loss_params": {"alpha": 0.1},
    "l1_delta": 1e-5,
    "noise_type": "none",
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "scheduler": "step",
    "step_size": 1,
    "gamma": 0.97,
    "epochs": 3,
    "batch_size": 16,
    "eval_batch_size": 32,
    "grad_clip": 5.0,
    "seed": 3,
    "device": "cpu",
}  # gloo on the CPU on every machine: on one GPU, rank 1 would ask for cuda:1


def tiny_run_args(data_root: Path, out: Path, **config) -> list[str]:
    """Flags of a run of the tiny CPU config (TINY_CONFIG updated by `config`) on a generated WebVision
    tree, written to out/tiny.json; the torch loader in-process, so that main() runs in the test."""
    path = out / "tiny.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**TINY_CONFIG, **config}))
    return [
        "--config",
        str(path),
        "--data_root",
        str(data_root),
        "--arch",
        "tiny_convnet",
        "--crop",
        "32",
        "--resize",
        "36",
        "--out_dir",
        str(out),
        "--quiet",
        "--loader",
        "torch",
        "--workers",
        "0",
    ]


def run_module(
    args: list[str], *, torchrun: int = 0, timeout: float = 300, check: bool = True, wait: bool = True
):
    """Runs `python -m train.imagenet_scale ARGS` (under torchrun with `torchrun` processes) from the repo;
    wait=False returns the Popen."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    command = [*launcher, "-m", "train.imagenet_scale", *args]
    if not wait:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    proc = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """main(args) in this process: (exit status, stdout, stderr)."""
    from train.imagenet_scale import main

    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err
