"""Deep Gamblers and DAC in the large-scale loop (train/scale/loop.py): the schedule moves per epoch, its
state is in the checkpoint (a resumed run continues it bit for bit), and under DDP every rank ramps the
alpha of the global batch (2 gloo processes against 1)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.scale.support import run_main, run_module, tiny_run_args

DAC = {"loss": "dac", "loss_params": {"learn_epochs": 1}}


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


@pytest.mark.parametrize(
    "config, phases",
    [
        (DAC, ["warm-up", "abstain", "abstain"]),
        ({"loss": "gamblers", "loss_params": {"pretrain": 2}}, ["pretrain", "pretrain", "gamblers"]),
    ],
    ids=["dac", "gamblers"],
)
def test_a_resumed_run_continues_the_schedule_bit_for_bit(config, phases, webvision_tree, tmp_path, capsys):
    args = tiny_run_args(webvision_tree[0], tmp_path, **config)
    assert run_main([*args, "--name", "straight"], capsys)[0] == 0
    assert run_main([*args, "--name", "cut", "--run_epochs", "2"], capsys)[0] == 0
    assert checkpoint(tmp_path / "cut")["epoch"] == 2
    assert run_main(["--resume", str(tmp_path / "cut"), "--quiet"], capsys)[0] == 0
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "cut")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert [row["loss_phase"] for row in history(tmp_path / "straight")] == phases
    if config["loss"] == "dac":
        assert torch.equal(a["loss_schedule"]["ewma"], b["loss_schedule"]["ewma"])
        alphas = [row["dac_alpha"] for row in history(tmp_path / "cut")[1:]]
        assert alphas == [row["dac_alpha"] for row in history(tmp_path / "straight")[1:]]
        assert alphas[-1] == 1.0 and alphas[0] == pytest.approx(a["loss_schedule"]["ewma"].item() / 64)
        assert f"{history(tmp_path / 'cut')[-1]['webvision_val_drained_frac']}"  # the abstained share


def test_ddp_ranks_ramp_the_alpha_of_the_global_batch(webvision_tree, tmp_path):
    """Each rank sees half of every global batch; its alpha is set from the EWMA of the global batch
    means (averaged over the ranks), so it equals the one-process run's, up to the all-reduce's order."""
    args = tiny_run_args(webvision_tree[0], tmp_path, **{**DAC, "device": "cpu"})
    run_module([*args, "--name", "single"])
    run_module([*args, "--name", "ddp"], torchrun=2)
    single, ddp = history(tmp_path / "single"), history(tmp_path / "ddp")
    assert checkpoint(tmp_path / "ddp")["world_size"] == 2
    for one, two in zip(single[1:], ddp[1:]):
        assert two["dac_alpha"] == pytest.approx(one["dac_alpha"], rel=1e-5)
    ewma = [checkpoint(tmp_path / name)["loss_schedule"]["ewma"].item() for name in ("single", "ddp")]
    assert ewma[1] == pytest.approx(ewma[0], rel=1e-5)
