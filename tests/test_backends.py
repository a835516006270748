"""Every backend against the float64 oracle, loss and gradient; bounds from support.py.

On a machine without a GPU the Triton kernels run in the numpy interpreter (slow): shapes are small
but each one is chosen to reach a distinct code path, as the comments on the lists say.
"""

import math

import pytest
import torch
from support import (
    BACKENDS,
    DEVICE,
    OPS,
    assert_grad_close,
    assert_loss_close,
    compute_roundoff,
    random_targets,
    rounding_error,
)

from drainage_fast import drainage_loss_reference, fused_drainage_loss

try:
    from drainage_fast.backends.triton_launch import MAX_TILE_K
except ImportError:
    MAX_TILE_K = 32768
# One K longer than the largest register tile: the forward streams the row in tiles with the online
# log-sum-exp, and the backward grid has several column blocks.
K_LONG = MAX_TILE_K + 233

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def run_both(
    base, target, *, backend, view=lambda b: b, reduction="none", upstream="random", fuse_grad=True, **hp
):
    """Loss and gradient of `backend` on view(base), and of the oracle on the same values in fp64.

    upstream: "random" (a random upstream gradient, exactly representable in fp32) or "one"
    (loss.sum().backward(), the plain training call).
    """
    x = base.detach().clone().requires_grad_()
    loss = fused_drainage_loss(
        view(x), target, backend=backend, reduction=reduction, _fuse_grad=fuse_grad, **hp
    )
    x64 = base.detach().double().requires_grad_()
    ref = drainage_loss_reference(view(x64), target, reduction=reduction, **hp)
    if upstream == "one":
        loss.sum().backward()
        ref.sum().backward()
    else:
        up = torch.randn(ref.shape, device=ref.device).double()
        (loss.double() * up).sum().backward()
        (ref * up).sum().backward()
    return loss, ref, view(x.grad), view(x64.grad)


def check(loss, ref, grad, ref_grad, logits, alpha=1.0, beta=None, roundings=1):
    beta = 1 / alpha if beta is None else beta
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    assert_loss_close(loss, ref, logits, alpha, beta)
    assert_grad_close(grad, ref_grad, logits, alpha, beta, roundings)


# K: 2 (J empty), 3 (a single J entry), 11 / 51 / 1001 (the paper's class counts + 1, odd, so rows
# are unaligned; 1001 fills a 1024 tile), K_LONG (streamed rows).
@pytest.mark.parametrize("K", [2, 3, 11, 51, 1001, K_LONG])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_oracle(backend, K, dtype):
    N = 3 if K == K_LONG else 37
    logits = (torch.randn(N, K, device=DEVICE) * 3).to(dtype)
    target = random_targets(N, K, -1)
    check(*run_both(logits, target, backend=backend, alpha=0.1), logits, alpha=0.1)


@pytest.mark.parametrize("drainage_idx", [0, 5, 10, -1, -4])  # first, middle, last, negative
@pytest.mark.parametrize("alpha, beta", [(1.0, None), (0.1, None), (0.01, None), (0.1, 3.0), (2.0, 0.5)])
def test_drainage_idx_and_hyper_parameters(backend, drainage_idx, alpha, beta):
    logits = torch.randn(40, 11, device=DEVICE) * 2
    target = random_targets(40, 11, drainage_idx)
    out = run_both(
        logits, target, backend=backend, reduction="mean", alpha=alpha, beta=beta, drainage_idx=drainage_idx
    )
    check(*out, logits, alpha, beta)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recompute"])
@pytest.mark.parametrize("upstream", ["one", "random"])
def test_reductions_and_pass_structures(backend, reduction, fused, upstream):
    logits = (torch.randn(33, 51, device=DEVICE) * 2).to(torch.bfloat16)
    target = random_targets(33, 51, -1)
    target[3] = -100
    out = run_both(
        logits, target, backend=backend, reduction=reduction, upstream=upstream, alpha=0.5, fuse_grad=fused
    )
    check(*out, logits, alpha=0.5, roundings=2 if fused and upstream == "random" else 1)


def test_row_gradients_sum_to_zero(backend):
    logits = torch.randn(16, 13, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(16, 13, 2)
    fused_drainage_loss(logits, target, drainage_idx=2, alpha=0.2, backend=backend).backward()
    torch.testing.assert_close(logits.grad.sum(1), torch.zeros_like(logits.grad[:, 0]), rtol=0, atol=1e-16)


@pytest.mark.parametrize(
    "view",
    [
        lambda b: b[:, 3:14],  # row stride 20 > K: a slice of a wider buffer
        lambda b: b[::2, ::2],  # every other row and output: stride_k = 2
        lambda b: b.t(),  # transposed: stride_k = N, rows 1 apart
    ],
    ids=["column-slice", "strided", "transposed"],
)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_non_contiguous_logits(backend, view, reduction):
    base = torch.randn(22, 20, device=DEVICE)
    x = view(base)
    target = random_targets(x.shape[0], x.shape[1], -1)
    check(*run_both(base, target, backend=backend, view=view, reduction=reduction), x)


def test_int32_and_strided_targets(backend):
    logits = torch.randn(30, 9, device=DEVICE)
    target = random_targets(60, 9, -1, dtype=torch.int32)[::2]  # int32, stride 2
    check(*run_both(logits, target, backend=backend), logits)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_spatial_inputs(backend, layout, reduction):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    logits = torch.randn(2, 7, 3, 5, device=DEVICE).contiguous(memory_format=fmt)
    target = random_targets(2, 7, -1, 3, 5)
    target[0, 1, 2] = -100
    loss, ref, grad, ref_grad = run_both(logits, target, backend=backend, reduction=reduction)
    check(loss, ref, grad, ref_grad, logits)
    if backend != "reference":  # the kernels stride over the class dim: no transpose copy, same layout
        assert grad.stride() == logits.stride()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ignore_index(backend, reduction):
    logits = torch.randn(12, 6, device=DEVICE)
    target = random_targets(12, 6, -1)
    target[[0, 5, 11]] = 2  # ignore_index = 2 is also a valid class: those rows must still be skipped
    loss, ref, grad, ref_grad = run_both(logits, target, backend=backend, reduction=reduction, ignore_index=2)
    check(loss, ref, grad, ref_grad, logits)
    assert grad[[0, 5, 11]].abs().sum().item() == 0.0
    if reduction == "none":
        assert loss[[0, 5, 11]].abs().sum().item() == 0.0


def test_all_ignored(backend):
    x = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    target = torch.full((5,), -100, device=DEVICE)
    mean = fused_drainage_loss(x, target, backend=backend)
    assert math.isnan(mean.item())  # 0 / 0, as F.cross_entropy
    mean.backward()
    assert x.grad.abs().sum().item() == 0.0
    assert fused_drainage_loss(x, target, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(backend, dtype):
    logits = torch.randn(8, 11, device=DEVICE) * 3
    logits[0, :] = 1e4  # everything huge
    logits[1, 3] = 1e4  # one huge J entry
    logits[2, :] = -1e4
    logits[3, 0::2] = -1e4
    target = random_targets(8, 11, -1)
    logits[4, target[4]] = 1e4  # a confident, correct row: loss ~ 0 with full relative precision
    logits[5, target[5]] = -1e4  # a hopeless row: loss ~ 1e4
    logits = logits.to(dtype)
    loss, ref, grad, ref_grad = run_both(logits, target, backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check(loss, ref, grad, ref_grad, logits)


SCALES = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7]


@pytest.mark.parametrize("scale", SCALES, ids=[f"{s:.0e}" for s in SCALES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_large_logits_keep_gradient_precision(backend, dtype, scale):
    """At any logit scale the gradient stays within a small multiple of the error of fp32 autograd
    of the oracle (exact once the probabilities saturate, from ~1e4 on), plus a few roundings.

    The old exp(z_j + w) form, w ~ -z_j, lost it all: 3e-5 at 1e4, 0.1 at 1e7 (true gradients
    <= 1/64). The bound below has no term that grows with the scale.
    """
    if dtype == torch.float16 and scale > 1e4:
        pytest.skip("float16 logits overflow past 65504")
    logits = (torch.randn(64, 11, device=DEVICE, dtype=torch.float64) * scale).to(dtype)
    target = random_targets(64, 11, -1)

    def loss_and_grad(fn, x, **kw):
        x = x.detach().clone().requires_grad_()
        loss = fn(x, target, alpha=0.1, **kw)
        loss.backward()
        return loss.detach().double(), x.grad.double()

    loss, grad = loss_and_grad(fused_drainage_loss, logits, backend=backend)
    loss64, grad64 = loss_and_grad(drainage_loss_reference, logits.double())
    same_precision = torch.float64 if dtype == torch.float64 else torch.float32
    loss_fp, grad_fp = loss_and_grad(drainage_loss_reference, logits.to(same_precision))

    u = compute_roundoff(dtype)
    loss_bound = 4 * (loss_fp - loss64).abs() + OPS * u * loss64.abs()
    assert (loss - loss64).abs() <= loss_bound, ((loss - loss64).abs().item(), loss_bound.item())
    row_max = grad64.abs().amax(1, keepdim=True)
    row_err_fp = (grad_fp - grad64).abs().amax(1, keepdim=True)
    info = torch.finfo(dtype)
    rounding = rounding_error(dtype) * grad64.abs() + 0.5 * info.tiny * info.eps  # one rounding to dtype
    bound = rounding + 4 * row_err_fp + OPS * u * row_max
    err = (grad - grad64).abs()
    worst = err.argmax()
    assert (err <= bound).all(), f"worst error {err.flatten()[worst]:.3e}, bound {bound.flatten()[worst]:.3e}"


INF = float("inf")
# (outputs set to +-inf) per row, K = 7, target 0, drainage output 6: every way a row can hold an
# infinity at t, d or in J. The oracle's answers: +inf in J gives loss inf and a nan gradient;
# -inf at t (or d) gives loss inf and the finite limit gradient; +inf at t gives a finite loss.
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_infinite_logits_match_the_oracle(backend, dtype, reduction):
    x = torch.randn(len(INFINITY_ROWS), 7, device=DEVICE, dtype=torch.float64)
    for row, entries in enumerate(INFINITY_ROWS):
        for col, value in entries:
            x[row, col] = value
    target = torch.zeros(len(INFINITY_ROWS), dtype=torch.long, device=DEVICE)
    ours = x.to(dtype).detach().clone().requires_grad_()
    oracle = x.to(dtype).double().requires_grad_()  # the same (rounded) values
    loss = fused_drainage_loss(ours, target, backend=backend, reduction=reduction)
    ref = drainage_loss_reference(oracle, target, reduction=reduction)
    up = torch.rand(ref.shape, device=DEVICE, dtype=torch.float64)
    loss.backward(up.to(loss.dtype))
    ref.backward(up)
    assert_same_specials(loss.detach().double(), ref.detach())
    assert_same_specials(ours.grad.double(), oracle.grad)
    rows = torch.isfinite(oracle.grad).all(1)  # the finite rest is held to the usual bounds
    roundings = 2 if reduction == "sum" else 1  # the fused gradient is rounded, then scaled by `up`
    assert_grad_close(ours.grad[rows], oracle.grad[rows], ours.detach()[rows], 1.0, 1.0, roundings)
    if reduction == "none":
        finite = torch.isfinite(ref)
        assert_loss_close(loss.detach()[finite], ref.detach()[finite], ours.detach()[finite], 1.0, 1.0)


def assert_same_specials(value, ref):
    """nan where the oracle has nan, and the same infinities where it has them."""
    assert torch.equal(torch.isnan(value), torch.isnan(ref)), (value, ref)
    inf = torch.isinf(ref)
    assert torch.equal(value[inf], ref[inf]), (value, ref)


def test_negative_infinity_entries(backend):
    logits = torch.randn(6, 9, device=DEVICE)
    target = random_targets(6, 9, -1)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, :4] = True  # -inf in J entries only (never at t or d: that loss is +inf by definition)
    mask[torch.arange(6), target] = False
    logits[mask] = float("-inf")
    loss, ref, grad, ref_grad = run_both(logits, target, backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad[mask].abs().sum().item() == 0.0
    check(loss, ref, grad, ref_grad, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_J_is_all_negative_infinity(backend, dtype):
    """Such a row is the K = 2 problem on (z_t, z_d): its max over J is -inf, which must not become
    the shift of the exponentials (-inf - -inf = nan). The oracle's autograd gives nan gradients here
    (logsumexp over all -inf), so the row is compared with the oracle on the pair (z_t, z_d)."""
    N, K = 5, 7
    rows = torch.arange(N, device=DEVICE)
    x = torch.randn(N, K, device=DEVICE, dtype=dtype)
    target = random_targets(N, K, -1)
    in_J = torch.ones(N, K, dtype=torch.bool, device=DEVICE)
    in_J[rows, target] = False
    in_J[:, -1] = False
    x[in_J] = float("-inf")
    x.requires_grad_()
    loss = fused_drainage_loss(x, target, alpha=0.3, reduction="none", backend=backend)
    loss.sum().backward()
    pair = torch.stack([x.detach()[rows, target], x.detach()[:, -1]], 1)
    pair64 = pair.double().requires_grad_()
    ref = drainage_loss_reference(
        pair64, torch.zeros(N, dtype=torch.long, device=DEVICE), alpha=0.3, reduction="none"
    )
    ref.sum().backward()
    assert x.grad[in_J].abs().sum().item() == 0.0
    grad_pair = torch.stack([x.grad[rows, target], x.grad[:, -1]], 1)
    check(loss, ref, grad_pair, pair64.grad, pair, alpha=0.3)


@pytest.mark.parametrize("where", ["J", "target", "drainage"])
def test_nan_propagates(backend, where):
    logits = torch.randn(4, 7, device=DEVICE)
    target = random_targets(4, 7, -1)
    col = {"J": (target[1].item() + 1) % 6, "target": target[1].item(), "drainage": 6}[where]
    logits[1, col] = float("nan")
    x = logits.clone().requires_grad_()
    loss = fused_drainage_loss(x, target, backend=backend, reduction="none")
    (loss * torch.rand(4, device=DEVICE)).sum().backward()
    assert math.isnan(loss[1].item()) and torch.isnan(x.grad[1]).any()
    others = [0, 2, 3]
    assert torch.isfinite(loss[others]).all() and torch.isfinite(x.grad[others]).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(backend, reduction):
    x = torch.randn(0, 5, device=DEVICE, requires_grad=True)
    loss = fused_drainage_loss(
        x, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction=reduction, backend=backend
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction == "mean":
        assert math.isnan(loss.item())
    loss.sum().backward()
    assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(4, 5), (3, 2), (2, 3, 2, 2)], ids=["NK", "K2", "NKHW"])
def test_gradcheck_float64(backend, shape, reduction):
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(shape[0], shape[1], 0, *shape[2:])
    target.view(-1)[-1] = -100

    def fn(x):
        return fused_drainage_loss(x, target, alpha=0.3, drainage_idx=0, reduction=reduction, backend=backend)

    # Default tolerances, nondet_tol=0 included: gradcheck runs the backward twice on one graph and
    # wants the same bits. The first hands out the forward-written gradient, the second recomputes.
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_with_default_arguments(backend):
    """What a user runs first: every argument of the loss and of gradcheck at its default."""
    x = torch.randn(6, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(6, 5, -1)
    assert torch.autograd.gradcheck(lambda x: fused_drainage_loss(x, target, backend=backend), (x,))


def test_fused_and_recomputed_gradients_are_the_same_bits(backend):
    """The forward-written gradient of a mean equals the recomputed one exactly (gradcheck compares
    them in fp64). In bf16 too, where the pass applies 1 / count itself; the cuda backend scales a
    mean's gradient after rounding it to bf16 (backends.Backend: pending), one bf16 ulp at most."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = (torch.randn(33, 51, device=DEVICE) * 4).to(dtype)
        target = random_targets(33, 51, -1)
        target[4] = -100
        grads = []
        for fused in (True, False):
            x = logits.clone().requires_grad_()
            fused_drainage_loss(x, target, alpha=0.1, backend=backend, _fuse_grad=fused).backward()
            grads.append(x.grad)
        if backend == "cuda" and dtype == torch.bfloat16:
            ulp = torch.finfo(dtype).eps * grads[1].double().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((grads[0].double() - grads[1].double()).abs() <= ulp).all()
        else:
            assert torch.equal(grads[0], grads[1]), dtype


def test_second_backward_through_the_same_graph(backend):
    x = torch.randn(10, 6, device=DEVICE, requires_grad=True)
    loss = fused_drainage_loss(x, random_targets(10, 6, -1), backend=backend) * 3.0
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # the forward-written gradient was handed out: this one recomputes
    torch.testing.assert_close(x.grad, 2 * first)


def test_no_grad_forward_equals_grad_forward(backend):
    x = torch.randn(10, 6, device=DEVICE, requires_grad=True)
    target = random_targets(10, 6, -1)
    with torch.no_grad():
        a = fused_drainage_loss(x, target, backend=backend)
    b = fused_drainage_loss(x, target, backend=backend)
    assert a.item() == b.item()


@pytest.mark.parametrize(
    "rows, row_stride, K",
    [
        (2, 2**31, 5),  # one row 2^31 elements in: the stride itself needs 64 bits
        (2**16 + 1, 2**15 + 1, 2),  # row index * row stride passes 2^31 although both fit in int32
    ],
    ids=["int64-stride", "int32-product"],
)
def test_offsets_beyond_int32(backend, rows, row_stride, K):
    """Element offsets past 2^31 (the interpreter wraps int32 arithmetic like a GPU does).

    The rows live in a sparse 4 GiB fp16 buffer: only the pages holding them are touched.
    """
    storage = torch.empty((rows - 1) * row_stride + K, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((rows, K), (row_stride, 1))
    x.copy_(torch.randn(rows, K, device=DEVICE))
    x.requires_grad_()
    target = random_targets(rows, K, -1)
    up = torch.randn(rows, device=DEVICE)
    loss = fused_drainage_loss(x, target, backend=backend, reduction="none")
    (loss * up).sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref = drainage_loss_reference(x64, target, reduction="none")
    (ref * up.double()).sum().backward()
    check(loss, ref, x.grad, x64.grad, x.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confident_rows_keep_relative_precision(backend, dtype):
    """A confident row's loss is ~exp(a) + exp(b) ~ 1e-9: log(1 + x) would round it to 0."""
    logits = torch.randn(32, 11, device=DEVICE, dtype=dtype)
    target = random_targets(32, 11, -1)
    logits[torch.arange(32), target] += 40.0  # p_t >> p_d >> p_J: both ratios of the loss are tiny
    logits[:, -1] += 20.0
    loss = fused_drainage_loss(logits, target, reduction="none", backend=backend)
    ref = drainage_loss_reference(logits.double(), target, reduction="none")
    assert (ref < 1e-6).all() and (ref > 0).all()
    from support import OPS, compute_roundoff, exponent_scale

    bound = OPS * compute_roundoff(dtype) * exponent_scale(logits, 1.0, 1.0)  # relative, see support.py
    assert ((loss.double() - ref).abs() / ref).max().item() <= bound


def test_autocast_keeps_bf16_logits(backend, monkeypatch):
    """The logits reach the kernels as bf16 (no fp32 copy), through DrainageFunction or, for the
    native backends' mean, the C++ autograd op (custom ops take no autocast cast)."""
    seen = []
    import drainage_fast._function as fn
    import drainage_fast.backends.native as native

    as_rows = fn.as_rows
    monkeypatch.setattr(fn, "as_rows", lambda x: seen.append(x.dtype) or as_rows(x))
    if native._REDUCED_LOSS is not None:
        op = native._REDUCED_LOSS
        monkeypatch.setattr(native, "_REDUCED_LOSS", lambda x, *args: seen.append(x.dtype) or op(x, *args))
    layer = torch.nn.Linear(8, 6).to(DEVICE)
    feats = torch.randn(16, 8, device=DEVICE)
    target = random_targets(16, 6, -1)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits = layer(feats)
        loss = fused_drainage_loss(logits, target, backend=backend)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}  # no fp32 copy of the logits
    ref = drainage_loss_reference(logits.detach().double(), target)
    assert_loss_close(loss, ref, logits, 1.0, 1.0)  # the bound derived from bf16 inputs, fp32 math
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_rows_of_256k_outputs(backend):
    """K = 2^18 + 3 (a large vocabulary): 33 streamed tiles per row, 65 column blocks in the backward."""
    logits = torch.randn(2, 2**18 + 3, device=DEVICE).to(torch.bfloat16)
    target = random_targets(2, logits.shape[1], -1)
    check(*run_both(logits, target, backend=backend, reduction="mean"), logits)


# Per-pixel rows whose pixel axis is contiguous (NCHW): 51 and 151 outputs take the pixel layout of
# the Triton forward (lanes along pixels), 7 x 9 = 63 pixels an image is no multiple of its blocks,
# and the drainage output is not the last. channels_last rows are evenly spaced (one row stride).
@pytest.mark.parametrize("K", [51, 151])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "NCHW-slice"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_per_pixel_rows(backend, K, layout, reduction):
    base = torch.randn(3, K + 2, 7, 9, device=DEVICE).to(torch.bfloat16)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)

    def view(b):  # NCHW-slice: a channel slice, so the gradient's layout differs from the logits'
        return b[:, 1 : K + 1] if layout == "NCHW-slice" else b[:, :K]

    target = random_targets(3, K, 4, 7, 9)
    target[1, 2:5, 3] = -100
    out = run_both(base, target, backend=backend, view=view, reduction=reduction, drainage_idx=4, alpha=0.3)
    # mean: the gradient written in the forward is rounded again when the backward scales it
    check(*out, view(base), alpha=0.3, roundings=2 if reduction == "mean" else 1)


# Unit-stride rows of an odd length: each row starts at another offset from a 16-byte boundary, so
# the aligned body of the Triton kernels starts 0..V-1 elements in (V per 16 bytes); 8 rows share one
# tile at K = 101. The slice starts the whole buffer off a 16-byte boundary.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("view", ["rows", "slice"])
def test_odd_rows_off_every_alignment(backend, dtype, view):
    K = 101
    base = (torch.randn(19, K + 3, device=DEVICE) * 3).to(dtype)

    def pick(b):
        return b[:, 3:] if view == "slice" else b[:, :K]

    target = random_targets(19, K, 0)
    target[5] = -100
    out = run_both(base, target, backend=backend, view=pick, reduction="mean", drainage_idx=0)
    check(*out, pick(base), roundings=2)  # rounded in the forward, and again by the upstream scale
