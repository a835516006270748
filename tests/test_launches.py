"""Launch and sync counts of a training step, counted under the interpreter with a launch hook.

Every Triton launch goes through the interpreted kernel's run(); every torch op that would launch
a kernel on a GPU passes a TorchDispatchMode. Ops that only allocate or view memory launch nothing
and are not counted; `.item()` and its kin are host syncs. On a GPU the same Python path issues
the same launches (the interpreter runs the same launchers), so these counts are the GPU's.
"""

import pytest
import torch
from support import DEVICE, MEMBERS
from torch.utils._python_dispatch import TorchDispatchMode

import drainage_fast.api
from drainage_fast import fused_drainage_loss

triton_launch = pytest.importorskip("drainage_fast.backends.triton_launch")
pytestmark = pytest.mark.skipif(
    not triton_launch.availability(DEVICE)[0] or DEVICE.type != "cpu",
    reason="counts launches under the Triton interpreter (TRITON_INTERPRET=1)",
)

aten = torch.ops.aten
NO_LAUNCH = {  # allocation, views and metadata: no kernel on a GPU
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.empty_like.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.as_strided.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.permute.default,
    aten.movedim.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
    aten.alias.default,
    aten.detach.default,
    aten.t.default,
    aten.transpose.int,
    aten.lift_fresh.default,
}
SYNCS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}


class LaunchCounter(TorchDispatchMode):
    def __init__(self, monkeypatch):
        super().__init__()
        self.launches, self.syncs = [], []
        self._in_kernel = self._active = False
        run = triton_launch._drainage_fwd_kernel.__class__.run

        def counted_run(kernel, *args, **kwargs):
            if self._active:
                self.launches.append(f"triton {kernel.fn.__name__}")
            self._in_kernel = True  # the interpreter's own tensor copies are not launches
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self._in_kernel = False

        monkeypatch.setattr(triton_launch._drainage_fwd_kernel.__class__, "run", counted_run)

    def __enter__(self):
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_kernel:
            if func in SYNCS:
                self.syncs.append(str(func))
            elif func not in NO_LAUNCH:
                self.launches.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counter(monkeypatch):
    # The host-side target check runs for CPU tensors only (on a GPU it returns at once).
    monkeypatch.setattr(drainage_fast.api, "check_target_values", lambda *a: None)
    return LaunchCounter(monkeypatch)


def _step(x, target, reduction, counter=None, upstream=None):
    """One fwd + bwd; the counter sees only the loss's own work (upstream made beforehand)."""
    x.grad = None
    if counter is None:
        fused_drainage_loss(x, target, reduction=reduction, backend="triton").backward(upstream)
        return
    with counter:
        fused_drainage_loss(x, target, reduction=reduction, backend="triton").backward(upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("K", [11, 51, 1001])
def test_a_reduced_step_is_three_launches_and_no_sync(counter, reduction, K):
    """targets check (+ kept count), forward (+ gradient + deterministic reduction), and the
    backward's scale, which returns at once on the device when the upstream gradient is 1."""
    x = torch.randn(40, K, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    target = torch.randint(0, K - 1, (40,), device=DEVICE)
    target[3] = -100
    upstream = torch.ones((), device=DEVICE)
    _step(x, target, reduction, upstream=upstream)  # the first call makes the stream's workspace
    _step(x, target, reduction, counter, upstream)
    assert counter.launches == [
        "triton _targets_kernel",
        "triton _drainage_fwd_kernel",
        "triton _scale_grad_kernel",
    ]
    assert counter.syncs == []


@pytest.mark.parametrize("member", MEMBERS, ids=repr)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_every_member_s_mean_step_is_three_launches(counter, member, weighted):
    """The member is a constexpr of the same kernels; sample weights are read by the same two forward
    launches (the targets kernel also sums them for the mean's divisor)."""
    x = torch.randn(40, 51, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 50, (40,), device=DEVICE)
    weight = torch.rand(40, device=DEVICE) if weighted else None
    upstream = torch.ones((), device=DEVICE)
    member.loss(x, target, backend="triton", sample_weight=weight).backward(upstream)
    x.grad = None
    with counter:
        member.loss(x, target, backend="triton", sample_weight=weight).backward(upstream)
    assert counter.launches == [
        "triton _targets_kernel",
        "triton _drainage_fwd_kernel",
        "triton _scale_grad_kernel",
    ]
    assert counter.syncs == []


def test_per_row_losses_are_two_launches_forward_and_one_backward(counter):
    x = torch.randn(40, 51, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 50, (40,), device=DEVICE)
    upstream = torch.rand(40, device=DEVICE)
    _step(x, target, "none", upstream=upstream)
    _step(x, target, "none", counter, upstream)
    assert counter.launches == [
        "triton _targets_kernel",
        "triton _drainage_fwd_kernel",
        "triton _drainage_bwd_kernel",
    ]
    assert counter.syncs == []


def test_the_workspace_is_made_once_per_device_and_stream():
    assert triton_launch._workspace(DEVICE) is triton_launch._workspace(DEVICE)


def test_evaluation_under_no_grad_takes_the_reduced_forward(counter):
    """Logits that require grad, but no_grad (evaluation of a model in train mode): the forward
    with its reduction, no row terms and no gradient; still 2 launches."""
    x = torch.randn(40, 51, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 50, (40,), device=DEVICE)
    with torch.no_grad():
        fused_drainage_loss(x, target, backend="triton")
        with counter:
            fused_drainage_loss(x, target, backend="triton")
    assert counter.launches == ["triton _targets_kernel", "triton _drainage_fwd_kernel"]
