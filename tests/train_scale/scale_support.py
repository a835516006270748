"""Helpers shared by the tests of train/scale/: the DALI skip marker and a runner for the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SIZE = (36, 48)
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


def run_module(args: list[str], *, torchrun: int = 0, timeout: float = 300, check: bool = True):
    """Runs `python -m train.imagenet_scale ARGS` (under torchrun with `torchrun` processes) from the repo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "train.imagenet_scale", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc
