"""What only a GPU can show: no host synchronisation, device-side target asserts, CUDA graphs, and a
real tensor of more than 2^31 elements. Skipped (with the reason) on machines without CUDA; the rest
of the suite also runs on the GPU there (support.DEVICE)."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import BACKENDS, assert_grad_close, assert_loss_close, random_targets

from drainage_fast import backends, drainage_loss_reference, fused_drainage_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]  # the subprocess imports drainage_fast from the checkout
# Named, not filtered by availability: on a GPU machine (nvcc and Triton present) a GPU backend that
# cannot load is a failure of these tests, not a case that quietly drops out.
GPU_BACKENDS = ["triton", "cuda"]


@pytest.fixture(autouse=True)
def _gpu_backend_loads(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in GPU_BACKENDS:
        ok, why = backends.availability(backend, CUDA)
        assert ok, f"backend {backend!r} does not load on this GPU machine: {why}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_no_host_synchronisation(backend, reduction):
    x = torch.randn(512, 1001, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    target = random_targets(512, 1001, -1, device=CUDA)
    fused_drainage_loss(x, target, backend=backend, reduction=reduction).sum().backward()  # warm-up, JIT
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_drainage_loss(x, target, backend=backend, reduction=reduction)
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bad", [1001, -1, 1000])  # out of range high / low, the drainage index
def test_bad_target_is_a_device_side_assert(backend, reduction, bad):
    """Each GPU backend by name (not "auto"), both paths: the message comes from the device, once
    per failing program, not once per thread (128 lines)."""
    code = textwrap.dedent(f"""
        import torch
        from drainage_fast import fused_drainage_loss
        x = torch.randn(8, 1001, device="cuda")
        t = torch.zeros(8, dtype=torch.long, device="cuda")
        t[3] = {bad}
        fused_drainage_loss(x, t, backend={backend!r}, reduction={reduction!r})
        torch.cuda.synchronize()
    """)
    # a timeout, so that a kernel that hangs instead of asserting fails here, not the whole run
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    # the message of a device-side assert is printed by the kernel; the host sees "device-side assert"
    assert run.returncode != 0 and "assert" in run.stderr.lower(), run.stderr[-2000:]
    printed = run.stderr.count("every target must be in [0, K)")
    assert 1 <= printed <= 3, run.stderr[-4000:]  # the device's line, and at most the host's echo


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["fused_drainage_loss(x, t", "fused_dac_loss(x, t, alpha=0.5"])
def test_bad_sample_weight_is_a_device_side_assert(backend, reduction, loss):
    """A negative sample weight on a GPU: the API leaves the value check to the kernels (no host
    sync), which assert with _inputs.WEIGHT_MESSAGE, once per failing program."""
    code = textwrap.dedent(f"""
        import torch
        from drainage_fast import fused_drainage_loss, fused_dac_loss
        x = torch.randn(8, 1001, device="cuda")
        t = torch.zeros(8, dtype=torch.long, device="cuda")
        w = torch.ones(8, device="cuda")
        w[3] = -1.0
        {loss}, sample_weight=w, backend={backend!r}, reduction={reduction!r})
        torch.cuda.synchronize()
    """)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode != 0 and "assert" in run.stderr.lower(), run.stderr[-2000:]
    printed = run.stderr.count("every sample_weight must be finite and >= 0")
    assert 1 <= printed <= 3, run.stderr[-4000:]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_and_replay(backend, reduction):
    """The recipe of docs/kernels.md "Host time and CUDA graphs": a whole step captured and replayed.
    For cuda, mean is the C++ autograd node (csrc/reduced_loss.cpp)."""
    x = torch.randn(256, 101, device=CUDA, requires_grad=True)
    target = random_targets(256, 101, -1, device=CUDA)
    up = torch.rand(256, device=CUDA)

    def step():
        loss = fused_drainage_loss(x, target, reduction=reduction, backend=backend)
        (loss * up if reduction == "none" else loss).sum().backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (JIT compilation, autograd buffers)
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref_x = x.detach().double().requires_grad_()
    ref = drainage_loss_reference(ref_x, target, reduction=reduction)
    (ref * up.double() if reduction == "none" else ref).sum().backward()
    assert_loss_close(loss, ref, x.detach(), 1.0, 1.0)
    assert_grad_close(x.grad, ref_x.grad, x.detach(), 1.0, 1.0)


def test_more_than_2_pow_31_elements():
    """A real (2_145_339, 1001) bf16 tensor: 2^31 + ~0.6M elements, 4.3 GB (+ 4.3 GB gradient)."""
    N, K = 2**31 // 1001 + 600, 1001
    if torch.cuda.get_device_properties(CUDA).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB of GPU memory")
    x = torch.randn(N, K, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    target = random_targets(N, K, -1, device=CUDA)
    loss = fused_drainage_loss(x, target, reduction="sum")
    loss.backward()
    tail = slice(N - 1000, N)  # the rows past element 2^31
    x64 = x.detach()[tail].double().requires_grad_()
    ref = drainage_loss_reference(x64, target[tail], reduction="none")
    ref.sum().backward()
    rows = fused_drainage_loss(x.detach()[tail], target[tail], reduction="none")
    assert_loss_close(rows, ref, x.detach()[tail], 1.0, 1.0)
    assert_grad_close(x.grad[tail], x64.grad, x.detach()[tail], 1.0, 1.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_pow_31_rows(backend):
    """Issue 19, item 2: past 2^31 kept rows an int32 count wraps (a wrong mean and gradient, no error)
    and an int32 cdiv of the row count runs no block at all. (2^31 + 4096, 2) bf16 logits of value 0,
    every 1000th target ignored: each kept row's loss is log(1 + alpha) (p_d / p_t = 1, J empty), so
    the mean is that and the gradient of each kept row is the same. 8.6 GB of logits, as much of
    gradient, 17 GB of int64 targets."""
    R = 2**31 + 4096
    if torch.cuda.get_device_properties(CUDA).total_memory < 48 * 2**30:
        pytest.skip("needs 48 GiB of GPU memory")
    x = torch.zeros(R, 2, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    target = torch.zeros(R, device=CUDA, dtype=torch.int64)  # class 0; the drainage output is 1
    target[::1000] = -100
    kept = R - len(range(0, R, 1000))
    alpha = 0.5
    loss = fused_drainage_loss(x, target, alpha=alpha, backend=backend)
    loss.backward()
    # A wrapped int32 count or cdiv is far off; fp32 partial sums of ~8k terms a lane stay within 1e-3.
    assert abs(loss.item() - math.log1p(alpha)) < 1e-2 * math.log1p(alpha), loss.item()
    del target
    g = x.grad
    # One kept row's gradient, from the oracle; the rows past 2^31 must have it too (times 1 / kept).
    one = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    drainage_loss_reference(one, torch.zeros(1, dtype=torch.int64), alpha=alpha).backward()
    expected = (one.grad[0] / kept).float()
    for rows in (slice(1, 3), slice(2**31 + 1, 2**31 + 3), slice(R - 3, R - 1)):
        torch.testing.assert_close(g[rows].float().cpu(), expected.expand(2, 2), rtol=1e-2, atol=0)
    assert not g[2**31 - 2**31 % 1000 + 1000 :: 1000].any()  # ignored rows past 2^31: exactly 0
