"""The public contract: names, module form, backend choice, and a clear error for every bad input."""

import math

import pytest
import torch
from support import BACKENDS, DEVICE, random_targets

import drainage_fast
from drainage_fast import (
    DrainageLoss,
    available_backends,
    backends,
    drainage_loss_reference,
    fused_drainage_loss,
)

LOSSES = [fused_drainage_loss, drainage_loss_reference]


def good_inputs(N=4, K=5):
    return torch.randn(N, K, device=DEVICE), random_targets(N, K, -1)


# (keyword overrides, logits/target transform, exception, words the message must contain)
BAD_INPUTS = [
    (dict(alpha=0.0), None, ValueError, ["alpha", "0.0"]),
    (dict(alpha=-1), None, ValueError, ["alpha", "-1"]),
    (dict(alpha=float("nan")), None, ValueError, ["alpha", "nan"]),
    (dict(alpha=float("inf")), None, ValueError, ["alpha", "inf"]),
    (dict(alpha=True), None, ValueError, ["alpha", "True"]),
    (dict(alpha="1"), None, ValueError, ["alpha", "'1'"]),
    (dict(beta=0.0), None, ValueError, ["beta", "0.0"]),
    (dict(beta=-2.5), None, ValueError, ["beta", "-2.5"]),
    (dict(reduction="avg"), None, ValueError, ["reduction", "'avg'"]),
    (dict(ignore_index=1.5), None, ValueError, ["ignore_index", "1.5"]),
    (dict(drainage_idx=5), None, IndexError, ["drainage_idx=5", "K=5"]),
    (dict(drainage_idx=-6), None, IndexError, ["drainage_idx=-6"]),
    (dict(drainage_idx=1.0), None, ValueError, ["drainage_idx", "1.0"]),
    ({}, lambda x, t: (x, t.float()), ValueError, ["target", "torch.float32"]),
    ({}, lambda x, t: (x, t.to(torch.uint8)), ValueError, ["target", "torch.uint8"]),
    ({}, lambda x, t: (x.long(), t), ValueError, ["logits", "torch.int64"]),
    ({}, lambda x, t: (x[:, 0], t), ValueError, ["logits", "shape", "(4,)"]),
    ({}, lambda x, t: (x[:, :1], t.clamp(max=0)), ValueError, ["K >= 2", "K=1"]),
    ({}, lambda x, t: (x, t[:3]), ValueError, ["target", "shape", "(4,)", "(3,)"]),
    ({}, lambda x, t: (x, t[:, None]), ValueError, ["target", "shape", "(4, 1)"]),
    ({}, lambda x, t: (x.tolist(), t), ValueError, ["logits", "list"]),
    ({}, lambda x, t: (x, t.to("meta")), ValueError, ["target", "meta"]),
    (
        {},
        lambda x, t: (x, torch.where(t == 0, 7, t).index_fill(0, torch.tensor([0], device=t.device), 7)),
        IndexError,
        ["target", "7", "[0, 5)"],
    ),
    (
        {},
        lambda x, t: (x, t.index_fill(0, torch.tensor([1], device=t.device), -1)),
        IndexError,
        ["target", "-1"],
    ),
    (
        {},
        lambda x, t: (x, t.index_fill(0, torch.tensor([2], device=t.device), 4)),
        IndexError,
        ["target", "4", "drainage_idx"],
    ),
]


# Bad sample weights and member hyper-parameters, for every loss of the family.
BAD_WEIGHTS = [
    (lambda t: t.float()[:, None], ValueError, ["sample_weight", "shape", "(4,)", "(4, 1)"]),
    (lambda t: t, ValueError, ["sample_weight", "torch.int64"]),
    (lambda t: torch.full(t.shape, -0.5, device=t.device), ValueError, ["sample_weight", ">= 0", "-0.5"]),
    (lambda t: torch.full(t.shape, float("nan"), device=t.device), ValueError, ["sample_weight", "nan"]),
    (lambda t: torch.full(t.shape, float("inf"), device=t.device), ValueError, ["sample_weight", "inf"]),
    (
        lambda t: torch.full(t.shape, -2.0, device=t.device, requires_grad=True),
        ValueError,
        ["sample_weight", "-2.0"],
    ),
    (lambda t: t.tolist(), ValueError, ["sample_weight", "list"]),
    (lambda t: torch.ones(t.shape, device="meta"), ValueError, ["sample_weight", "meta"]),
]
FAMILY = [
    (drainage_fast.fused_drainage_loss, {}),
    (drainage_fast.fused_gamblers_loss, {"reward": 2.0}),
    (drainage_fast.fused_dac_loss, {"alpha": 0.5}),
    (drainage_fast.fused_cross_entropy_loss, {}),
    (drainage_fast.gamblers_loss_reference, {"reward": 2.0}),
]
BAD_PARAMS = [
    (drainage_fast.fused_gamblers_loss, {"reward": 1.0}, ["reward", "> 1", "1.0"]),
    (drainage_fast.fused_gamblers_loss, {"reward": float("inf")}, ["reward", "inf"]),
    (drainage_fast.gamblers_loss_reference, {"reward": "2"}, ["reward", "'2'"]),
    (drainage_fast.fused_dac_loss, {"alpha": -0.1}, ["alpha", ">= 0", "-0.1"]),
    (drainage_fast.dac_loss_reference, {"alpha": float("nan")}, ["alpha", "nan"]),
    (drainage_fast.fused_cross_entropy_loss, {"over": "C"}, ["over", "'C'", "'classes'"]),
]


@pytest.mark.parametrize("loss_fn, params", FAMILY, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("make, error, words", BAD_WEIGHTS)
def test_bad_sample_weight_raises_a_clear_error(loss_fn, params, make, error, words):
    if DEVICE.type != "cpu" and words[1] in (">= 0", "nan", "inf"):
        pytest.skip("on GPU a bad weight value is a device-side assert (no host sync)")
    logits, target = good_inputs()
    with pytest.raises(error) as info:
        loss_fn(logits, target, sample_weight=make(target), **params)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("loss_fn, params, words", BAD_PARAMS, ids=lambda v: getattr(v, "__name__", ""))
def test_bad_member_hyper_parameters_raise_a_clear_error(loss_fn, params, words):
    with pytest.raises(ValueError) as info:
        loss_fn(*good_inputs(), **params)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_member_modules_match_their_functions():
    logits, target = good_inputs()
    weight = torch.rand(4, device=DEVICE)
    pairs = [
        (drainage_fast.GamblersLoss(reward=3.0), drainage_fast.fused_gamblers_loss, {"reward": 3.0}),
        (drainage_fast.DACLoss(alpha=0.2), drainage_fast.fused_dac_loss, {"alpha": 0.2}),
        (
            drainage_fast.FusedCrossEntropyLoss(over="classes"),
            drainage_fast.fused_cross_entropy_loss,
            {"over": "classes"},
        ),
    ]
    for module, fn, params in pairs:
        assert (
            module(logits, target, weight).item() == fn(logits, target, sample_weight=weight, **params).item()
        )
        assert all(f"{k}={v!r}" in repr(module) for k, v in params.items())
    dac = drainage_fast.DACLoss(alpha=0.2)
    dac.alpha = 0.9  # the schedule's way to change it
    assert dac(logits, target).item() == drainage_fast.fused_dac_loss(logits, target, alpha=0.9).item()
    with pytest.raises(ValueError, match="alpha"):
        dac.alpha = -1.0
    with pytest.raises(ValueError, match="reward"):
        drainage_fast.GamblersLoss(reward=0.5)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kwargs, transform, error, words", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(loss_fn, kwargs, transform, error, words):
    if DEVICE.type != "cpu" and error is IndexError and "target" in words:
        pytest.skip("on GPU a bad target is a device-side assert (no host sync); tested in test_gpu.py")
    logits, target = good_inputs()
    if transform is not None:
        logits, target = transform(logits, target)
    with pytest.raises(error) as info:
        loss_fn(logits, target, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


HINT = "a classifier for C classes needs K = C + 1 outputs: C class logits and the drainage output"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: f.__name__)
def test_a_target_on_the_drainage_output_says_the_model_needs_c_plus_1_outputs(loss_fn, reduction):
    """A model built with C outputs passes every batch until one holds class C - 1, which is then the
    drainage index: the message must name the likely cause. An out-of-range target has another cause."""
    if DEVICE.type != "cpu":
        pytest.skip("on GPU a bad target is a device-side assert (no host sync); tested in test_gpu.py")
    logits = torch.randn(4, 5)  # a 5-class model that forgot the drainage output
    on_drainage, out_of_range = torch.tensor([0, 4, 1, 2]), torch.tensor([0, 5, 1, 2])
    kwargs = dict(reduction=reduction) | ({"backend": "reference"} if loss_fn is fused_drainage_loss else {})
    with pytest.raises(IndexError) as info:
        loss_fn(logits, on_drainage, **kwargs)
    assert str(info.value).endswith(f"ignore_index=-100 ({HINT})"), info.value
    with pytest.raises(IndexError) as info:
        loss_fn(logits, out_of_range, **kwargs)
    assert "out of range" in str(info.value) and HINT not in str(info.value)


def test_unknown_backend():
    logits, target = good_inputs()
    with pytest.raises(ValueError, match="backend.*'cudnn'"):
        fused_drainage_loss(logits, target, backend="cudnn")
    with pytest.raises(ValueError, match="backend.*'cudnn'"):
        DrainageLoss(backend="cudnn")


def test_named_backend_never_falls_back():
    # Triton cannot run on the meta device: the named backend raises instead of falling back.
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on meta"):
        backends.resolve("triton", torch.device("meta"))
    assert backends.resolve("auto", torch.device("meta")).NAME == "reference"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from drainage_fast.backends import triton_launch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = triton_launch.availability(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in reason and "CUDA" in reason


def test_available_backends():
    names = available_backends()
    assert "reference" in names and set(names) <= set(backends.NAMES)
    assert names == [n for n in backends.NAMES if n in names]  # fastest first


def test_auto_backend_choice():
    # GPU: triton, else cuda; CPU: cpp (measured faster than reference, see
    # benchmarks/results/cpu_cpp_vs_reference.md), else reference; never the Triton interpreter.
    preference = ("triton", "cuda") if DEVICE.type == "cuda" else ("cpp",)
    expected = next((b for b in preference if backends.availability(b, DEVICE)[0]), "reference")
    assert backends.resolve("auto", DEVICE).NAME == expected


def test_module_matches_function_and_validates_early():
    logits, target = good_inputs()
    module = DrainageLoss(alpha=0.2, beta=3.0, drainage_idx=0, reduction="sum")
    target = random_targets(4, 5, 0)
    assert module(logits, target).item() == pytest.approx(
        fused_drainage_loss(logits, target, alpha=0.2, beta=3.0, drainage_idx=0, reduction="sum").item()
    )
    assert "alpha=0.2" in repr(module) and "reduction='sum'" in repr(module)
    with pytest.raises(ValueError, match="alpha"):
        DrainageLoss(alpha=0)
    with pytest.raises(ValueError, match="reduction"):
        DrainageLoss(reduction="batchmean")


def test_default_beta_is_one_over_alpha():
    logits, target = good_inputs()
    a = fused_drainage_loss(logits, target, alpha=0.25)
    b = fused_drainage_loss(logits, target, alpha=0.25, beta=4.0)
    assert a.item() == b.item()


def test_public_names():
    assert set(drainage_fast.__all__) == {
        "DrainageLoss",
        "GamblersLoss",
        "DACLoss",
        "FusedCrossEntropyLoss",
        "NativeBuildWarning",  # a failed C++ build: a warning a user can filter (test_csrc.py)
        "available_backends",
        "drainage_loss_reference",
        "gamblers_loss_reference",
        "dac_loss_reference",
        "cross_entropy_loss_reference",
        "fused_drainage_loss",
        "fused_gamblers_loss",
        "fused_dac_loss",
        "fused_cross_entropy_loss",
        # the fused linear head (docs/large_outputs.md): the logits never held whole
        "FusedLinearLoss",
        "fused_linear_drainage_loss",
        "fused_linear_gamblers_loss",
        "fused_linear_dac_loss",
        "fused_linear_cross_entropy_loss",
        "openset",  # the open-set and cleaning metrics, an attribute of the package
    }
    assert math.isfinite(fused_drainage_loss(*good_inputs()).item())


# Second-order uses: the hand-written backward is first-order only. Each gets one error that names
# the way to do it (the pure-PyTorch oracle), and the oracle does it.
SECOND_ORDER = {
    "double backward": lambda loss, x: torch.autograd.grad(
        torch.autograd.grad(loss(x), x, create_graph=True)[0].sum(), x
    ),
    "torch.func.grad": lambda loss, x: torch.func.grad(loss)(x),
    "torch.func.vmap": lambda loss, x: torch.func.vmap(loss)(x.unsqueeze(0).expand(2, -1, -1)),
    "torch.func.hessian": lambda loss, x: torch.func.hessian(loss)(x),
}


@pytest.mark.parametrize("use", list(SECOND_ORDER))
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_uses_raise_one_clear_error(use, backend):
    x = torch.randn(4, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    target = random_targets(4, 5, -1)
    with pytest.raises(RuntimeError, match="first-order backward only.*drainage_loss_reference"):
        SECOND_ORDER[use](lambda x: fused_drainage_loss(x, target, backend=backend), x)
    SECOND_ORDER[use](lambda x: drainage_loss_reference(x, target), x)  # the way the message names


def test_create_graph_for_another_term_still_works():
    """create_graph=True for a gradient penalty on another term: the loss's own gradient is never
    differentiated, so nothing raises."""
    x = torch.randn(4, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    loss = fused_drainage_loss(x, random_targets(4, 5, -1)) + (w**3).sum()
    grad_x, grad_w = torch.autograd.grad(loss, (x, w), create_graph=True)
    grad_w.sum().backward()
    torch.testing.assert_close(w.grad, 6 * w.detach())
    expected = torch.autograd.grad(drainage_loss_reference(x, random_targets(4, 5, -1)), x)[0]
    assert grad_x.shape == expected.shape


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_module_implements_the_backend_protocol(name):
    """The contract is a typing.Protocol, not a docstring: each backend module has every member,
    and each function takes the protocol's parameters (by name and order)."""
    import importlib
    import inspect
    import typing

    if name == "triton":
        pytest.importorskip("triton")
    module = importlib.import_module(backends._MODULES[name])
    protocol = backends.Backend
    hints = typing.get_type_hints(protocol)
    for member in ("NAME", "FUSED_GRAD"):
        assert isinstance(getattr(module, member), hints[member]), member
    for member in ("availability", "forward", "backward", "forward_reduced", "scale_"):
        expected = list(inspect.signature(getattr(protocol, member)).parameters)[1:]  # without self
        got = list(inspect.signature(getattr(module, member)).parameters)
        assert got[: len(expected)] == expected, member
