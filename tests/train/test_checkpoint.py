"""train/checkpoint.py: every random number generator a run draws from comes back from a checkpoint
(issue 20, item 7). Before, nothing drew from the global torch RNG after a resume, so dropping its
restore left every test green; the first model with dropout would have made resume inexact."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from train.checkpoint import (
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    read_checkpoint,
    restore_rng_state,
)
from train.config import load_config
from train.experiment import run_experiment
from train.models import MODELS
from train.run_dirs import UserError
from train.trainer import CHECKPOINT


def draws(generator: torch.Generator) -> dict:
    """A few numbers from each RNG, the Gaussians' cached second values included."""
    out = {
        "python": [random.random(), random.gauss(0, 1)],
        "numpy": [*np.random.rand(2), np.random.randn()],
        "torch": torch.rand(3).tolist(),
        "generator": torch.rand(3, generator=generator).tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.rand(3, device="cuda").tolist()
    return out


@pytest.mark.parametrize("rng", ["python", "numpy", "torch", "generator", "cuda"])
def test_every_rng_comes_back_from_a_checkpoint(rng, tmp_path):
    if rng == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    generator = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # each now holds a cached Gaussian in its state
    atomic_save({"rng": capture_rng_state(generator)}, tmp_path / "c.pt")
    expected = draws(generator)
    state = load_checkpoint(tmp_path / "c.pt")["rng"]  # through torch.load(weights_only=True)
    random.seed(10), np.random.seed(20), torch.manual_seed(30), generator.manual_seed(50)
    assert draws(generator)[rng] != expected[rng]  # the test can fail: the state was lost
    restore_rng_state(state, generator)
    assert draws(generator)[rng] == expected[rng]


def dropout_mlp(num_outputs: int) -> nn.Module:
    """The digits MLP with dropout: each training batch draws its mask from the global torch RNG."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, num_outputs)
    )


def test_resume_is_exact_for_a_model_that_draws_from_the_global_rng(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "digits_mlp", dropout_mlp)
    cfg = load_config("digits", {"epochs": 3, "batch_size": 256, "train_stats": False})
    run_experiment(cfg, tmp_path / "straight", quiet=True)
    run_experiment(cfg, tmp_path / "chunked", quiet=True, stop_after=2)
    run_experiment(cfg, tmp_path / "chunked", quiet=True, resume=True)
    a, b = (load_checkpoint(tmp_path / name / CHECKPOINT) for name in ("straight", "chunked"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_missing_last_pt_says_why(tmp_path):
    """Issue 20: --resume of a run whose last.pt is gone names the file and the usual reason (a
    finished run of sweep, clean, osr or demo789 drops it), in one line for the user."""
    with pytest.raises(UserError) as caught:
        read_checkpoint(tmp_path / "last.pt", ("model",))
    message = str(caught.value)
    assert str(tmp_path / "last.pt") in message and "does not exist" in message
    assert "checkpoint=false" in message and "\n" not in message
