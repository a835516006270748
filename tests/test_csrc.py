"""The csrc/ extension: its ops as torch ops (opcheck), its build and load paths, and the CUDA source.

The numbers of the "cpp" backend (and "cuda" on a GPU) are checked against the float64 oracle by the
whole backend matrix (test_backends.py, test_api.py, test_compile.py, through support.BACKENDS);
this file checks what only the extension has.
"""

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from family_cases import FAMILY, op_args, strided_weights
from support import DEVICE, assert_grad_close, random_targets

from drainage_fast import _ext, backends, drainage_loss_reference, fused_drainage_loss
from drainage_fast._inputs import WEIGHT_MESSAGE, as_rows, from_rows
from drainage_fast._members import Member

ROOT = Path(__file__).resolve().parents[1]
DISABLED = os.environ.get("DRAINAGE_FAST_NO_EXT") == "1"
NATIVE = "cuda" if DEVICE.type == "cuda" else "cpp"
needs_ext = pytest.mark.skipif(
    not backends.availability(NATIVE, DEVICE)[0],
    reason=f"backend {NATIVE!r} unavailable: {backends.availability(NATIVE, DEVICE)[1]}",
)


@pytest.mark.skipif(DISABLED, reason="DRAINAGE_FAST_NO_EXT=1")
def test_cpp_extension_builds_here():
    # CI has a C++ compiler: the CPU kernels must build, or the whole matrix would skip them.
    ok, reason = backends.availability("cpp", torch.device("cpu"))
    assert ok, reason


def _rows(layout, dtype, requires_grad):
    """(N, S, K) row views as the API makes them, with one ignored row."""
    if layout == "contiguous":
        x3 = torch.randn(6, 1, 11, device=DEVICE)
    elif layout == "transposed":  # stride_k = N: every row is strided
        x3 = torch.randn(11, 6, device=DEVICE).t().unsqueeze(1)
    elif layout == "channels_last":  # (N, K, H, W) channels_last -> (N, H*W, K) with unit stride_k
        x3 = torch.randn(2, 11, 3, 2, device=DEVICE).contiguous(memory_format=torch.channels_last)
        x3 = x3.movedim(1, -1).reshape(2, 6, 11)
    else:  # empty
        x3 = torch.randn(0, 1, 11, device=DEVICE)
    x3 = x3.to(dtype).detach().requires_grad_(requires_grad)
    target = random_targets(x3.shape[0] * x3.shape[1], 11, -1)
    if target.numel():
        target[1] = -100
    return x3, target


LAYOUTS = ["contiguous", "transposed", "channels_last", "empty"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
HP = (
    0.25,
    -0.5,
    10,
    -100,
    0,
    None,
)  # h1, h2 (Drainage: log alpha, log beta), d, ignore_index, member, weight


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(layout, dtype):
    # The ops are differentiated by DrainageFunction (backends/native.py), so checked without grad.
    x3, target = _rows(layout, dtype, False)
    torch.library.opcheck(torch.ops.drainage_fast.forward.default, (x3, target, *HP))


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward_forward_with_grad_and_scale(layout, dtype):
    x3, target = _rows(layout, dtype, False)
    R = target.numel()
    loss, stats = torch.ops.drainage_fast.forward(x3, target, *HP)
    for grad_rows in (torch.randn(R, device=DEVICE, dtype=loss.dtype), loss.new_ones(()).expand(R)):
        torch.library.opcheck(
            torch.ops.drainage_fast.backward.default, (x3, target, stats, grad_rows, HP[2], HP[3])
        )
    inv_count = torch.reciprocal((target != -100).sum().to(loss.dtype)).reshape(1)
    for scale in (None, inv_count):
        torch.library.opcheck(torch.ops.drainage_fast.forward_with_grad.default, (x3, target, scale, *HP))
    grad = torch.empty_like(x3).normal_()
    torch.library.opcheck(torch.ops.drainage_fast.scale_.default, (grad, torch.tensor(0.5, device=DEVICE)))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_in_place_and_skip_when_one(dtype):
    grad = torch.randn(3, 1, 700, device=DEVICE).to(dtype)
    before = grad.clone()
    torch.ops.drainage_fast.scale_(grad, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(grad, before)
    torch.ops.drainage_fast.scale_(grad, torch.tensor(-0.75, device=DEVICE))
    torch.testing.assert_close(grad, (before.float() * -0.75).to(dtype), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_grad_is_the_gradient_of_the_mean(dtype):
    """The fused op gives the same bits as forward, then backward with the mean's upstream 1 / count."""
    x3, target = _rows("contiguous", dtype, False)
    loss_ref, stats_ref = torch.ops.drainage_fast.forward(x3, target, *HP)
    inv_count = torch.reciprocal((target != -100).sum().to(loss_ref.dtype)).reshape(1)
    loss, stats, grad = torch.ops.drainage_fast.forward_with_grad(x3, target, inv_count, *HP)
    per_row = inv_count.expand(target.numel())
    grad_ref = torch.ops.drainage_fast.backward(x3, target, stats_ref, per_row, HP[2], HP[3])
    assert torch.equal(grad, grad_ref)
    assert torch.equal(loss, loss_ref) and torch.equal(stats, stats_ref)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "nchw", "wide", "long"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("member", list(Member))
def test_forward_grad_in_place_is_forward_then_backward(layout, dtype, member):
    """forward_grad_ (the fused linear path's chunk) overwrites the logits with the gradient of the
    summed (weighted) row losses: the same bits as forward, then backward with upstream 1, with
    ignored rows and weights. Layouts: short rows in groups, strided rows, unit-stride pixels, the
    pixel layout (NCHW, 32 pixels an image: the CPU's vector lanes along pixels), K = 601 (32 lanes a
    row on CUDA) and K = 3001 (one row a group; CUDA's block-per-row path)."""
    if layout == "nchw":  # (2, 11, 4, 8) NCHW -> (2, 32, 11) with stride_k = 32
        x3 = torch.randn(2, 11, 4, 8, device=DEVICE).to(dtype).movedim(1, -1).reshape(2, 32, 11)
        target = random_targets(64, 11, 10)
        target[5] = -100
    elif layout in ("wide", "long"):
        K = 601 if layout == "wide" else 3001
        x3 = (3 * torch.randn(5, 1, K, device=DEVICE)).to(dtype)
        target = random_targets(5, K, 10)
        target[1] = -100
    else:
        x3, target = _rows(layout, dtype, False)
    weight = strided_weights(target.numel())
    hp = op_args(member, 10, weight)
    loss_ref, stats = torch.ops.drainage_fast.forward(x3, target, *hp)
    ones = loss_ref.new_ones(()).expand(target.numel())
    grad_ref = torch.ops.drainage_fast.backward(x3, target, stats, ones, 10, -100)
    buffer = x3.clone()
    loss = torch.ops.drainage_fast.forward_grad_(buffer, target, *hp)
    assert torch.equal(loss, loss_ref)
    assert torch.equal(buffer, grad_ref)
    torch.library.opcheck(torch.ops.drainage_fast.forward_grad_.default, (x3.clone(), target, *hp))


@needs_ext
def test_forward_grad_refuses_logits_whose_rows_share_memory():
    """In place, an expanded view would have several rows write one memory: refused, not raced."""
    x3 = torch.randn(1, 1, 11, device=DEVICE).expand(4, 1, 11)
    with pytest.raises(RuntimeError, match="refers to a single memory location"):
        torch.ops.drainage_fast.forward_grad_(x3, random_targets(4, 11, 10), *op_args(Member.DRAINAGE, 10))


@needs_ext
def test_forward_mode_ad_is_refused_not_silently_dropped():
    """A dual tensor (torch.autograd.forward_ad) has no grad requirement, so it reaches the native
    mean / sum op: its node has no jvp, and must say so rather than return a loss without tangent."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(6, 5, device=DEVICE)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="first-order backward only"):
        fused_drainage_loss(fwAD.make_dual(x, torch.ones_like(x)), random_targets(6, 5, -1), backend=NATIVE)


@needs_ext
def test_two_threads_backward_through_one_loss_each_get_the_gradient():
    """The node's mutex (Node's thread-safety contract): two retain_graph backwards through one loss
    from two threads each get the whole gradient, never the one pre-written buffer twice."""
    import threading

    x = torch.randn(64, 33, device=DEVICE, requires_grad=True)
    target = random_targets(64, 33, -1)
    (expected,) = torch.autograd.grad(fused_drainage_loss(x, target, backend=NATIVE), x)
    for _ in range(20):
        loss = fused_drainage_loss(x, target, backend=NATIVE)
        grads = [None, None]

        def run(i, loss=loss, grads=grads):
            grads[i] = torch.autograd.grad(loss, x, retain_graph=True)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g in grads:
            assert torch.equal(g, expected)


@needs_ext
def test_forward_with_grad_refuses_a_scale_of_the_wrong_type():
    x3, target = _rows("contiguous", torch.float32, False)
    with pytest.raises(RuntimeError, match="scale must be a one-element Float tensor"):
        torch.ops.drainage_fast.forward_with_grad(x3, target, torch.tensor([3]), *HP)


@needs_ext
@pytest.mark.parametrize("member", list(Member))
def test_opcheck_members_and_weights(member):
    """The schemas with a member and sample weights (any float dtype and stride), every op that
    takes them."""
    x3, target = _rows("contiguous", torch.float32, False)
    for weight in (None, strided_weights(target.numel())):
        hp = op_args(member, 10, weight)
        torch.library.opcheck(torch.ops.drainage_fast.forward.default, (x3, target, *hp))
        torch.library.opcheck(torch.ops.drainage_fast.forward_with_grad.default, (x3, target, None, *hp))
        for mean in (True, False):
            torch.library.opcheck(
                torch.ops.drainage_fast.forward_reduced.default, (x3, target, mean, True, *hp)
            )
    x = torch.randn(6, 11, 3, device=DEVICE, requires_grad=True)
    target = random_targets(6, 11, 10, 3)
    weight = strided_weights(18).reshape(6, 3)
    torch.library.opcheck(
        torch.ops.drainage_fast.reduced_loss.default,
        (x, target, True, *op_args(member, 10, weight)),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_import_never_fails_without_the_extension():
    run = _python(
        "import torch, drainage_fast as df\n"
        "from drainage_fast import backends\n"
        "print(df.available_backends())\n"
        "print(backends.availability('cpp', torch.device('cpu'))[1])\n"
        "print(backends.resolve('auto', torch.device('cpu')).NAME)\n"
        "try:\n"
        "    df.fused_drainage_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), backend='cpp')\n"
        "except RuntimeError as err:\n"
        "    print('raised:', err)\n",
        DRAINAGE_FAST_NO_EXT="1",
        TRITON_INTERPRET="0",
    )
    assert run.returncode == 0, run.stderr
    names, reason, auto, raised = run.stdout.strip().splitlines()
    assert "cpp" not in names and "reference" in names
    assert "DRAINAGE_FAST_NO_EXT=1" in reason
    assert auto == "reference"
    assert raised.startswith("raised: backend='cpp' cannot run on cpu") and "DRAINAGE_FAST_NO_EXT" in raised
    assert "NativeBuildWarning" not in run.stderr  # turned off on purpose: nothing to warn about


# A C++ build that fails (the compiler named by CXX does not exist), in a fresh cache: the first "auto"
# loss on the CPU warns once, naming the reason and the fixes, and computes with "reference".
FAILED_BUILD = """
import warnings
import torch
import drainage_fast as df
from drainage_fast import backends
x, t = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # every warning emitted is recorded: "once" must be our doing
    losses = [df.fused_drainage_loss(x, t, alpha=0.3) for _ in range(2)] + [df.available_backends()]
built = [w for w in caught if issubclass(w.category, df.NativeBuildWarning)]
print(len(built), issubclass(df.NativeBuildWarning, UserWarning))
print(str(built[0].message) if built else "")
print(backends.resolve("auto", torch.device("cpu")).NAME, losses[2])
print(torch.isclose(losses[0], df.drainage_loss_reference(x, t, alpha=0.3), rtol=1e-12).item())
"""


@pytest.mark.skipif(DISABLED or _ext._ahead_of_time, reason="only the just-in-time build can fail here")
def test_a_failed_build_warns_once_and_auto_runs_reference(tmp_path):
    run = _python(
        FAILED_BUILD, CXX="/nonexistent/c++", DRAINAGE_FAST_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="0"
    )
    assert run.returncode == 0, run.stderr
    count, message, resolved, same = run.stdout.strip().splitlines()
    assert count == "1 True", run.stdout
    # the reason is the shell's line about the missing compiler, not ninja's closing "build stopped"
    assert "could not be built (" in message and "/nonexistent/c++: not found)" in message, message
    for fix in ("C++ compiler", "ninja", "DRAINAGE_FAST_BUILD_EXT=1", "availability('cpp')"):
        assert fix in message, fix
    assert resolved == "reference ['reference']" and same == "True"
    # the category is what a user filters on
    quiet = _python(
        "import warnings, torch, drainage_fast as df\n"
        "warnings.filterwarnings('ignore', category=df.NativeBuildWarning)\n"
        "df.fused_drainage_loss(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))\n",
        CXX="/nonexistent/c++",
        DRAINAGE_FAST_CACHE_DIR=str(tmp_path / "again"),
        TRITON_INTERPRET="0",
    )
    assert quiet.returncode == 0 and "NativeBuildWarning" not in quiet.stderr, quiet.stderr


def test_a_failed_build_is_a_reason_not_an_exception(tmp_path, monkeypatch):
    # A source tree that does not compile: the loader reports the compiler's complaint.
    src = tmp_path / "csrc"
    for name in set(_ext.CPU_SOURCES) | set(_ext.HEADERS):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("this is not C++;\n")
    monkeypatch.setattr(_ext, "csrc_dir", lambda: src)
    monkeypatch.setenv("DRAINAGE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    reason = _ext._jit("cpu", _ext.CPU_SOURCES, with_cuda=False)
    assert reason is not None and "build of csrc/ failed" in reason and "error" in reason.lower()
    monkeypatch.setattr(_ext, "csrc_dir", lambda: None)
    assert "not shipped" in _ext._jit("cpu", _ext.CPU_SOURCES, with_cuda=False)


@pytest.mark.skipif(DISABLED or _ext._ahead_of_time, reason="only the just-in-time build caches")
def test_a_new_process_reuses_the_cached_build():
    assert backends.availability("cpp", torch.device("cpu"))[0]
    run = _python("from drainage_fast.backends import cpp; print(cpp.availability()[0])")
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    assert "compiling" not in run.stderr  # loaded from the cache, not built again


@needs_ext
def test_named_native_backend_on_the_wrong_device_raises():
    other = "cpp" if NATIVE == "cuda" else "cuda"
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match=f"backend='{other}' cannot run on {DEVICE.type}"):
        fused_drainage_loss(x, torch.zeros(3, dtype=torch.long, device=DEVICE), backend=other)


def test_a_stale_build_lock_is_cleared(tmp_path):
    """A build killed mid-way leaves torch's lock file; waiting on it would hang every later import."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for d in (stale, fresh):
        d.mkdir()
        (d / "lock").touch()
    old = time.time() - _ext.STALE_LOCK_SECONDS - 60
    os.utime(stale / "lock", (old, old))
    _ext._clear_stale_lock(stale)
    _ext._clear_stale_lock(fresh)  # may belong to a build running right now in another process
    assert not (stale / "lock").exists() and (fresh / "lock").exists()


# The CPU kernel (csrc/cpu) runs a row's math in one lane of a group of rows and its loops over
# 16-value chunks, with a partial last chunk and the chunks that hold t or d masked: rows of every
# length around those edges, targets at both ends of the row, rows at every alignment.
needs_cpu_kernel = pytest.mark.skipif(
    not backends.availability("cpp", torch.device("cpu"))[0], reason="backend 'cpp' unavailable"
)
EDGE_K = [2, 3, 15, 16, 17, 33, 1001, 4099]


def _edge_rows(K, N=37, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N + 1, K, generator=gen) * 5).to(dtype)[1:]  # rows start at every alignment
    d = 0 if K % 2 else K - 1
    t = torch.randint(0, K - 1, (N,), generator=gen)
    t = t + (t >= d).long()
    t[0], t[1], t[2] = (1, K - 1, -100) if d == 0 else (0, K - 2, -100)
    return x, t, d


@needs_cpu_kernel
@pytest.mark.parametrize("K", EDGE_K)
def test_cpu_chunk_edges_match_float64(K):
    from support import assert_grad_close, assert_loss_close

    x, t, d = _edge_rows(K)
    alpha, beta = 0.1, 0.7
    ref_x = x.double().requires_grad_()
    ref = fused_drainage_loss(
        ref_x, t, alpha=alpha, beta=beta, drainage_idx=d, reduction="none", backend="reference"
    )
    upstream = torch.rand(x.shape[0], dtype=torch.float64) + 0.5
    ref.backward(upstream)
    for reduction in ("none", "mean"):
        xc = x.clone().requires_grad_()
        loss = fused_drainage_loss(
            xc, t, alpha=alpha, beta=beta, drainage_idx=d, reduction=reduction, backend="cpp"
        )
        if reduction == "none":
            assert_loss_close(loss, ref.detach(), x, alpha, beta)
            loss.backward(upstream.float())
            assert_grad_close(xc.grad, ref_x.grad, x, alpha, beta)
        else:
            loss.backward()
            kept = (t != -100).sum()
            mean_grad = ref_x.grad / upstream[:, None] / kept
            mean_grad[t == -100] = 0
            assert_grad_close(xc.grad, mean_grad, x, alpha, beta)


@needs_cpu_kernel
@pytest.mark.parametrize("member", list(Member))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", EDGE_K)
def test_cpu_rows_do_not_depend_on_their_group_or_the_thread_count(K, dtype, member):
    """Each row's loss, row terms and gradient are the same bits whether it is computed alone, in a
    batch on 1 thread or on 2, fused or recomputed; for every member, with sample weights."""
    x, t, d = _edge_rows(K, dtype=dtype)
    x3 = x.unsqueeze(1)
    ltype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor([0.25], dtype=ltype)
    weight = strided_weights(t.numel(), torch.bfloat16)
    hp = op_args(member, d, weight)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(torch.ops.drainage_fast.forward_with_grad(x3, t, scale, *hp))
    finally:
        torch.set_num_threads(threads)
    loss, stats, grad = runs[0]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    recomputed = torch.ops.drainage_fast.backward(x3, t, stats, scale.expand(t.numel()), d, -100)
    assert torch.equal(grad, recomputed)
    for r in range(0, x.shape[0], 5):
        one_hp = (*hp[:-1], weight[r : r + 1])
        one = torch.ops.drainage_fast.forward_with_grad(x3[r : r + 1].clone(), t[r : r + 1], scale, *one_hp)
        assert torch.equal(one[0], loss[r : r + 1])
        assert torch.equal(one[1], stats[:, r : r + 1])
        assert torch.equal(one[2], grad[r : r + 1])


# Per-pixel rows (N, K, d1..dk): in contiguous (NCHW) logits the rows of an image are adjacent and a
# row's outputs lie S apart, and the CPU kernel takes 16 pixels of an image as its lanes and walks
# the outputs (the pixel layout of csrc/cpu/drainage_cpu.cpp); channels_last rows are contiguous and
# take the row path. Images of S = 20, 35 and 51 pixels: whole groups of 16 and a partial last one
# (masked loads and stores), one to three images (groups stop at image boundaries). K: J empty (2),
# one J entry (3), a partial chunk (17), the paper's class counts + 1, ADE20K's 151 outputs, and a
# long row (1001 > 256: the row path's four accumulators).
PIXEL_SHAPES = [(1, 4, 5), (2, 5, 7), (3, 3, 17)]  # (N, H, W)
PIXEL_K = [2, 3, 17, 51, 151, 1001]
# The CPU kernel's message when a target is the drainage output (the Python check has the same).
K_RULE = " (a classifier for C classes needs K = C + 1 outputs: C class logits and the drainage output)"


def _pixel_batch(N, K, H, W, dtype, d, seed=0):
    """NCHW logits and targets that are never d, every fifth pixel ignored (ignore_index -100)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, K, H, W, generator=gen) * 4).to(dtype)
    t = torch.randint(0, K - 1, (N, H, W), generator=gen)
    t = t + (t >= d).long()
    t.view(-1)[::5] = -100
    return x, t


@needs_cpu_kernel
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("K", PIXEL_K)
def test_cpu_pixel_rows_match_float64(K, layout):
    """Per-pixel loss and gradient against the float64 oracle: every reduction, both pass structures
    (fused, recompute), fp32 / bf16 / fp16, the drainage output in the middle, ignored pixels (their
    gradient exactly 0), and the gradient in the logits' layout."""
    from support import assert_loss_close

    alpha, beta, d = 0.1, 0.7, (K - 1) // 2
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for (N, H, W), dtype in itertools.product(PIXEL_SHAPES, [torch.float32, torch.bfloat16, torch.float16]):
        x, t = _pixel_batch(N, K, H, W, dtype, d)
        x = x.contiguous(memory_format=fmt)
        x64 = x.double().requires_grad_()
        ref = drainage_loss_reference(x64, t, alpha=alpha, beta=beta, drainage_idx=d, reduction="none")
        upstream = torch.rand(ref.shape, dtype=torch.float64) + 0.5
        ref.backward(upstream)
        kept = int((t != -100).sum())
        for reduction, fused in [("none", True), ("sum", True), ("mean", True), ("mean", False)]:
            xc = x.clone().requires_grad_()
            loss = fused_drainage_loss(
                xc,
                t,
                alpha=alpha,
                beta=beta,
                drainage_idx=d,
                reduction=reduction,
                backend="cpp",
                _fuse_grad=fused,
            )
            expected = x64.grad
            if reduction == "none":
                assert_loss_close(loss, ref.detach(), x, alpha, beta)
                loss.backward(upstream.float())
            else:
                per = 1 / kept if reduction == "mean" else 1.0
                assert_loss_close(loss, ref.detach().sum() * per, x, alpha, beta)
                loss.backward()
                expected = x64.grad / upstream[:, None] * per
            assert_grad_close(xc.grad, expected, x, alpha, beta)
            assert xc.grad.is_contiguous(memory_format=fmt)
            assert (xc.grad.movedim(1, -1)[t == -100] == 0).all()


def _per_pixel_ops(x, t, up, hp, weight):
    """Every CPU op on (N, K, H, W) logits, each output per pixel: losses (N, H, W), row terms
    (4, N, H, W) and gradients (N, K, H, W), whatever the layout; `up` (N, H, W): the upstream
    gradient of the losses; hp: the ops' h1, h2, d, ignore_index, member; weight (N, H, W). The
    targets are not checked."""
    ops = torch.ops.drainage_fast
    N, K, H, W = x.shape
    x3, target = as_rows(x), t.reshape(-1)
    d, ignore_index = hp[2], hp[3]
    hp = (*hp, weight.reshape(-1))
    scale = torch.tensor([0.25])
    loss, stats = ops.forward(x3, target, *hp)
    fused_loss, fused_stats, fused_grad = ops.forward_with_grad(x3, target, scale, *hp)
    return {
        "loss": loss.view(N, H, W),
        "stats": stats.view(4, N, H, W),
        "fused loss": fused_loss.view(N, H, W),
        "fused stats": fused_stats.view(4, N, H, W),
        "fused grad": from_rows(fused_grad, x.shape),
        "grad": from_rows(ops.backward(x3, target, stats, up.reshape(-1), d, ignore_index), x.shape),
        "scalar grad": from_rows(
            ops.backward(x3, target, stats, scale.expand(target.numel()), d, ignore_index), x.shape
        ),
    }


def _specials(x, t, K, d):
    """The cases the lanes must keep apart: +inf in J (J's max +inf), J all -inf, nan in J, an
    ignored pixel with inf and nan logits, targets out of range and equal to d (NaN rows); two of
    them in the last, partial group of an image. And a group of 16 pixels that are all ignored."""
    H, W = t.shape[1:]
    t[0, 0, 2], t[1, H - 1, W - 1], t[0, 1, 1] = K, d, -100
    x[0, :2, 1, 1] = torch.tensor([float("inf"), float("nan")])
    t[1].view(-1)[16:32] = -100
    x[1, 0].view(-1)[16:32] = float("inf")
    for (h, w), value in [((0, 1), "inf"), ((0, 3), "-inf"), ((H - 1, W - 2), "nan")]:
        t[0, h, w] = (d + 1) % K
        J = [k for k in range(K) if k not in (d, (d + 1) % K)]
        if value == "-inf":
            x[0, J, h, w] = float("-inf")
        elif J:
            x[0, J[len(J) // 2], h, w] = float(value)


@needs_cpu_kernel
@pytest.mark.parametrize("member", list(Member))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", PIXEL_K)
def test_cpu_pixel_rows_are_the_row_path_bits(K, dtype, member):
    """Each pixel's loss, row terms and gradient have the same bits in the pixel layout (NCHW) as
    in the row path (the same values channels_last), on 1 thread and on 2, and when the image is
    cropped so that its pixels fall in other lanes and groups: the pixel path adds a row's terms in
    the row path's order. Every member, with sample weights (one of them 0). Also with infinities,
    nan and bad targets (the ops do not check them: those rows are nan); the fused gradient is the
    recomputed one there too (+inf in J: 1 where z == shift, not nan, in both)."""
    N, H, W, d = 2, 5, 7, (K - 1) // 2
    x, t = _pixel_batch(N, K, H, W, dtype, d, seed=K)
    _specials(x, t, K, d)
    hp = op_args(member, d)[:-1]
    weight = strided_weights(t.numel(), seed=K).view(t.shape)
    weight[1, 2, 3] = 0.0
    up = torch.linspace(0.5, 2.0, t.numel()).view(t.shape)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert as_rows(x).stride()[1:] == (1, H * W) and H * W >= 16  # the pixel layout
    assert as_rows(channels_last).stride()[1:] == (K, 1)  # the row path
    good = t.masked_fill((t >= K) | (t == d), -100)  # forward_reduced checks the targets
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            for logits in (x, channels_last):
                out = _per_pixel_ops(logits, t, up, hp, weight)
                torch.testing.assert_close(
                    out["fused grad"], out["scalar grad"], rtol=0, atol=0, equal_nan=True
                )
                reduced = torch.ops.drainage_fast.forward_reduced(
                    as_rows(logits), good.reshape(-1), True, True, *hp, weight.reshape(-1)
                )
                out["mean"], out["mean grad"] = reduced[0], from_rows(reduced[2], x.shape)
                runs.append(out)
    finally:
        torch.set_num_threads(threads)
    expected = runs[0]
    for run in runs[1:]:
        for name, value in run.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, equal_nan=True, msg=name)
    bad = (t >= K) | (t == d)
    assert expected["loss"][bad].isnan().all() and expected["grad"].movedim(1, -1)[bad].isnan().all()
    assert (expected["loss"][t == -100] == 0).all() and (
        expected["grad"].movedim(1, -1)[t == -100] == 0
    ).all()
    cropped = _per_pixel_ops(
        x[..., 1:].contiguous(), t[..., 1:], up[..., 1:].contiguous(), hp, weight[..., 1:]
    )  # S = 30: the pixels one lane over
    for name, value in cropped.items():
        torch.testing.assert_close(value, expected[name][..., 1:], rtol=0, atol=0, equal_nan=True, msg=name)


@needs_cpu_kernel
@pytest.mark.parametrize("member", list(Member))
def test_cpp_names_the_output_count_when_a_target_is_the_drainage_output(member):
    """The eager mean checks the targets in the C++ op: a target equal to the drainage index gets the
    K = C + 1 hint, one out of range does not; for every member, with and without sample weights."""
    loss, _, params, _ = FAMILY[member]
    x = torch.randn(4, 5, 6, requires_grad=True)
    for (bad, what), weight in itertools.product(
        [(4, "equals drainage_idx"), (7, "is out of range [0, 5)")], [None, torch.rand(4, 6)]
    ):
        t = torch.zeros(4, 6, dtype=torch.long)
        t[2, 3] = bad
        with pytest.raises(IndexError) as err:
            loss(x, t, **params, sample_weight=weight, backend="cpp")
        assert f"target value {bad} {what}" in str(err.value)
        assert (K_RULE in str(err.value)) == (bad == 4), str(err.value)


@needs_cpu_kernel
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", ["rows", "pixels"])
@pytest.mark.parametrize("member", list(Member))
def test_cpp_members_and_weights_match_float64(member, layout, weighted):
    """Every member through the cpp backend against its float64 oracle (autograd of
    drainage_fast.reference) with sample_weight: rows of K = 51 (the row path; K = 3 and 300 too),
    and NCHW pixels (the pixel path), fp32 / bf16 / fp64 logits, weights of another dtype and a
    stride, every reduction (mean: the weighted mean sum(w l) / sum(w)), ignored rows."""
    from support import assert_loss_close

    loss_fn, oracle, params, (a, b) = FAMILY[member]
    gen = torch.Generator().manual_seed(int(member))
    cases = [(torch.float32, 51), (torch.bfloat16, 3), (torch.float64, 300)]
    for (dtype, K), reduction in itertools.product(cases, ["none", "sum", "mean"]):
        shape = (37, K) if layout == "rows" else (2, K, 4, 5)
        x = (torch.randn(shape, generator=gen) * 4).to(dtype)
        t = torch.randint(0, K - 1, shape[:1] + shape[2:], generator=gen)
        t.view(-1)[::6] = -100
        w_dtype = {
            torch.float32: torch.float64,
            torch.bfloat16: torch.bfloat16,
            torch.float64: torch.float32,
        }[dtype]
        w = strided_weights(t.numel(), w_dtype, seed=K).view(t.shape) if weighted else None
        x64 = x.to(torch.float64, copy=True).requires_grad_()
        ref = oracle(x64, t, **params, reduction=reduction, sample_weight=w)
        up = torch.rand(ref.shape, dtype=torch.float64, generator=gen) + 0.5
        ref.backward(up)
        xc = x.clone().requires_grad_()
        loss = loss_fn(xc, t, **params, reduction=reduction, sample_weight=w, backend="cpp")
        loss.backward(up.to(loss.dtype))
        assert_loss_close(loss, ref.detach(), x, a, b)
        # the fused gradient (mean, sum) is rounded, then scaled by the upstream gradient
        assert_grad_close(xc.grad, x64.grad, x, a, b, roundings=1 if reduction == "none" else 2)
        assert (xc.grad.movedim(1, -1)[t == -100] == 0).all()


@needs_cpu_kernel
@pytest.mark.parametrize("bad", [-1.5, float("nan"), float("inf"), float("-inf")])
def test_the_cpp_reduction_refuses_bad_weights_naming_them(bad):
    """forward_reduced (and so reduced_loss) checks every weight, an ignored row's too, as the Python
    API does: a ValueError with WEIGHT_MESSAGE's words and the value."""
    x3, target = _rows("contiguous", torch.float32, False)
    for row in (0, 1):  # row 1 is ignored
        weight = torch.ones(target.numel(), dtype=torch.float64)
        weight[row] = bad
        expected = f"{WEIGHT_MESSAGE}, got {bad}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            torch.ops.drainage_fast.forward_reduced(x3, target, True, False, *op_args(Member.DAC, 10, weight))
        with pytest.raises(ValueError, match=re.escape(expected)):
            torch.ops.drainage_fast.reduced_loss(
                x3.squeeze(1), target, False, *op_args(Member.DAC, 10, weight)
            )


@needs_ext
def test_reduced_loss_refuses_a_weight_that_requires_grad():
    """The node gives the logits their gradient only: a weight's would be lost, so the op refuses it
    (the API weighs such rows in torch ops)."""
    x = torch.randn(6, 11, device=DEVICE, requires_grad=True)
    weight = torch.rand(6, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="do not require grad"):
        torch.ops.drainage_fast.reduced_loss(
            x, random_targets(6, 11, 10), True, *op_args(Member.GAMBLERS, 10, weight)
        )
    with torch.no_grad():  # nothing to lose
        torch.ops.drainage_fast.reduced_loss(
            x, random_targets(6, 11, 10), True, *op_args(Member.GAMBLERS, 10, weight)
        )


@needs_ext
@pytest.mark.parametrize("member", list(Member))
def test_a_second_backward_recomputes_the_member_and_its_weights(member):
    """retain_graph: the second backward runs forward_reduced again on the saved logits, targets and
    weights with the saved member and hyper-parameters: the same gradient, bit for bit."""
    loss_fn, _, params, _ = FAMILY[member]
    x = torch.randn(9, 7, 4, device=DEVICE, requires_grad=True)
    target = random_targets(9, 7, -1, 4)
    target[0, 1] = -100
    weight = strided_weights(36).view(9, 4)
    loss = loss_fn(x, target, **params, sample_weight=weight, backend=NATIVE)
    assert "ReducedLoss" in loss.grad_fn.name()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


# The eager mean / sum of the native backends: one op with a C++ autograd node (csrc/reduced_loss.cpp).
# The node reaches the kernels through the dispatcher, so these run on the CPU the code a GPU runs.


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_native_step_has_no_python_autograd_node(reduction):
    """The measured reason for the C++ node (benchmarks/results/cpu_vs_cross_entropy.md): the whole
    step is one Python call, and backward() runs no Python."""
    x = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    loss = fused_drainage_loss(x, random_targets(6, 5, -1), reduction=reduction, backend=NATIVE)
    assert loss.grad_fn.name() == "ReducedLossBackward"
    # The node names itself: a torch::autograd::Function's node printed as grad_fn=<ReducedLoss>>.
    assert repr(loss).endswith("grad_fn=<ReducedLossBackward>)"), repr(loss)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean", [True, False])
def test_opcheck_reduced_loss(dtype, mean):
    """Schema, fake kernel and the autograd registration. Not test_aot_dispatch_*: the op is eager
    only (the API takes DrainageFunction under torch.compile)."""
    x = torch.randn(6, 11, 3, device=DEVICE).to(dtype).requires_grad_(dtype != torch.bfloat16)
    target = random_targets(6, 11, 10, 3)
    target[0, 0] = -100
    torch.library.opcheck(
        torch.ops.drainage_fast.reduced_loss.default,
        (x, target, mean, *HP),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_by_multiplies_by_grad_out_times_pending_and_skips_one(dtype):
    """The factor grad_out * pending is formed in float32 and applied once (3 * 0.3 is not a bf16
    number: rounding it to bf16 first would change some elements)."""
    grad = torch.randn(3, 1, 700, device=DEVICE).to(dtype)
    before = grad.clone()
    half, two = torch.tensor(0.5, device=DEVICE), torch.tensor([2.0], device=DEVICE)
    torch.ops.drainage_fast.scale_by_(grad, half, two)
    assert torch.equal(grad, before)
    grad_out, pending = torch.tensor(3.0, device=DEVICE), torch.tensor([0.3], device=DEVICE)
    torch.ops.drainage_fast.scale_by_(grad, grad_out, pending)
    expected = (before.float() * (grad_out * pending)).to(dtype)
    assert torch.equal(grad, expected)
    if dtype == torch.bfloat16:
        assert not torch.equal(grad, (before.float() * (grad_out * pending).to(dtype).float()).to(dtype))
    torch.ops.drainage_fast.scale_by_(grad, torch.tensor(-0.75, device=DEVICE), None)
    assert torch.equal(grad, (expected.float() * -0.75).to(dtype))


@needs_ext
@pytest.mark.parametrize("grad_out", [1.0, 0.5])
def test_an_infinite_pending_factor_leaves_a_zero_gradient_zero(grad_out):
    """A mean over no kept row has 1 / count = inf pending; its gradient is all zeros and must stay
    so: grad_out * inf times 0 would be nan in every element (the cuda backend's mean step with
    every target ignored, issue 19 item 1)."""
    grad = torch.zeros(3, 1, 700, device=DEVICE)
    torch.ops.drainage_fast.scale_by_(
        grad, torch.tensor(grad_out, device=DEVICE), torch.tensor([float("inf")], device=DEVICE)
    )
    assert torch.equal(grad, torch.zeros_like(grad))


def test_the_cuda_forward_checks_the_targets_in_its_kernel_alone():
    """backends.cuda.forward (reduction "none") is its one op: the kernel checks the targets with a
    device-side assert, no torch ops before it (issue 19 item 4). Counted with CPU tensors: the
    dispatcher then runs the CPU kernel, but the Python path is the GPU's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from drainage_fast._inputs import Hyper

    cuda_backend = backends.load("cuda")
    if cuda_backend.native.LOAD_ERROR is not None:
        pytest.skip(cuda_backend.native.LOAD_ERROR)

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x3 = torch.randn(8, 1, 11)
    target = torch.randint(0, 10, (8,))
    with Ops() as ops:
        cuda_backend.forward(x3, target, Hyper(0.0, 0.0, 10, -100))
    assert ops.seen == ["drainage_fast.forward.default"]


@needs_ext
def test_the_first_backward_reads_no_saved_tensor():
    """The node keeps the inputs for a second backward or create_graph only: loss.backward() unpacks
    nothing (with save_on_cpu, no copy back of the logits every step), and logits changed in place
    after the forward do not stop it: the gradient was written before."""
    counts = {"pack": 0, "unpack": 0}

    def pack(t):
        counts["pack"] += 1
        return t

    def unpack(t):
        counts["unpack"] += 1
        return t

    w = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    target = random_targets(6, 5, -1)
    expected = torch.autograd.grad(fused_drainage_loss(w * 1, target, backend="reference"), w)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        logits = w * 1  # MulBackward saves nothing to unpack for a Python scalar
        loss = fused_drainage_loss(logits, target, backend=NATIVE)
    with torch.no_grad():
        logits.add_(1.0)
    loss.backward()
    assert counts["unpack"] == 0, counts
    assert_grad_close(w.grad, expected, w.detach(), 1.0, 1.0)


@needs_ext
def test_a_target_changed_in_place_before_a_second_backward_raises():
    """A second backward runs the forward again on the saved inputs: a changed target must be an
    error (the version counter), never a silently different gradient."""
    x = torch.randn(8, 5, device=DEVICE, requires_grad=True)
    target = random_targets(8, 5, -1)
    loss = fused_drainage_loss(x, target, backend=NATIVE)
    loss.backward(retain_graph=True)
    target.fill_(-100)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_ext
def test_the_native_node_raises_the_second_order_message_word_for_word():
    from drainage_fast._function import HIGHER_ORDER_MESSAGE

    x = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    loss = fused_drainage_loss(x, random_targets(4, 5, -1), backend=NATIVE)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError) as err:
        grad.sum().backward()
    assert HIGHER_ORDER_MESSAGE in str(err.value)


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_native_op_under_inference_mode_is_the_forward_of_the_step(reduction):
    """torch.inference_mode skips the autograd kernel: the device kernel runs the forward alone."""
    x = torch.randn(9, 7, 2, device=DEVICE)
    target = random_targets(9, 7, -1, 2)
    target[0, 1] = -100
    with torch.inference_mode():
        a = fused_drainage_loss(x, target, reduction=reduction, backend=NATIVE)
    b = fused_drainage_loss(x.clone().requires_grad_(), target, reduction=reduction, backend=NATIVE)
    assert a.item() == b.item()


@needs_cpu_kernel
@pytest.mark.parametrize("weighted", [False, True])
def test_the_cpp_mean_is_the_exact_mean_of_its_rows_rounded_once(weighted):
    """The reduction sums the row losses in double with compensation, in fixed chunks of rows, and
    rounds the mean once: within half a float ulp of the exact mean of the rows, with the same bits
    on 1 thread and on 2. (At this size, torch's float32 sum is an ulp off, a float32 sum in row
    order ~100 ulps.) A weighted mean divides by the kept rows' weight sum, made the same way: within
    half an ulp of the exact sum(w l) / sum(w)."""
    import math

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, 3, generator=gen) * 3
    target = torch.randint(0, 2, (200_000,), generator=gen)
    target[::7] = -100
    kept = target != -100
    weight = None
    if weighted:
        weight = torch.rand(200_000, generator=gen) * 3
        weight[::11] = 0.0
    loss_fn, _, params, _ = FAMILY[Member.DAC if weighted else Member.DRAINAGE]
    rows = loss_fn(x, target, **params, reduction="none", sample_weight=weight, backend="cpp")
    divisor = math.fsum(weight[kept].double().tolist()) if weighted else int(kept.sum())
    exact = math.fsum(rows.double().tolist()) / divisor
    float_ulp = 2.0 ** (math.floor(math.log2(exact)) - 23)
    threads = torch.get_num_threads()
    try:
        means = []
        for n in (1, 2):
            torch.set_num_threads(n)
            means.append(loss_fn(x, target, **params, sample_weight=weight, backend="cpp").item())
    finally:
        torch.set_num_threads(threads)
    assert means[0] == means[1]
    assert abs(means[0] - exact) <= 0.5 * float_ulp


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_autograd_traces_the_native_node(reduction, weighted):
    """torch._dynamo's compiled autograd traces ReducedLossBackward (its recompute path, through the
    ops' fake kernels): the gradient an eager backward gives, with an upstream factor and an ignored
    row. (A node without compiled_args makes compiled autograd raise.)"""
    from torch._dynamo import compiled_autograd

    x = torch.randn(8, 5, device=DEVICE, requires_grad=True)
    target = random_targets(8, 5, -1)
    target[2] = -100
    weight = strided_weights(8) if weighted else None
    kw = dict(reduction=reduction, sample_weight=weight, backend=NATIVE)
    (expected,) = torch.autograd.grad(fused_drainage_loss(x, target, **kw) * 3, x)
    loss = fused_drainage_loss(x, target, **kw)
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        (loss * 3).backward()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
