"""Triton-only helpers that the backend-generic tests do not reach on a CPU machine."""

import threading

import pytest
import torch
from support import DEVICE

from drainage_fast._inputs import Hyper

triton_launch = pytest.importorskip("drainage_fast.backends.triton_launch")
import triton  # noqa: E402  (after the skip: triton is optional)
import triton.language as tl  # noqa: E402

from drainage_fast.backends import triton_kernels  # noqa: E402

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
    workspace = torch.zeros(triton_launch.WORKSPACE_SLOTS, dtype=torch.int64, device=DEVICE)
    triton_launch._launch_targets(target, 10, Hyper(0.0, 0.0, 4, -100), workspace, count=True)
    assert workspace.tolist() == [target.numel() - 3, 0, 0, 0, 0]
    workspace.zero_()
    triton_launch._launch_targets(target, 10, Hyper(0.0, 0.0, 4, -100), workspace, count=False)  # check only
    assert workspace.tolist() == [0] * triton_launch.WORKSPACE_SLOTS


@pytest.mark.parametrize("bad", [10, -1, 4], ids=["past-K", "negative", "drainage"])
def test_targets_kernel_counts_each_kind_of_bad_target(bad):
    """The kernel's own check (a device assert on a GPU, which the interpreter ignores) is observable
    here: its count of bad targets. Each term of the check is needed for its kind of bad target."""
    target = _targets_with_bad_and_ignored()
    target[target == 4] = 5
    target[[1, 4_000, 9_999]] = bad  # three bad targets, in different programs
    workspace = torch.zeros(triton_launch.WORKSPACE_SLOTS, dtype=torch.int64, device=DEVICE)
    n = target.numel()
    triton_launch._targets_kernel[(triton.cdiv(n, triton_launch.SUM_BLOCK),)](
        target,
        None,
        workspace,
        None,
        None,
        n,
        target.stride(0),
        0,
        10,
        4,
        -100,
        COUNT=True,
        HAS_WEIGHT=False,
        BLOCK=triton_launch.SUM_BLOCK,
        COMPUTE=tl.float32,
    )
    assert workspace.tolist() == [n - 3, 0, 3, 0, 0]  # the bad ones are kept rows too (not ignore_index)


@pytest.mark.parametrize("bad", [10, 4], ids=["past-K", "drainage"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_bad_target_raises_from_the_kernels_count_on_the_cpu(bad, reduction):
    """The API leaves this backend's targets to its targets kernel (no host check first); under
    the interpreter the launcher raises the host check's IndexError from the kernel's count, and the
    workspace is zero again for the next call."""
    from drainage_fast import fused_drainage_loss

    x = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 1, 2, bad, 3, 5], device=DEVICE)
    with pytest.raises(IndexError, match=f"target value {bad} "):
        fused_drainage_loss(x, target, drainage_idx=4, reduction=reduction, backend="triton")
    assert triton_launch._workspace(DEVICE).tolist() == [0] * triton_launch.WORKSPACE_SLOTS
    target[3] = 6
    fused_drainage_loss(x, target, drainage_idx=4, reduction=reduction, backend="triton").sum().backward()


@triton.jit
def _one_lane_probe(Out_ptr, n_bad, BLOCK: tl.constexpr):
    tl.store(Out_ptr + tl.arange(0, BLOCK), triton_kernels._one_lane_reports(n_bad, BLOCK).to(tl.int32))


@pytest.mark.parametrize("n_bad", [0, 1, 7])
def test_the_device_assert_fails_in_one_lane_of_a_program(n_bad):
    """A failing program prints the assert once: its condition is false in lane 0 alone."""
    out = torch.empty(64, dtype=torch.int32, device=DEVICE)
    _one_lane_probe[(1,)](out, n_bad, BLOCK=64)
    assert out.tolist() == [int(n_bad == 0)] + [1] * 63


def test_the_kept_count_passes_2_pow_31_without_wrapping():
    """A per-pixel batch may keep more than 2^31 targets: the count is int64 on the device."""
    workspace = triton_launch._workspace(DEVICE)
    workspace[0] = 2**31 - 3
    target = torch.arange(10, device=DEVICE)
    triton_launch._launch_targets(target, 11, Hyper(0.0, 0.0, 10, -100), workspace, count=True)
    try:
        assert workspace[0].item() == 2**31 + 7
    finally:
        workspace.zero_()


@triton.jit
def _rows_probe(
    N_ptr,
    S_ptr,
    block,
    n_rows,
    S,
    blocks_per_image,
    ROWS: tl.constexpr,
    MODE: tl.constexpr,
    I32: tl.constexpr,
):
    rows, row_ok, n, s = triton_kernels._rows_of_block(block, n_rows, S, blocks_per_image, ROWS, MODE, I32)
    tl.store(N_ptr + tl.arange(0, ROWS), tl.where(row_ok, n + 0 * rows, -1))
    tl.store(S_ptr + tl.arange(0, ROWS), tl.where(row_ok, s, -1))


@pytest.mark.parametrize(
    "mode, index32, block, n_rows, S, per_image",
    [
        ("DIV", True, (2**31 - 200) // 128, 2**31 - 1, 1000, 1),  # rows just below 2^31, 32-bit division
        ("DIV", False, 2**31 // 128 + 5, 2**33, 12345, 1),  # rows past 2^31: 64-bit
        ("PIXEL", True, 2**20 + 7, 2**40, 100_000, 782),  # block // per_image in 32 bits
        ("PIXEL", False, 2**33 + 7, 2**50, 100_000, 782),
    ],
)
def test_rows_of_a_block_past_2_pow_31(mode, index32, block, n_rows, S, per_image):
    """(n, s) of each row of a block, against Python's integers (the interpreter's int32 arithmetic
    wraps as a GPU's does)."""
    ROWS = 128
    out_n = torch.empty(ROWS, dtype=torch.int64, device=DEVICE)
    out_s = torch.empty(ROWS, dtype=torch.int64, device=DEVICE)
    code = getattr(triton_launch, f"{mode}_ROWS")
    _rows_probe[(1,)](out_n, out_s, block, n_rows, S, per_image, ROWS=ROWS, MODE=code, I32=index32)
    if mode == "PIXEL":
        image, first = divmod(block, per_image)
        expected = [(image, first * ROWS + i) if first * ROWS + i < S else (-1, -1) for i in range(ROWS)]
    else:
        expected = [
            divmod(block * ROWS + i, S) if block * ROWS + i < n_rows else (-1, -1) for i in range(ROWS)
        ]
    assert list(zip(out_n.tolist(), out_s.tolist())) == expected


def test_the_row_plan_counts_blocks_in_python_integers():
    """The number of row blocks is worked out on the host (Python ints): past 2^31 rows the kernel
    gets it as an int64, never from an int32 cdiv on the device (which wraps for R near 2^31)."""
    for R in (2**31 - 1, 2**31 + 5, 2**33):
        x3 = torch.empty(R, 1, 4, device="meta")
        cfg = triton_launch._forward_config(4, torch.float32)
        plan = triton_launch._rows(x3, None, cfg)
        assert plan.n_blocks == -(-R // cfg.block_rows) and plan.mode == triton_launch.FLAT_ROWS
        x3 = torch.empty(R // 64, 64, 4, device="meta").transpose(0, 1).transpose(0, 1)  # NCHW-like
        x3 = torch.empty(R // 64, 4, 64, device="meta").transpose(1, 2)
        plan = triton_launch._rows(x3, None, cfg)
        rows = (R // 64) * 64
        assert plan.mode == triton_launch.DIV_ROWS and plan.index32 == (rows + cfg.block_rows < 2**31)


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
    assert triton_launch._workspace(x3.device).tolist() == [0] * triton_launch.WORKSPACE_SLOTS


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


@pytest.mark.parametrize("fail_in", ["targets", "forward"])
def test_a_failure_between_the_two_launches_leaves_the_workspace_zero(monkeypatch, fail_in):
    """The targets kernel adds the count into the workspace; if anything fails after it (out of
    memory, a compile error, Ctrl-C right after the targets launch returns), the next call must
    still see zeros, or its mean would divide by the sum of two counts."""
    x3 = torch.randn(64, 1, 51, device=DEVICE)
    target = torch.randint(0, 50, (64,), device=DEVICE)
    hp = Hyper(0.0, 0.0, 50, -100)
    good = triton_launch.forward_reduced(x3, target, hp, True, True)
    real_targets, real_kernel = triton_launch._launch_targets, triton_launch._drainage_fwd_kernel

    def targets_then_interrupt(*args, **kwargs):
        real_targets(*args, **kwargs)
        raise KeyboardInterrupt

    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise KeyboardInterrupt

            return launch

    with monkeypatch.context() as patch:
        if fail_in == "targets":
            patch.setattr(triton_launch, "_launch_targets", targets_then_interrupt)
        else:
            patch.setattr(triton_launch, "_drainage_fwd_kernel", FailingKernel())
        with pytest.raises(KeyboardInterrupt):
            triton_launch.forward_reduced(x3, target, hp, True, True)
    assert triton_launch._drainage_fwd_kernel is real_kernel
    assert triton_launch._workspace(x3.device).tolist() == [0] * triton_launch.WORKSPACE_SLOTS
    again = triton_launch.forward_reduced(x3, target, hp, True, True)
    assert torch.equal(good[0], again[0]) and torch.equal(good[2], again[2])


def test_two_host_threads_on_one_stream_keep_their_own_counts(monkeypatch):
    """Threaded evaluation on the default stream: thread A launches its targets kernel, thread B runs
    a whole loss, then A launches its forward. A shared workspace would give B both counts (and
    zero them) and A a count of 0: both means wrong, no error. Each thread has its own."""
    hp = Hyper(0.0, 0.0, 50, -100)
    x_a, x_b = torch.randn(64, 1, 51, device=DEVICE), torch.randn(40, 1, 51, device=DEVICE)
    t_a, t_b = torch.randint(0, 50, (64,), device=DEVICE), torch.randint(0, 50, (40,), device=DEVICE)
    t_b[:9] = -100
    expected_a = triton_launch.forward_reduced(x_a, t_a, hp, True, True)
    expected_b = triton_launch.forward_reduced(x_b, t_b, hp, True, True)
    real_targets, from_b = triton_launch._launch_targets, []

    def then_thread_b(*args, **kwargs):
        real_targets(*args, **kwargs)
        if threading.current_thread() is threading.main_thread() and not from_b:
            worker = threading.Thread(
                target=lambda: from_b.append(triton_launch.forward_reduced(x_b, t_b, hp, True, True))
            )
            worker.start()
            worker.join()

    monkeypatch.setattr(triton_launch, "_launch_targets", then_thread_b)
    got_a = triton_launch.forward_reduced(x_a, t_a, hp, True, True)
    for got, expected in ((got_a, expected_a), (from_b[0], expected_b)):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert torch.equal(got[2], expected[2])


def test_every_launch_pins_fp_fusion(monkeypatch):
    """Triton's default for fusing a * b + c changes in 3.10: every launch names it, so that the
    bits of the row terms do not move with the Triton version."""
    seen = {}
    run = triton_launch._drainage_fwd_kernel.__class__.run

    def spy(kernel, *args, **kwargs):
        seen[kernel.fn.__name__] = kwargs.get("enable_fp_fusion")
        return run(kernel, *args, **kwargs)

    monkeypatch.setattr(triton_launch._drainage_fwd_kernel.__class__, "run", spy)
    x3 = torch.randn(8, 1, 11, device=DEVICE)
    target = torch.randint(0, 10, (8,), device=DEVICE)
    hp = Hyper(0.0, 0.0, 10, -100)
    _, inv, grad, _ = triton_launch.forward_reduced(x3, target, hp, True, True)
    triton_launch.scale_(grad, torch.tensor(2.0, device=DEVICE), None)
    _, stats = triton_launch.forward(x3, target, hp)
    triton_launch.backward(x3, target, stats, torch.ones(8, device=DEVICE), hp)
    assert seen == dict.fromkeys(
        ["_targets_kernel", "_drainage_fwd_kernel", "_scale_grad_kernel", "_drainage_bwd_kernel"],
        triton_launch.FP_FUSION,
    )


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


def test_a_weighted_mean_divides_by_the_kept_weights_summed_in_program_order():
    """The targets kernel sums the kept rows' weights without a float atomic: per-program partials,
    added in order by the last program (its own ticket, zeroed again). 10_000 weights span 3 programs."""
    target = _targets_with_bad_and_ignored()  # 3 ignored
    target[target == 4] = 5
    weight = torch.rand(20_000, device=DEVICE, dtype=torch.float64)[::2]  # stride 2
    workspace = torch.zeros(triton_launch.WORKSPACE_SLOTS, dtype=torch.int64, device=DEVICE)
    total = torch.empty(1, dtype=torch.float64, device=DEVICE)
    hp = Hyper(0.0, 0.0, 4, -100)
    triton_launch._launch_targets(target, 10, hp, workspace, True, weight=weight, weight_sum=total)
    kept = target != -100
    parts = [
        weight[i : i + triton_launch.SUM_BLOCK][kept[i : i + triton_launch.SUM_BLOCK]].sum()
        for i in (0, 4096, 8192)
    ]
    assert abs(total.item() - float(sum(parts))) <= 1e-12 * total.item()
    assert workspace.tolist() == [0] * triton_launch.WORKSPACE_SLOTS  # no count: the weights are the divisor


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_the_targets_kernel_checks_the_weights(bad):
    """Bad weights are a device-side assert on a GPU; the kernel also counts them, and under the
    interpreter the launcher raises the API's ValueError from that count."""
    target = torch.randint(0, 10, (50,), device=DEVICE)
    weight = torch.rand(50, device=DEVICE)
    weight[[3, 40]] = bad
    workspace = triton_launch._workspace(DEVICE)
    with pytest.raises(ValueError, match="sample_weight"):
        triton_launch._launch_targets(target, 11, Hyper(0.0, 0.0, 10, -100), workspace, False, weight=weight)
    assert workspace.tolist() == [0] * triton_launch.WORKSPACE_SLOTS


def test_hyper_parameters_are_runtime_arguments(monkeypatch):
    """DAC's alpha changes every epoch: the launches differ in their float arguments only, never in a
    constexpr or compile option, so a GPU compiles the kernel once (Triton keys its cache on those)."""
    from drainage_fast import fused_dac_loss, fused_drainage_loss

    seen = []
    run = triton_launch._drainage_fwd_kernel.__class__.run

    def spy(kernel, *args, **kwargs):
        if kernel.fn.__name__ == "_drainage_fwd_kernel":
            seen.append(({k: str(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}, args))
        return run(kernel, *args, **kwargs)

    monkeypatch.setattr(triton_launch._drainage_fwd_kernel.__class__, "run", spy)
    x = torch.randn(16, 11, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 10, (16,), device=DEVICE)
    for alpha in (0.01, 0.5, 1.0):
        fused_dac_loss(x, target, alpha=alpha, backend="triton").backward()
    for alpha in (0.1, 3.0):
        fused_drainage_loss(x, target, alpha=alpha, backend="triton").backward()
    dac, drainage = seen[:3], seen[3:]
    assert all(kw == dac[0][0] for kw, _ in dac) and all(kw == drainage[0][0] for kw, _ in drainage)
    assert dac[0][0]["MEMBER"] != drainage[0][0]["MEMBER"]  # the member is the one constexpr
    assert len({tuple(args[-4:]) for _, args in dac}) == 3  # h1 (alpha) as hi + lo floats: three values
