"""Triton-only helpers that the backend-generic tests do not reach on a CPU machine."""

import pytest
import torch

from drainage_fast._inputs import Hyper
from support import DEVICE

triton_launch = pytest.importorskip("drainage_fast.backends.triton_launch")
pytestmark = pytest.mark.skipif(
    not triton_launch.availability(DEVICE)[0], reason="triton cannot run here (see availability())"
)


def test_device_target_check_counts_bad_and_kept():
    # 10_000 targets span 3 programs of the check kernel; the counts are summed across them.
    target = torch.randint(0, 10, (20_000,), device=DEVICE)[::2]  # stride 2
    target[[5, 6, 7_000]] = -100  # ignored
    target[[1, 9_999]] = 10  # == K: bad
    target[2] = 4  # == drainage_idx: bad
    target[3] = -3  # negative: bad
    counts = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    kernel = triton_launch._check_targets_kernel
    kernel[(triton_launch.triton.cdiv(target.numel(), 4096),)](
        target, counts, target.numel(), target.stride(0), 10, 4, -100, BLOCK=4096
    )
    kept = (target != -100).sum().item()
    bad = ((target != -100) & ((target < 0) | (target >= 10) | (target == 4))).sum().item()
    assert counts.tolist() == [bad, kept]
    assert bad == 4 + (target == 4).sum().item() - 1  # the planted ones plus random hits of class 4


def test_check_targets_returns_the_kept_count():
    target = torch.tensor([0, 1, -100, 2, -100], device=DEVICE)
    assert triton_launch.check_targets(target, 4, Hyper(0.0, 0.0, 3, -100)).item() == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_scale_in_place_and_skip_when_one(dtype):
    grad = torch.randn(3, 5000, device=DEVICE).to(dtype)  # 15_000 elements: several programs, several steps
    before = grad.clone()
    triton_launch.scale_(grad, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(grad, before)
    triton_launch.scale_(grad, torch.tensor(-0.75, device=DEVICE))
    # one rounding of the result: eps = 2u covers the interpreter's truncation to bf16
    expected = before.double() * -0.75
    assert ((grad.double() - expected).abs() <= torch.finfo(dtype).eps * expected.abs()).all()
    assert not torch.equal(grad, before)
