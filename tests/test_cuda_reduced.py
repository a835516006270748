"""The CUDA backend's mean / sum path (backend contract v2): forward_reduced and scale_.

Needs a CUDA GPU and the CUDA build of csrc/ (skipped otherwise, with the reason); written without a
GPU, so the first GPU run is what checks these kernels: values against the float64 reference, the
bits rule between the fused gradient and a recompute, the launch count (profiler), no host sync, and
the device-side target assert.
"""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from family_cases import FAMILY, MEMBER_PARAMS, strided_weights
from support import (
    OPS,
    assert_grad_close,
    assert_loss_close,
    compute_roundoff,
    exponent_scale,
    random_targets,
)

from drainage_fast import backends, drainage_loss_reference, fused_drainage_loss
from drainage_fast._inputs import WEIGHT_MESSAGE, Hyper, loss_dtype
from drainage_fast._members import Member

CUDA_OK = torch.cuda.is_available() and backends.availability("cuda", torch.device("cuda"))[0]
pytestmark = pytest.mark.skipif(
    not CUDA_OK,
    reason="needs a CUDA GPU and the CUDA build of csrc/ "
    f"({backends.availability('cuda', torch.device('cuda'))[1] if torch.cuda.is_available() else 'no GPU'})",
)
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]
ALPHA, BETA = 2.0, 0.7
# K = 11: 4 lanes per row; 1001: one warp per row; 5000: one block per row (csrc/cuda config_for).
SHAPES = [(300, 11), (67, 1001), (9, 5000)]


def _cuda():
    return backends.load("cuda")


def _case(N, K, dtype, ignored=(1,)):
    x = (torch.randn(N, K, device=CUDA) * 3).to(dtype)
    t = random_targets(N, K, -1, device=CUDA)
    for i in ignored:
        t[i] = -100
    return x, t, Hyper(math.log(ALPHA), math.log(BETA), K - 1, -100)


def _reference(x, t, reduction):
    ref_x = x.detach().double().requires_grad_()
    ref = drainage_loss_reference(ref_x, t, alpha=ALPHA, beta=BETA, reduction=reduction)
    ref.backward()
    rows = drainage_loss_reference(x.detach().double(), t, alpha=ALPHA, beta=BETA, reduction="none")
    return ref.detach(), ref_x.grad, rows


def _assert_reduced_loss_close(out, ref, ref_rows, x, count):
    """Each row's loss errs by at most OPS * u * (E + |loss_r|) (support.assert_loss_close); the
    reduction adds those bounds (the partials are summed in fp64)."""
    u = compute_roundoff(x.dtype)
    bound = OPS * u * (exponent_scale(x, ALPHA, BETA) * ref_rows.numel() + ref_rows.abs().sum())
    bound = bound / count if count else bound
    assert abs(out.double().item() - ref.item()) <= bound.item(), (out.item(), ref.item(), bound.item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_reduced_and_scale_match_the_reference(shape, dtype, reduction):
    x, t, hp = _case(*shape, dtype, ignored=(1, 4))
    mean = reduction == "mean"
    out, inv_count, grad, pending = _cuda().forward_reduced(x.unsqueeze(1), t, hp, mean, True)
    ref, ref_grad, ref_rows = _reference(x, t, reduction)
    count = int((t != -100).sum())
    assert out.shape == () and out.dtype == loss_dtype(x)
    _assert_reduced_loss_close(out, ref, ref_rows, x, count if mean else 0)
    if mean:
        assert inv_count.shape == (1,) and inv_count.dtype == loss_dtype(x)
        assert torch.equal(
            inv_count, torch.reciprocal(torch.tensor([count], dtype=loss_dtype(x), device=CUDA))
        )
        assert pending is inv_count
    else:
        assert inv_count is None and pending is None
    assert grad.shape == (x.shape[0], 1, x.shape[1]) and grad.dtype == x.dtype
    _cuda().scale_(grad, torch.ones((), dtype=loss_dtype(x), device=CUDA), pending)
    assert_grad_close(grad.squeeze(1), ref_grad, x, ALPHA, BETA, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_grad", [True, False])
def test_all_rows_ignored_and_no_rows(dtype, with_grad):
    x, t, hp = _case(40, 11, dtype, ignored=range(40))
    for x3, tt in ((x.unsqueeze(1), t), (x[:0].unsqueeze(1), t[:0])):
        out, inv_count, grad, _ = _cuda().forward_reduced(x3, tt, hp, True, with_grad)
        assert torch.isnan(out) and torch.isinf(inv_count).all() and inv_count.item() > 0  # 0 / 0, 1 / 0
        out, inv_count, grad, pending = _cuda().forward_reduced(x3, tt, hp, False, with_grad)
        assert out.item() == 0 and inv_count is None and pending is None
        if with_grad:
            assert grad.shape == x3.shape and (grad == 0).all()
        else:
            assert grad is None


@pytest.mark.parametrize("grad_out", [1.0, 0.5])
def test_a_mean_over_no_kept_row_has_a_zero_gradient(grad_out):
    """Every target ignored (a segmentation crop of border pixels): the mean is nan, as
    F.cross_entropy's, and the gradient exactly 0 (1 / count = inf pending; issue 19 item 1)."""
    x = torch.randn(64, 11, device=CUDA, requires_grad=True)
    t = torch.full((64,), -100, device=CUDA)
    loss = fused_drainage_loss(x, t, backend="cuda")
    (loss * grad_out).backward()
    assert torch.isnan(loss) and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grad_out", [1.0, 0.37])
def test_fused_gradient_then_scale_has_the_bits_of_a_recompute(shape, dtype, grad_out):
    """backend_contract "bits": forward_reduced's grad followed by scale_ == backward with
    grad_rows = grad_out * inv_count expanded (fp32 / fp64 exactly; bf16 within one ulp)."""
    x, t, hp = _case(*shape, dtype)
    x3 = x.unsqueeze(1)
    cuda = _cuda()
    _, inv_count, grad, pending = cuda.forward_reduced(x3, t, hp, True, True)
    g_out = torch.tensor(grad_out, dtype=loss_dtype(x), device=CUDA)
    cuda.scale_(grad, g_out, pending)
    _, stats = cuda.forward(x3, t, hp)
    s = (g_out * inv_count).reshape(1).expand(t.numel())
    recomputed = cuda.backward(x3, t, stats, s, hp)
    if dtype == torch.bfloat16:
        a, b = grad.view(torch.int16).int(), recomputed.view(torch.int16).int()
        assert (torch.where(grad == recomputed, 0, (a - b).abs()) <= 1).all()
    else:
        assert torch.equal(grad, recomputed)


def test_forward_reduced_agrees_with_the_per_row_ops_over_many_grid_strides():
    """More rows than the grid covers in one pass (sms * 32 blocks of 64 rows at K = 11; of one row
    at K = 2049): the partials and the gradient against forward / forward_with_grad."""
    cuda = _cuda()
    for N, K in ((300_000, 11), (5000, 2049)):
        x, t, hp = _case(N, K, torch.float32, ignored=range(0, N, 7))
        x3 = x.unsqueeze(1)
        out, _, grad, _ = cuda.forward_reduced(x3, t, hp, False, True)
        loss, _, grad_ref = cuda.forward_with_grad(x3, t, hp, None)
        assert torch.equal(grad, grad_ref)
        total = loss.double().sum()
        assert abs(out.item() - total.item()) <= 1e-6 * total.abs().item() + 1e-6


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_strided_rows(layout):
    if layout == "transposed":
        x = (torch.randn(11, 50, device=CUDA) * 3).t()
    else:
        x = torch.randn(5, 11, 3, 4, device=CUDA).contiguous(memory_format=torch.channels_last)
    x3 = x.movedim(1, -1).reshape(x.shape[0], -1, 11) if x.dim() > 2 else x.unsqueeze(1)
    t = random_targets(x3.shape[0] * x3.shape[1], 11, -1, device=CUDA)
    hp = Hyper(math.log(ALPHA), math.log(BETA), 10, -100)
    cuda = _cuda()
    out, _, grad, _ = cuda.forward_reduced(x3, t, hp, True, True)
    loss, _, grad_ref = cuda.forward_with_grad(x3, t, hp, None)
    assert grad.stride() == torch.empty_like(x3).stride()
    assert torch.equal(grad, grad_ref)
    torch.testing.assert_close(out, loss.double().mean().float(), rtol=1e-6, atol=0)


def test_opcheck():
    x, t, hp = _case(20, 11, torch.float32)
    x3 = x.unsqueeze(1)
    for mean in (True, False):
        for with_grad in (True, False):
            torch.library.opcheck(
                torch.ops.drainage_fast.forward_reduced.default, (x3, t, mean, with_grad, *hp)
            )
    grad = torch.randn_like(x3)
    inv = torch.tensor([0.25], device=CUDA)
    for pending in (None, inv):
        torch.library.opcheck(
            torch.ops.drainage_fast.scale_by_.default, (grad, torch.tensor(0.5, device=CUDA), pending)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_skips_when_the_factor_is_one_and_scales_otherwise(dtype):
    grad = torch.randn(3, 1, 1001, device=CUDA).to(dtype)
    before = grad.clone()
    one = torch.tensor(1.0, device=CUDA, dtype=loss_dtype(grad))
    _cuda().scale_(grad, one, None)
    assert torch.equal(grad, before)
    g_out = torch.tensor(-0.75, device=CUDA, dtype=torch.bfloat16)  # any float dtype
    pending = torch.tensor([0.5], device=CUDA, dtype=loss_dtype(grad))
    _cuda().scale_(grad, g_out, pending)
    s = g_out.to(loss_dtype(grad)) * pending
    torch.testing.assert_close(grad, (before.to(loss_dtype(grad)) * s).to(dtype), rtol=0, atol=0)


def _kernels(fn):
    """Names of the GPU kernels fn launches (memcpy / memset excluded)."""
    fn()  # warm-up: builds, allocator, autograd
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if not n.startswith(("Memcpy", "Memset"))]


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_reduced_fwd_bwd_is_three_launches(mean, shape):
    x, t, hp = _case(*shape, torch.bfloat16)
    one = torch.ones((), device=CUDA)
    cuda = _cuda()

    def step():
        _, _, grad, pending = cuda.forward_reduced(x.unsqueeze(1), t, hp, mean, True)
        cuda.scale_(grad, one, pending)

    names = _kernels(step)
    assert len(names) == 3 and all("drainage_" in n for n in names), names


def test_api_mean_fwd_bwd_launches_at_most_three_of_our_kernels():
    """Counted through the public API: needs DrainageFunction to use forward_reduced / scale_."""
    x = torch.randn(512, 51, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    t = random_targets(512, 51, -1, device=CUDA)

    def step():
        x.grad = None
        fused_drainage_loss(x, t, backend="cuda", reduction="mean").backward()

    ours = [n for n in _kernels(step) if "drainage" in n]
    assert len(ours) <= 3, ours


def test_no_host_synchronisation():
    x, t, hp = _case(512, 1001, torch.bfloat16)
    cuda = _cuda()
    one = torch.ones((), device=CUDA)
    _, _, grad, pending = cuda.forward_reduced(x.unsqueeze(1), t, hp, True, True)  # warm-up
    cuda.scale_(grad, one, pending)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _, grad, pending = cuda.forward_reduced(x.unsqueeze(1), t, hp, True, True)
        cuda.scale_(grad, one, pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [1001, -1, 1000])  # out of range high / low, the drainage index
def test_bad_target_is_a_device_side_assert(bad):
    code = textwrap.dedent(f"""
        import math, torch
        from drainage_fast import backends
        from drainage_fast._inputs import Hyper
        x = torch.randn(8, 1, 1001, device="cuda")
        t = torch.zeros(8, dtype=torch.long, device="cuda")
        t[3] = {bad}
        backends.load("cuda").forward_reduced(x, t, Hyper(0.0, 0.0, 1000, -100), True, True)
        torch.cuda.synchronize()
    """)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode != 0 and "assert" in run.stderr.lower(), run.stderr[-2000:]


# The abstention family and sample weights (issue 21): one kernel serves every member (the member is
# a runtime argument), the forward weighs each row, and the partials carry the kept rows' weight sum
# (fp64) for a weighted mean's divisor; the finalize asserts on bad weights as on bad targets.


def _weighted_case(N, K, dtype, member, weight_dtype=torch.float64):
    x = (torch.randn(N, K, device=CUDA) * 3).to(dtype)
    t = random_targets(N, K, -1, device=CUDA)
    t[1] = t[4] = -100
    weight = strided_weights(N, weight_dtype, seed=K, device=CUDA)
    hp = Hyper(*MEMBER_PARAMS[member], K - 1, -100, int(member))
    return x, t, weight, hp


@pytest.mark.parametrize("member", list(Member))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_members_and_weights_match_the_oracle(member, shape, dtype):
    """forward (reduction none) and forward_reduced + scale_ (mean, sum) of every member with strided
    fp64 weights, against the member's float64 oracle with sample_weight."""
    x, t, weight, hp = _weighted_case(*shape, dtype, member)
    _, oracle, params, (a, b) = FAMILY[member]
    x3, cuda = x.unsqueeze(1), _cuda()
    rows, _ = cuda.forward(x3, t, hp, weight)
    ref_rows = oracle(x.double(), t, **params, reduction="none", sample_weight=weight)
    assert_loss_close(rows, ref_rows, x, a, b)
    for mean in (True, False):
        ref_x = x.detach().double().requires_grad_()
        ref = oracle(ref_x, t, **params, reduction="mean" if mean else "sum", sample_weight=weight)
        ref.backward()
        out, inv_count, grad, pending = cuda.forward_reduced(x3, t, hp, mean, True, weight)
        assert_loss_close(out, ref.detach(), x, a, b)
        if mean:
            kept_weight = weight.to(loss_dtype(x))[t != -100].double().sum()
            torch.testing.assert_close(inv_count.double(), 1 / kept_weight.reshape(1), rtol=1e-6, atol=0)
            assert pending is inv_count
        cuda.scale_(grad, torch.ones((), dtype=loss_dtype(x), device=CUDA), pending)
        assert_grad_close(grad.squeeze(1), ref_x.grad, x, a, b, roundings=2)


@pytest.mark.parametrize("member", list(Member))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_fused_gradient_then_scale_has_the_bits_of_a_recompute(member, dtype):
    """The bits rule with weights (bf16 weights: read and converted in the kernel): the fused
    gradient scaled by grad_out * 1 / sum(w) == backward with that factor per row from forward's
    weighted row terms."""
    for shape in SHAPES:
        x, t, weight, hp = _weighted_case(*shape, dtype, member, torch.bfloat16)
        x3, cuda = x.unsqueeze(1), _cuda()
        _, inv_count, grad, pending = cuda.forward_reduced(x3, t, hp, True, True, weight)
        g_out = torch.tensor(0.37, dtype=loss_dtype(x), device=CUDA)
        cuda.scale_(grad, g_out, pending)
        _, stats = cuda.forward(x3, t, hp, weight)
        recomputed = cuda.backward(x3, t, stats, (g_out * inv_count).reshape(1).expand(t.numel()), hp)
        assert torch.equal(grad, recomputed)


def test_a_weighted_mean_over_no_weight_has_a_zero_gradient():
    """Every kept weight 0 (or every row ignored): the mean is 0 / 0 = nan, as the oracle's, 1 / 0 =
    inf is pending, and scale_by_'s infinite-pending rule leaves the gradient 0."""
    x, t, weight, hp = _weighted_case(64, 11, torch.float32, Member.DAC)
    weight = torch.zeros_like(weight)
    out, inv_count, grad, pending = _cuda().forward_reduced(x.unsqueeze(1), t, hp, True, True, weight)
    _cuda().scale_(grad, torch.ones((), device=CUDA), pending)
    assert torch.isnan(out) and torch.isinf(inv_count).all() and (grad == 0).all()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_a_weighted_reduced_step_is_three_launches(weight_dtype):
    """Weights of any float dtype are read in the forward kernel: no conversion launch."""
    x, t, weight, hp = _weighted_case(300, 11, torch.bfloat16, Member.GAMBLERS, weight_dtype)
    one = torch.ones((), device=CUDA)
    cuda = _cuda()

    def step():
        _, _, grad, pending = cuda.forward_reduced(x.unsqueeze(1), t, hp, True, True, weight)
        cuda.scale_(grad, one, pending)

    names = _kernels(step)
    assert len(names) == 3 and all("drainage_" in n for n in names), names


def test_the_member_is_a_runtime_argument():
    """Every member runs the same forward kernel: a new DAC alpha (every epoch) compiles nothing and
    launches the same kernel."""
    x = torch.randn(300, 11, device=CUDA)
    t = random_targets(300, 11, -1, device=CUDA)
    names = set()
    for member, alpha in [(Member.DRAINAGE, 0.0), (Member.DAC, 0.1), (Member.DAC, 0.9), (Member.CE_ALL, 0.0)]:
        hp = Hyper(alpha, 0.0, 10, -100, int(member))
        names.update(_kernels(lambda hp=hp: _cuda().forward(x.unsqueeze(1), t, hp)))
    assert len(names) == 1, names


@pytest.mark.parametrize("reduced", [True, False])
@pytest.mark.parametrize("bad", ["-1.0", "float('nan')", "float('inf')"])
def test_bad_weight_is_a_device_side_assert(bad, reduced):
    """A negative or non-finite weight (an ignored row's too) is a device-side assert with
    _inputs.WEIGHT_MESSAGE: in forward_reduced's finalize, or once per block in the forward."""
    call = "cuda.forward_reduced(x, t, hp, True, True, w)" if reduced else "cuda.forward(x, t, hp, w)"
    code = textwrap.dedent(f"""
        import torch
        from drainage_fast import backends
        from drainage_fast._inputs import Hyper
        cuda = backends.load("cuda")
        x = torch.randn(8, 1, 1001, device="cuda")
        t = torch.zeros(8, dtype=torch.long, device="cuda")
        t[5] = -100
        w = torch.ones(8, device="cuda")
        w[3], w[5] = {bad}, {bad}
        hp = Hyper(0.6, 0.0, 1000, -100, 2)
        {call}
        torch.cuda.synchronize()
    """)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode != 0 and "assert" in run.stderr.lower(), run.stderr[-2000:]
    assert WEIGHT_MESSAGE in run.stderr, run.stderr[-2000:]
