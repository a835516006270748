"""Every member of the abstention family, on every backend, against its float64 oracle.

Drainage has the full matrix in test_backends.py; here each member (Drainage too, as the control)
goes through the cases where members differ: the row function (shapes, dtypes, reductions and pass
structures, strides, per-pixel rows, ignore_index), its precision at logit scales 1 to 1e7, the
infinities and NaN as its oracle gives them, sample weights, gradcheck and offsets past 2^31. Shapes
are small: on a machine without a GPU the Triton kernels run in the numpy interpreter.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from support import (
    BACKENDS,
    DEVICE,
    MEMBERS,
    OPS,
    assert_grad_close,
    assert_loss_close,
    compute_roundoff,
    random_targets,
    rounding_error,
)

from drainage_fast import fused_cross_entropy_loss

try:
    from drainage_fast.backends.triton_launch import MAX_TILE_K
except ImportError:
    MAX_TILE_K = 32768
K_LONG = MAX_TILE_K + 233  # streamed rows

pytestmark = [
    pytest.mark.parametrize("backend", BACKENDS),
    pytest.mark.parametrize("member", MEMBERS, ids=repr),
]


def run_both(
    member, base, target, *, backend, view=lambda b: b, reduction="none", weight=None, fuse_grad=True, **kw
):
    """Loss and gradient of the backend on view(base), and of the oracle on the same values in fp64,
    under one random upstream gradient (exactly representable in fp32)."""
    x = base.detach().clone().requires_grad_()
    extra = {} if fuse_grad else {"_fuse_grad": False}
    loss = member.loss(
        view(x), target, backend=backend, reduction=reduction, sample_weight=weight, **kw, **extra
    )
    x64 = base.detach().double().requires_grad_()
    w64 = None if weight is None else weight.double()
    ref = member.oracle(view(x64), target, reduction=reduction, sample_weight=w64, **kw)
    up = torch.randn(ref.shape, device=ref.device).float().double()
    (loss.double() * up).sum().backward()
    (ref * up).sum().backward()
    return loss, ref, view(x.grad), view(x64.grad)


def check(member, loss, ref, grad, ref_grad, logits, roundings=1):
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    assert_loss_close(loss, ref, logits, **member.bounds())
    assert_grad_close(grad, ref_grad, logits, roundings=roundings, **member.bounds())


# K: 2 (J empty), 11 (columns), 1001 (a tile, odd K: unaligned rows), K_LONG (streamed rows).
@pytest.mark.parametrize("K", [2, 11, 1001, K_LONG])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle(backend, member, K, dtype):
    N = 3 if K == K_LONG else 29
    logits = (torch.randn(N, K, device=DEVICE) * 3).to(dtype)
    target = random_targets(N, K, -1)
    check(member, *run_both(member, logits, target, backend=backend), logits)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recompute"])
def test_reductions_and_pass_structures(backend, member, reduction, fused):
    logits = (torch.randn(33, 51, device=DEVICE) * 2).to(torch.bfloat16)
    target = random_targets(33, 51, 7)
    target[3] = -100
    out = run_both(
        member, logits, target, backend=backend, reduction=reduction, fuse_grad=fused, drainage_idx=7
    )
    check(member, *out, logits, roundings=2 if fused else 1)


@pytest.mark.parametrize(
    "view",
    [lambda b: b[:, 3:14], lambda b: b[::2, ::2], lambda b: b.t()],
    ids=["column-slice", "strided", "transposed"],
)
def test_non_contiguous_logits(backend, member, view):
    base = torch.randn(22, 20, device=DEVICE)
    x = view(base)
    target = random_targets(x.shape[0], x.shape[1], -1)
    check(
        member, *run_both(member, base, target, backend=backend, view=view, reduction="mean"), x, roundings=2
    )


@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
@pytest.mark.parametrize("K", [7, 51])
def test_per_pixel_rows(backend, member, layout, K):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    logits = torch.randn(2, K, 5, 7, device=DEVICE).contiguous(memory_format=fmt)
    target = random_targets(2, K, 2, 5, 7)
    target[0, 1, 2] = -100
    out = run_both(member, logits, target, backend=backend, reduction="none", drainage_idx=2)
    check(member, *out, logits)


def test_ignore_index_and_all_ignored(backend, member):
    logits = torch.randn(12, 6, device=DEVICE)
    target = random_targets(12, 6, -1)
    target[[0, 5, 11]] = 2  # ignore_index = 2 is also a valid class: those rows must still be skipped
    loss, ref, grad, ref_grad = run_both(member, logits, target, backend=backend, ignore_index=2)
    check(member, loss, ref, grad, ref_grad, logits)
    assert grad[[0, 5, 11]].abs().sum().item() == 0.0 and loss[[0, 5, 11]].abs().sum().item() == 0.0
    x = logits.clone().requires_grad_()
    mean = member.loss(x, torch.full((12,), -100, device=DEVICE), backend=backend)
    mean.backward()
    assert math.isnan(mean.item()) and torch.equal(x.grad, torch.zeros_like(x))


SCALES = [1e0, 1e2, 1e4, 1e7]


@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:.0e}" for s in SCALES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_precision_at_any_logit_scale(backend, member, dtype, scale):
    """The loss errs by a few roundings of itself (plus the log-sum-exp's own rounding), and the
    gradient by a few roundings of the row's largest entry, at every scale: no term grows with the
    logits. Naive fp32 autograd of the oracle loses everything at 1e4 (it rounds two large
    log-sum-exps before subtracting them)."""
    logits = (torch.randn(64, 11, device=DEVICE, dtype=torch.float64) * scale).to(dtype)
    target = random_targets(64, 11, -1)
    x = logits.detach().clone().requires_grad_()
    loss = member.loss(x, target, backend=backend, reduction="none")
    loss.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    ref = member.oracle(x64, target, reduction="none")
    ref.sum().backward()
    u = compute_roundoff(dtype)
    factor = member.bounds().get("factor", 1.0)
    # log K + 1: the log-sum-exps of the row; the hyper-parameters' logs enter the row's exponents.
    magnitude = (
        math.log(11) + 1 + abs(math.log(member.bounds()["alpha"])) + abs(math.log(member.bounds()["beta"]))
    )
    loss_bound = factor * OPS * u * (ref.abs() + magnitude) + OPS * 2.0**-52 * ref.abs()
    assert ((loss.double() - ref).abs() <= loss_bound).all(), ((loss.double() - ref).abs() - loss_bound).max()
    grad, grad64 = x.grad.double(), x64.grad
    info = torch.finfo(dtype)
    row_max = grad64.abs().amax(1, keepdim=True)
    if member.name == "dac":  # its gradient holds CE_C itself (r = alpha - q CE_C): errors scale with it
        row_max = row_max * (1 + ref.abs().unsqueeze(1))
    # the oracle's own error: a few float64 roundings of terms of size 1 (p_t - 1 of a confident row)
    oracle = OPS * 2.0**-52
    bound = (
        rounding_error(dtype) * grad64.abs()
        + 0.5 * info.tiny * info.eps
        + factor * OPS * u * row_max
        + oracle
    )
    err = (grad - grad64).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3e} against {bound.flatten()[worst]:.3e}"


INF = float("inf")
# (outputs set to +-inf) per row, K = 7, target 0, drainage output 6: every way a row can hold an
# infinity at t, d or in J (the list of test_backends.py).
INFINITY_ROWS = [
    [],
    [(2, INF)],
    [(2, INF), (3, INF)],
    [(0, -INF)],
    [(0, INF)],
    [(6, -INF)],
    [(6, INF)],
    [(0, -INF), (6, -INF)],
    [(0, INF), (2, INF)],
    [(0, -INF), (2, INF)],
    [(2, -INF), (3, -INF)],
    [(6, INF), (2, INF)],
    [(0, INF), (6, INF)],
    [(0, -INF), (6, INF)],
    [(0, INF), (6, -INF)],
]


@pytest.mark.parametrize("reduction", ["none", "sum"], ids=["recompute", "fused"])
def test_infinities_and_nan_as_the_oracle(backend, member, reduction):
    """-inf logits (masked outputs) give what the oracle gives. Where the oracle itself meets
    inf - inf (its loss is nan: a +inf target logit in -log p_t, say) the kernels may give the limit
    instead (CE 0 for p_t = 1); where the oracle's gradient has a nan, the kernels' may be nan or the
    limit. Everywhere else: the oracle's infinities, and its finite values within the usual bounds.
    (Drainage matches its oracle everywhere: test_backends.py.) A nan logit makes its row nan."""
    x = torch.randn(len(INFINITY_ROWS) + 1, 7, device=DEVICE, dtype=torch.float64)
    for row, entries in enumerate(INFINITY_ROWS):
        for col, value in entries:
            x[row, col] = value
    x[-1, 3] = float("nan")
    target = torch.zeros(len(x), dtype=torch.long, device=DEVICE)
    ours = x.float().requires_grad_()
    oracle = x.float().double().requires_grad_()
    member.loss(ours, target, backend=backend, reduction=reduction).sum().backward()
    member.oracle(oracle, target, reduction=reduction).sum().backward()
    rows = member.loss(ours.detach(), target, backend=backend, reduction="none").double()
    ref_rows = member.oracle(oracle.detach(), target, reduction="none")
    assert torch.isnan(rows[-1]) and torch.isnan(ours.grad[-1]).any()  # nan stays in its own row
    defined = ~torch.isnan(ref_rows)
    assert torch.equal(torch.isinf(rows[defined]), torch.isinf(ref_rows[defined])), (rows, ref_rows)
    assert torch.equal(rows[defined & torch.isinf(ref_rows)], ref_rows[defined & torch.isinf(ref_rows)])
    finite = defined & torch.isfinite(ref_rows)
    assert_loss_close(rows[finite], ref_rows[finite], ours.detach()[finite], **member.bounds())
    grad_defined = ~torch.isnan(oracle.grad).any(1)
    inf = torch.isinf(oracle.grad) & grad_defined[:, None]
    assert torch.equal(ours.grad.double()[inf], oracle.grad[inf])
    exact = grad_defined & torch.isfinite(oracle.grad).all(1)
    roundings = 2 if reduction == "sum" else 1
    assert_grad_close(
        ours.grad[exact], oracle.grad[exact], ours.detach()[exact], roundings=roundings, **member.bounds()
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recompute"])
def test_sample_weights(backend, member, reduction, fused):
    """Loss r times w_r; "mean" is sum(w_r l_r) / sum(w_r) over the kept rows. A zero weight keeps
    the row out of both sums; the ignored row's weight counts for nothing."""
    logits = torch.randn(3, 9, 4, device=DEVICE)
    target = random_targets(3, 9, -1, 4)
    target[1, 2] = -100
    weight = torch.rand(3, 4, device=DEVICE) * 2
    weight[0, 1] = 0.0
    out = run_both(
        member, logits, target, backend=backend, reduction=reduction, weight=weight, fuse_grad=fused
    )
    check(member, *out, logits, roundings=2)


def test_weights_that_require_grad_get_their_gradient(backend, member):
    logits = torch.randn(10, 6, device=DEVICE, requires_grad=True)
    target = random_targets(10, 6, -1)
    target[4] = -100
    weight = torch.rand(10, device=DEVICE, requires_grad=True)
    loss = member.loss(logits, target, backend=backend, sample_weight=weight)
    grad_x, grad_w = torch.autograd.grad(loss, (logits, weight))
    x64, w64 = logits.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = member.oracle(x64, target, sample_weight=w64)
    ref_x, ref_w = torch.autograd.grad(ref, (x64, w64))
    assert_loss_close(loss.detach(), ref.detach(), logits.detach(), **member.bounds())
    assert_grad_close(grad_x, ref_x, logits.detach(), **member.bounds())
    assert_grad_close(grad_w, ref_w, logits.detach(), **member.bounds())
    assert grad_w[4].item() == 0.0


def test_gradcheck_with_default_arguments(backend, member):
    x = torch.randn(6, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(6, 5, -1)
    assert torch.autograd.gradcheck(lambda x: member.loss(x, target, backend=backend), (x,))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_with_weights_and_pixels(backend, member, reduction):
    x = torch.randn(2, 4, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(2, 4, 0, 3)
    target[1, 1] = -100
    weight = torch.rand(2, 3, device=DEVICE, dtype=torch.float64)

    def fn(x):
        return member.loss(
            x, target, backend=backend, reduction=reduction, drainage_idx=0, sample_weight=weight
        )

    assert torch.autograd.gradcheck(fn, (x,))


def test_offsets_beyond_int32(backend, member):
    """Element offsets past 2^31: one row 2^31 elements in, in a sparse fp16 buffer."""
    rows, row_stride, K = 2, 2**31, 5
    storage = torch.empty((rows - 1) * row_stride + K, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((rows, K), (row_stride, 1))
    x.copy_(torch.randn(rows, K, device=DEVICE))
    target = random_targets(rows, K, -1)
    check(member, *run_both(member, x, target, backend=backend), x)


def test_the_ce_member_is_f_cross_entropy_with_class_weights(backend, member):
    """An independent check of the weighted mean: CE over all outputs with w_r = class_weight[t_r]
    is F.cross_entropy(weight=class_weight)."""
    if member.name != "ce_all":
        pytest.skip("one member is enough")
    logits = torch.randn(40, 8, device=DEVICE, dtype=torch.float64)
    target = random_targets(40, 8, -1)
    target[7] = -100
    class_weight = torch.rand(8, device=DEVICE, dtype=torch.float64)
    ours = fused_cross_entropy_loss(
        logits, target, backend=backend, sample_weight=class_weight[target.clamp(min=0)]
    )
    expected = F.cross_entropy(logits, target, weight=class_weight)
    assert abs(ours.item() - expected.item()) <= 64 * 2**-52 * abs(expected.item())
