"""The fused linear losses (drainage_fast/linear.py) against materialised logits in float64: F.linear,
then the member's oracle; gradients of hidden, weight and bias, every reduction, ignore_index, sample
weights, (B, T, H) input, a drainage row that is not the last, chunks that split the rows unevenly;
gradcheck, torch.compile(fullgraph=True), autocast, bad arguments, and the docs page's example."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import BACKENDS, DEVICE, MEMBERS, assert_loss_close, random_targets

from drainage_fast import linear

ROOT = Path(__file__).resolve().parents[1]
LINEAR = {
    "drainage": linear.fused_linear_drainage_loss,
    "gamblers": linear.fused_linear_gamblers_loss,
    "dac": linear.fused_linear_dac_loss,
    "ce_all": linear.fused_linear_cross_entropy_loss,
    "ce_classes": linear.fused_linear_cross_entropy_loss,
}

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


def materialised(member, hidden, weight, bias, target, **kw):
    """The oracle on the logits F.linear makes, (B, T, K) moved to the loss's (B, K, T)."""
    logits = F.linear(hidden, weight, bias)
    return member.oracle(logits.movedim(-1, 1) if logits.dim() == 3 else logits, target, **kw)


@pytest.mark.parametrize("member", MEMBERS, ids=repr)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
def test_matches_materialised_logits(backend, member, reduction, weighted):
    if reduction == "sum" and backend != "reference":
        pytest.skip("sum and mean differ in linear.py's scaling alone, shared by every backend")
    B, T, H, K = 3, 7, 16, 23
    hidden = torch.randn(B, T, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(K, H, device=DEVICE, dtype=torch.float64) / 4).requires_grad_()
    bias = torch.randn(K, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(B, K, 5, T)  # the drainage row is 5, not the last
    target[0, :3] = -100
    sample_weight = torch.rand(B, T, device=DEVICE, dtype=torch.float64) if weighted else None
    kw = dict(drainage_idx=5, reduction=reduction, sample_weight=sample_weight)
    out = LINEAR[member.name](
        hidden, weight, target, bias=bias, chunk_rows=4, backend=backend, **member.params, **kw
    )
    ref = materialised(member, hidden, weight, bias, target, **kw)
    up = torch.rand(ref.shape, device=DEVICE, dtype=torch.float64)
    grads = torch.autograd.grad((out * up).sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad((ref * up).sum(), (hidden, weight, bias))
    assert out.shape == ref.shape
    logits = F.linear(hidden, weight, bias).detach()
    assert_loss_close(out.detach(), ref.detach(), logits.reshape(-1, K), **member.bounds())
    for grad, ref_grad in zip(grads, ref_grads):
        scale = ref_grad.abs().max()
        assert ((grad - ref_grad).abs() <= 1e-12 * (1 + scale)).all(), (grad - ref_grad).abs().max()


def test_gradcheck(backend):
    hidden = torch.randn(6, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(6, 5, -1)
    target[2] = -100
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear.fused_linear_dac_loss(
                h, w, target, bias=b, alpha=0.3, reduction=reduction, chunk_rows=2, backend=backend
            ),
            (hidden, weight, bias),
            fast_mode=backend != "reference",  # a random projection: 2 calls, not 2 per input element
        )


def test_a_second_backward_runs_the_chunks_again(backend):
    hidden = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(13, 8, device=DEVICE, requires_grad=True)
    target = random_targets(9, 13, -1)
    loss = linear.fused_linear_drainage_loss(hidden, weight, target, alpha=0.2, chunk_rows=4, backend=backend)
    loss.backward(retain_graph=True)
    first = (hidden.grad.clone(), weight.grad.clone())
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * first[0])
    torch.testing.assert_close(weight.grad, 2 * first[1])


def test_sixteen_bit_inputs_accumulate_the_weight_gradient_in_fp32(backend):
    """bf16 hidden and weight: the chunks' products in bf16, their sum in fp32; against the float64
    gradient within the roundings of the bf16 chunk products."""
    hidden = torch.randn(64, 32, device=DEVICE).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(40, 32, device=DEVICE) / 6).to(torch.bfloat16).requires_grad_()
    target = random_targets(64, 40, -1)
    loss = linear.fused_linear_cross_entropy_loss(hidden, weight, target, chunk_rows=8, backend=backend)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), target).backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    for grad, ref in ((weight.grad, w64.grad), (hidden.grad, h64.grad)):
        err = (grad.double() - ref).abs().max() / ref.abs().max()
        assert err < 2**-6, err  # a few bf16 roundings (2^-8 each) of the chunk products


def test_compile_fullgraph_and_autocast(backend):
    hidden = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    head = torch.nn.Linear(8, 11).to(DEVICE)
    target = random_targets(2, 11, -1, 5)

    def step(hidden, target):
        return linear.fused_linear_gamblers_loss(
            hidden, head.weight, target, bias=head.bias, reward=2.0, chunk_rows=3, backend=backend
        )

    eager = step(hidden, target)
    eager_grads = torch.autograd.grad(eager, (hidden, head.weight, head.bias))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(hidden, target)
    grads = torch.autograd.grad(compiled, (hidden, head.weight, head.bias))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = hidden.to(torch.bfloat16)
        loss = linear.fused_linear_drainage_loss(h, head.weight.to(torch.bfloat16), target, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()


BAD = [
    (dict(hidden=lambda h: h[0]), ValueError, ["hidden", "shape", "(8,)"]),
    (dict(hidden=lambda h: h.long()), ValueError, ["hidden", "torch.int64"]),
    (dict(weight=lambda w: w.double()), ValueError, ["weight", "dtype", "torch.float64"]),
    (dict(weight=lambda w: w[:, :3]), ValueError, ["weight", "(K, H)", "H = 8", "(11, 3)"]),
    (dict(target=lambda t: t[:3]), ValueError, ["target", "shape", "(6,)", "(3,)"]),
    (dict(target=lambda t: t.float()), ValueError, ["target", "torch.float32"]),
    (dict(bias=lambda w: torch.zeros(4)), ValueError, ["bias", "(11,)", "(4,)"]),
    (dict(chunk_rows=0), ValueError, ["chunk_rows", "0"]),
    (dict(sample_weight=lambda t: torch.ones(6, 1)), ValueError, ["sample_weight", "(6,)", "(6, 1)"]),
    (dict(drainage_idx=11), IndexError, ["drainage_idx=11", "K=11"]),
    (dict(alpha=0.0), ValueError, ["alpha", "0.0"]),
    (dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
]


@pytest.mark.parametrize("change, error, words", BAD)
def test_bad_arguments_raise_a_clear_error(backend, change, error, words):
    args = dict(
        hidden=torch.randn(6, 8, device=DEVICE),
        weight=torch.randn(11, 8, device=DEVICE),
        target=random_targets(6, 11, -1),
    )
    kwargs = {}
    for name, value in change.items():
        if name in args:
            args[name] = value(args[name])
        elif name in ("bias", "sample_weight"):
            kwargs[name] = value(args["target"]) if name == "sample_weight" else value(None)
        else:
            kwargs[name] = value
    with pytest.raises(error) as info:
        linear.fused_linear_drainage_loss(
            args["hidden"], args["weight"], args["target"], backend=backend, **kwargs
        )
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_the_docs_example_runs(backend, capsys):
    """docs/large_outputs.md: a tiny causal LM with an [IDK] token trains a few steps, the loss falls."""
    if backend != "reference":
        pytest.skip("one backend is enough ('auto' picks the fastest)")
    page = (ROOT / "docs" / "large_outputs.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", page, flags=re.S).group(1)
    exec(compile(code, "docs/large_outputs.md", "exec"), {})
    losses = [float(v) for v in re.findall(r"step \d+: loss ([\d.]+)", capsys.readouterr().out)]
    assert len(losses) == 5 and losses[-1] < losses[0]
