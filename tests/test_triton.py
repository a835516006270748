"""Triton-only helpers that the backend-generic tests do not reach on a CPU machine."""

import pytest
import torch
from support import DEVICE

from drainage_fast._inputs import Hyper

triton_launch = pytest.importorskip("drainage_fast.backends.triton_launch")
pytestmark = pytest.mark.skipif(
    not triton_launch.availability(DEVICE)[0], reason="triton cannot run here (see availability())"
)


def _targets_with_bad_and_ignored():
    # 10_000 targets span 3 programs of the targets kernel; the counts are summed across them.
    target = torch.randint(0, 10, (20_000,), device=DEVICE)[::2]  # stride 2
    target[[5, 6, 7_000]] = -100  # ignored
    return target


def test_targets_kernel_counts_the_kept_targets_across_programs():
    target = _targets_with_bad_and_ignored()
    target[target == 4] = 5  # 4 is the drainage output
    workspace = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    triton_launch._launch_targets(target, 10, Hyper(0.0, 0.0, 4, -100), workspace, count=True)
    assert workspace.tolist() == [target.numel() - 3, 0]
    triton_launch._launch_targets(target, 10, Hyper(0.0, 0.0, 4, -100), None, count=False)  # check only


@pytest.mark.parametrize("K", [11, 300, 9000], ids=["columns", "tile", "stream"])
@pytest.mark.parametrize("mean", [True, False], ids=["mean", "sum"])
def test_reduction_in_the_forward_is_the_sum_of_the_rows_and_leaves_the_workspace_zero(K, mean):
    """The last program adds the partials: the result equals the per-row losses' sum in fp64
    within the rounding of R additions, is the same bits on every call, and the workspace that
    carries the count and the ticket is zero again afterwards (the next call relies on it)."""
    R = 300 if K < 1000 else 9  # the interpreter's grid has 2 programs an SM: several row blocks each
    x3 = (torch.randn(R, K, device=DEVICE) * 3).view(R, 1, K)
    target = torch.randint(0, K - 1, (R,), device=DEVICE)
    target[::7] = -100
    hp = Hyper(0.3, -0.3, K - 1, -100)
    loss, _ = triton_launch.forward(x3, target, hp)
    outs = [triton_launch.forward_reduced(x3, target, hp, mean, with_grad=True) for _ in range(2)]
    kept = (target != -100).sum().item()
    expected = loss.double().sum() / (kept if mean else 1)
    out, inv_count, grad, pending = outs[0]
    assert abs(out.item() - expected.item()) <= R * 2**-24 * loss.double().abs().sum().item() / (
        kept if mean else 1
    )
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][2], outs[1][2])
    assert pending is None
    if mean:
        assert torch.equal(inv_count.cpu(), torch.reciprocal(torch.tensor([kept], dtype=torch.float32)))
    else:
        assert inv_count is None
    assert triton_launch._workspace(x3.device).tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_scale_in_place_and_skip_when_one(dtype):
    grad = torch.randn(3, 5000, device=DEVICE).to(dtype)  # 15_000 elements: several programs, several steps
    before = grad.clone()
    triton_launch.scale_(grad, torch.tensor(1.0, device=DEVICE), None)
    assert torch.equal(grad, before)
    triton_launch.scale_(grad, torch.tensor(-0.75, device=DEVICE), None)
    # one rounding of the result: eps = 2u covers the interpreter's truncation to bf16
    expected = before.double() * -0.75
    assert ((grad.double() - expected).abs() <= torch.finfo(dtype).eps * expected.abs()).all()
    assert not torch.equal(grad, before)


def test_a_failure_between_the_two_launches_leaves_the_workspace_zero(monkeypatch):
    """The targets kernel adds the count into the stream's workspace; if the forward then fails on
    the host (out of memory, a compile error, Ctrl-C), the next call must still see zeros, or its
    mean would divide by the sum of two counts."""
    x3 = torch.randn(64, 1, 51, device=DEVICE)
    target = torch.randint(0, 50, (64,), device=DEVICE)
    hp = Hyper(0.0, 0.0, 50, -100)
    good = triton_launch.forward_reduced(x3, target, hp, True, True)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(triton_launch, "_launch_forward", fail)
        with pytest.raises(KeyboardInterrupt):
            triton_launch.forward_reduced(x3, target, hp, True, True)
    assert triton_launch._workspace(x3.device).tolist() == [0, 0]
    again = triton_launch.forward_reduced(x3, target, hp, True, True)
    assert torch.equal(good[0], again[0]) and torch.equal(good[2], again[2])


def test_the_reduced_loss_is_its_own_tensor():
    """loss /= accumulation_steps must work: the loss is no view of a buffer shared with 1/count."""
    x3 = torch.randn(8, 1, 11, device=DEVICE)
    out, inv_count, _, _ = triton_launch.forward_reduced(
        x3, torch.zeros(8, dtype=torch.long), Hyper(0, 0, 10, -100), True, False
    )
    assert out.dim() == 0 and out._base is None and inv_count._base is None
    x = x3.reshape(8, 11).clone().requires_grad_()
    from drainage_fast import fused_drainage_loss

    loss = fused_drainage_loss(x, torch.zeros(8, dtype=torch.long), backend="triton")
    loss /= 2  # in place, on the autograd output
    loss.backward()
    assert torch.isfinite(x.grad).all()
